"""The in-app local API: the same server as `kimi-desktop serve`, in-process, on the loaded engine,
bound to 127.0.0.1 only and behind a key (made on first use with secrets.token_urlsafe and kept, with
the port, in Settings.local_api: the owner-only settings file).

    api = LocalApi(controller, settings)      # settings None: the key lives in memory only
    api.action                                # the checkable "Local API" action: on starts, off stops
    LocalApiPanel(api)                        # the URL and the key with Copy buttons, the port, the status

Requests from editors and from the chat window share the engine's FIFO (engine.chat queues them).
Starting and stopping run on a worker thread (a stop waits ~200 ms for uvicorn's loop to notice).
Before the engine is closed or replaced (controller.engineClosing: unload, a model switch, the window
closing) the server is stopped at once; after a switch it starts again on the new engine, same port
and key; after an unload it stays stopped."""

from __future__ import annotations

import errno
import secrets
import threading

from PySide6.QtCore import QObject, QSignalBlocker, Signal
from PySide6.QtGui import QAction, QGuiApplication
from PySide6.QtWidgets import QFrame, QGridLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QToolButton

__all__ = ["LocalApi", "LocalApiPanel", "HOST"]

HOST = "127.0.0.1"
STOPPED, STARTING, RUNNING, STOPPING = "stopped", "starting", "running", "stopping"


def listen_problem(port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} is in use by another program: choose another port (0 picks a free one)"
    if e.errno == errno.EACCES:
        return f"port {port} needs administrator rights: choose one above 1023"
    return f"cannot listen on {HOST}:{port}: {e.strerror or e}"


class LocalApi(QObject):
    changed = Signal()              # state, message or URL changed
    _job_done = Signal(int)         # from the worker thread: job number

    def __init__(self, controller, settings=None, parent: QObject | None = None):
        super().__init__(parent)
        from kimi_desktop.settings import Settings
        self.c = controller
        self.settings, self._persist = (settings, True) if settings is not None else (Settings(), False)
        self.state, self.message, self.error = STOPPED, "stopped", False
        self.server = None                          # the running LocalServer
        self._resume = False                        # start again once the new engine is in
        self._job_no, self._job, self._then, self._result, self._problem = 0, None, None, None, ""
        self._job_done.connect(self._finish_job)
        self.action = QAction("Local API", self, checkable=True)
        self.action.setToolTip("Serve the loaded model to editors and scripts on this machine (OpenAI and "
                               "Anthropic APIs, with a key)")
        self.action.toggled.connect(lambda on: self.start() if on else self.stop())
        controller.engineClosing.connect(self._engine_closing)
        controller.modelChanged.connect(self._model_changed)

    # -- settings ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self.settings.local_api.get("port", 8000))

    def set_port(self, port: int) -> None:
        if port != self.port:
            self.settings.local_api["port"] = int(port)
            self._save()
            self.changed.emit()

    def key(self) -> str:
        """The API key clients send (Authorization: Bearer KEY or x-api-key); made on first use."""
        if not self.settings.local_api.get("api_key"):
            self.settings.local_api["api_key"] = secrets.token_urlsafe(24)
            self._save()
        return self.settings.local_api["api_key"]

    def _save(self) -> None:
        if self._persist:
            self.settings.save()

    @property
    def url(self) -> str:
        """The OpenAI base URL (Anthropic clients: the same without /v1)."""
        return (self.server.base_url if self.server is not None else f"http://{HOST}:{self.port}") + "/v1"

    # -- start / stop -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != STOPPED:
            return
        engine = self.c.engine
        if engine is None:
            return self._set(STOPPED, "no model is loaded: load one, then start the local API", error=True)
        from kimi_desktop.server import LocalServer, create_app
        from kimi_desktop.server.runner import bind
        port, key, name = self.port, self.key(), self.c.model_label or "kimi-desktop"
        try:
            sock = bind(HOST, port)                 # here, not on the worker: a taken port is said at once
        except OSError as e:
            return self._set(STOPPED, listen_problem(port, e), error=True)

        def work():
            try:
                app = create_app(engine, name, api_key=key, host=HOST)
                self._result = LocalServer(app, host=HOST, sock=sock, logs=False)
            except BaseException:
                sock.close()
                raise
            self._result.start_in_thread(timeout=10)
        self._set(STARTING, f"starting on port {sock.getsockname()[1]}…")
        self._run(work, self._started)

    def _started(self, problem: str) -> None:
        srv, self._result = self._result, None
        if problem:
            if srv is not None:
                srv.stop()
            return self._set(STOPPED, f"could not start: {problem}", error=True)
        self.server = srv
        self._set(RUNNING, f"running: serving {self.c.model_label or 'the model'} on port {srv.port}")

    def stop(self) -> None:
        """Stop on a worker thread (running generations are cancelled)."""
        if self.state != RUNNING:
            return
        srv = self.server
        self._set(STOPPING, "stopping…")
        self._run(srv.stop, lambda problem: self._stopped("stopped"))

    def stop_now(self, why: str = "stopped") -> None:
        """Stop here and now (before the engine closes): waits for a start or stop in flight."""
        job, self._job, self._then = self._job, None, None     # its queued result is ignored from here on
        if job is not None:
            job.join(15)
        srv, self._result = self.server or self._result, None
        if srv is not None:
            srv.stop()
        self._stopped(why)

    def _stopped(self, why: str) -> None:
        self.server = None                          # drops the app, and with it the engine
        self._set(STOPPED, why)

    def _run(self, work, then) -> None:
        self._job_no += 1
        no, self._then = self._job_no, then

        def run():
            problem = ""
            try:
                work()
            except Exception as e:                  # noqa: BLE001 - said in the status line
                problem = str(e) or type(e).__name__
            self._problem = problem
            self._job_done.emit(no)                 # queued to the UI thread
        self._job = threading.Thread(target=run, name="kimi-local-api", daemon=True)
        self._job.start()

    def _finish_job(self, no: int) -> None:
        if no != self._job_no or self._then is None:
            return                                  # stop_now() took it over
        then, self._then, self._job = self._then, None, None
        then(self._problem)

    def _engine_closing(self) -> None:
        self._resume = self.state in (STARTING, RUNNING)
        if self.state != STOPPED or self._job is not None:
            self.stop_now("stopped: the model was unloaded")

    def _model_changed(self, label: str) -> None:
        resume, self._resume = self._resume, False
        if resume and self.c.engine is not None:
            self.start()

    def _set(self, state: str, message: str, error: bool = False) -> None:
        self.state, self.message, self.error = state, message, error
        with QSignalBlocker(self.action):
            self.action.setChecked(state in (STARTING, RUNNING))
        self.action.setEnabled(state in (STOPPED, RUNNING))
        self.changed.emit()


