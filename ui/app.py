"""Starting the desktop app: `kimi-desktop` (no model; pick one from the Model menu) and
`kimi-desktop --demo` (the built-in demo model, loaded on a worker thread while the window is up)."""

from __future__ import annotations

import gc
import sys
import time
from importlib import resources

from PySide6.QtCore import QObject, Qt, QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from kimi_desktop.conversations import ConversationStore, SchemaError
from kimi_desktop.notices import log

from .controller import Controller
from .main_window import MainWindow
from .theme import DARK, LIGHT, apply_theme, system_theme

__all__ = ["build_window", "run", "window_icon"]


def build_window(app: QApplication, db_path=None, engine=None, model_label: str = "", settings=None) -> MainWindow:
    """The window on the store at db_path (default: the platformdirs data dir), themed like the system,
    following its light/dark changes."""
    chosen = {"light": LIGHT, "dark": DARK}.get(getattr(settings, "theme", "system"))    # else follow the system
    theme = chosen or system_theme(app)
    apply_theme(app, theme)
    controller = Controller(ConversationStore(db_path), engine, model_label)
    window = MainWindow(controller, theme, settings=settings)

    def rescheme(*_):
        if chosen is not None:
            return
        t = system_theme(app)
        apply_theme(app, t)
        window.set_theme(t)
    try:
        app.styleHints().colorSchemeChanged.connect(rescheme)
    except AttributeError:                          # Qt < 6.5: no live switch
        pass
    return window


class UiThreadGc(QObject):
    """Python's cyclic garbage collector runs on whichever thread allocates past its threshold; when that
    is a worker (the engine, uvicorn, MCP) and the garbage holds Qt objects, they are destroyed off the UI
    thread, which crashes. So automatic collection is off, and this timer collects on the UI thread by the
    same thresholds."""

    def __init__(self, parent=None, interval_ms: int = 500):
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        self.timer.start(interval_ms)

    def check(self) -> None:
        counts = gc.get_count()
        for gen in (2, 1, 0):                   # the oldest generation due (it collects the younger ones too)
            if counts[gen] > self.thresholds[gen]:
                gc.collect(gen)
                return


def window_icon() -> QIcon:
    """The app's icon (packaging/icon/kimi-desktop.svg, shipped in the package as ui/icons/)."""
    return QIcon(str(resources.files(__package__) / "icons" / "kimi-desktop.svg"))


def run(demo: bool = False, db_path=None, argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    app = QApplication.instance() or QApplication(argv or sys.argv[:1])
    app._gc = UiThreadGc(app)
    app.setApplicationName("kimi-desktop")
    app.setApplicationDisplayName("Kimi Desktop")
    app.setWindowIcon(window_icon())
    from kimi_desktop.settings import Settings
    settings = Settings.load()
    try:
        window = build_window(app, db_path, settings=settings)
    except SchemaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    window.show()
    c = window.c
    c.modelChanged.connect(lambda label: log.info(f"model: {label}" if label else "model unloaded"))
    c.modelFailed.connect(lambda where, problem: log.info(f"could not load {where}: {problem}"))
    app.aboutToQuit.connect(c.shutdown)
    QTimer.singleShot(0, lambda: log.info(f"window ready in {time.monotonic() - t0:.2f} s"))
    if demo:
        c.load_demo()
    start_tools(window, settings)
    window.mcpServersChanged.connect(lambda: start_tools(window, settings))
    return app.exec()


def start_tools(window: MainWindow, settings) -> None:
    """(Re)start the MCP servers of mcp.json on a worker thread, then offer their tools in the chat."""
    from kimi_desktop.mcp_tools import McpHub, load_mcp_config    # a bad mcp.json: McpConfigError, a notice

    from .tool_approval import Approver
    from .tools import ToolSession
    from .workers import BackgroundCall

    old = window.hub
    window.hub = None
    window.c.tool_provider = window.c.on_tool_calls = None      # no tools while the servers restart

    def work(progress):
        if old is not None:
            old.close()
        return McpHub(load_mcp_config()).start()

    def ready(hub):
        window.hub = hub
        window.tools = ToolSession(window.c, hub, Approver(window, settings), max_rounds=settings.max_tool_rounds,
                                   timeout_s=settings.tool_timeout_s)
        bad = [f"{n}: {st.error}" for n, st in hub.status().items() if st.state != "connected"]
        if bad:
            window.show_notice("MCP servers not connected: " + "; ".join(bad))
        QApplication.instance().aboutToQuit.connect(hub.close)

    def failed(problem, details):
        window.show_notice(f"MCP servers: {problem}")
    call = BackgroundCall(work, window)
    call.done.connect(ready, Qt.QueuedConnection)
    call.failed.connect(failed, Qt.QueuedConnection)
    window._tools_start = call.start()
