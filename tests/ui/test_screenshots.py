"""The main window with a real conversation (reasoning, a code block, a tool call and its result, the
status row with figures), light and dark, rendered to PNG. The README's pictures come from
tools/app_screenshots.py (the same window, with live figures from a real run on a K2-sized model);
KIMI_DESKTOP_WRITE_SCREENSHOTS=1 writes this test's (sample figures) to docs/ instead."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtWidgets import QApplication

from kimi_desktop.ui.controller import Controller
from kimi_desktop.ui.main_window import MainWindow
from kimi_desktop.ui.markdown_render import wait_highlighted
from kimi_desktop.ui.theme import DARK, LIGHT, apply_theme

from .sample_conversation import CHART, STATUS, fill

DOCS = Path(__file__).resolve().parents[2] / "docs"


def render(qtbot, store, theme, path: Path) -> Path:
    app = QApplication.instance()
    apply_theme(app, theme)
    c = Controller(store, status_interval_s=0)
    w = MainWindow(c, theme)
    qtbot.addWidget(w)
    cid = fill(store)
    c.open_conversation(cid)
    c.conversationsChanged.emit()
    last = w.chat.widgets[-1]
    last.reasoning_toggle.click()                      # one reasoning section open, one closed
    for tok_s, hit in CHART:
        w.status.chart.add(tok_s, hit)
    w.status.show_status(STATUS)
    c.modelChanged.emit("Kimi-K2-Thinking")
    w.input.setPlainText("")
    w.resize(1200, 820)
    w.show()
    qtbot.waitExposed(w)
    assert wait_highlighted()
    qtbot.wait(400)                                    # highlighted blocks render again
    w.chat.scroll_to_bottom()
    qtbot.wait(50)
    img = w.grab().toImage()
    assert img.save(str(path))
    c.shutdown()
    w.close()
    return path


def distinct_colours(img, step: int = 7) -> int:
    return len({img.pixel(x, y) for x in range(0, img.width(), step) for y in range(0, img.height(), step)})


def test_main_window_light_and_dark(qtbot, tmp_path):
    from kimi_desktop.conversations import ConversationStore
    out = DOCS if os.environ.get("KIMI_DESKTOP_WRITE_SCREENSHOTS") == "1" else tmp_path
    images = {}
    for theme in (LIGHT, DARK):
        store = ConversationStore(tmp_path / f"{theme.name}.sqlite3")
        path = render(qtbot, store, theme, out / f"app-{theme.name}.png")
        from PySide6.QtGui import QImage
        images[theme.name] = img = QImage(str(path))
        assert img.width() == 1200 and img.height() == 820
        assert distinct_colours(img) > 40                # text, highlighting, cards: not a blank window
    # dark is dark: the chat background (centre right, below the header) differs in lightness
    light, dark = (images[n].pixelColor(700, 120).lightness() for n in ("light", "dark"))
    assert light > 200 and dark < 80
    apply_theme(QApplication.instance(), LIGHT)