class LocalApiPanel(QFrame):
    """Start / Stop, the base URL and the key (masked; Show, Copy), the port, the status line."""

    def __init__(self, api: LocalApi, parent=None):
        super().__init__(parent)
        self.api = api
        self.setObjectName("toolCard")
        grid = QGridLayout(self)
        grid.setContentsMargins(12, 8, 12, 8)
        grid.setHorizontalSpacing(8)
        title = QLabel("Local API")
        title.setObjectName("roleLabel")
        grid.addWidget(title, 0, 0)
        self.status = QLabel()
        self.status.setWordWrap(True)
        grid.addWidget(self.status, 0, 1, 1, 2)
        self.toggle = QPushButton()
        self.toggle.clicked.connect(lambda: api.action.trigger())
        grid.addWidget(self.toggle, 0, 3)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setToolTip("Hide this panel (the server keeps running)")
        self.close_button.clicked.connect(self.hide)
        grid.addWidget(self.close_button, 0, 4)
        self.url = self._field(grid, 1, "Base URL")
        self.copy_url = self._button(grid, 1, 3, "Copy", lambda: self._copy(self.url.text()))
        self.key = self._field(grid, 2, "API key")
        self.key.setEchoMode(QLineEdit.Password)
        self.show_key = self._button(grid, 2, 2, "Show", self._show_key)
        self.show_key.setCheckable(True)
        self.copy_key = self._button(grid, 2, 3, "Copy", lambda: self._copy(api.key()))
        grid.addWidget(QLabel("Port"), 3, 0)
        self.port = QSpinBox()
        self.port.setRange(0, 65535)
        self.port.setSpecialValueText("any free port")
        self.port.setValue(api.port)
        self.port.setFixedWidth(140)
        self.port.valueChanged.connect(api.set_port)
        grid.addWidget(self.port, 3, 1)
        hint = QLabel("This machine only (127.0.0.1). Point an OpenAI client at the URL with the key; "
                      "Anthropic clients at it without /v1. Chat and API requests take turns on the model.")
        hint.setObjectName("muted")
        hint.setWordWrap(True)
        grid.addWidget(hint, 4, 0, 1, 5)
        grid.setColumnStretch(1, 1)
        api.changed.connect(self.refresh)
        self.refresh()

    def _field(self, grid: QGridLayout, row: int, label: str) -> QLineEdit:
        grid.addWidget(QLabel(label), row, 0)
        box = QLineEdit()
        box.setReadOnly(True)
        grid.addWidget(box, row, 1)
        return box

    def _button(self, grid: QGridLayout, row: int, col: int, text: str, slot) -> QPushButton:
        b = QPushButton(text)
        b.clicked.connect(slot)
        grid.addWidget(b, row, col)
        return b

    def _copy(self, text: str) -> None:
        QGuiApplication.clipboard().setText(text)

    def _show_key(self, shown: bool) -> None:
        self.key.setEchoMode(QLineEdit.Normal if shown else QLineEdit.Password)
        self.show_key.setText("Hide" if shown else "Show")

    def showEvent(self, e):
        self.refresh()                              # the key is made on first use: opening the panel
        super().showEvent(e)

    def refresh(self) -> None:
        api = self.api
        known = api.server is not None or api.port != 0             # port 0: the server picks one
        self.url.setText(api.url if known else "(a free port is picked when it starts)")
        self.copy_url.setEnabled(known)
        if self.isVisible():
            self.key.setText(api.key())
        self.status.setText(api.message)
        self.status.setObjectName("errorLabel" if api.error else "muted")
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)
        self.toggle.setText("Stop" if api.state in (RUNNING, STOPPING) else "Start")
        self.toggle.setEnabled(api.action.isEnabled())
        self.port.setEnabled(api.state == STOPPED)
