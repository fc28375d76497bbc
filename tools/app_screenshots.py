"""The README's app pictures with live status figures: the window shows the tests' sample conversation,
and the status row and chart come from a real generation just before, on a K2-sized model streaming
its experts (e.g. `kimi-desktop make-test-model OUT --preset k2-slice`: K2's exact dimensions, one
dense and one MoE layer, random weights).

    QT_QPA_PLATFORM=offscreen python tools/app_screenshots.py MODEL [--expert-cache-gb G] [--tokens N]

Writes docs/app-light.png and docs/app-dark.png. Not a test: the model is 15 GB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PySide6.QtWidgets import QApplication  # noqa: E402

from kimi_desktop.conversations import ConversationStore  # noqa: E402
from kimi_desktop.engines.native import NativeEngine  # noqa: E402
from kimi_desktop.ui.controller import Controller  # noqa: E402
from kimi_desktop.ui.main_window import MainWindow  # noqa: E402
from kimi_desktop.ui.markdown_render import wait_highlighted  # noqa: E402
from kimi_desktop.ui.theme import DARK, LIGHT, apply_theme  # noqa: E402
from tests.ui.sample_conversation import fill  # noqa: E402


def pump(app: QApplication, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--expert-cache-gb", type=float, default=2.0)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    engine = NativeEngine(args.model, ctx=4096, expert_cache_gb=args.expert_cache_gb)
    label = "Kimi-K2 slice (INT4, experts from NVMe)"
    with tempfile.TemporaryDirectory() as tmp:
        for theme in (LIGHT, DARK):
            apply_theme(app, theme)
            store = ConversationStore(Path(tmp) / f"{theme.name}.sqlite3")
            c = Controller(store, engine, label)
            w = MainWindow(c, theme)
            w.resize(1200, 820)
            w.show()
            warm = c.new_conversation("warm-up")        # the live figures: one real answer
            c.set_settings("", {"temperature": 0.0, "max_tokens": args.tokens})
            c.send("Which of my Python files are the largest?")
            while c.busy:
                pump(app, 0.05)
            pump(app, 1.0)                              # a last status sample after the answer
            cid = fill(store)
            c.open_conversation(cid)
            c.delete(warm)
            c.conversationsChanged.emit()
            w.chat.widgets[-1].reasoning_toggle.click()
            w.input.setPlainText("")
            wait_highlighted()
            pump(app, 0.5)
            w.chat.scroll_to_bottom()
            pump(app, 0.1)
            out = REPO / "docs" / f"app-{theme.name}.png"
            assert w.grab().toImage().save(str(out))
            print(f"wrote {out}", flush=True)
            c.engine = None                             # the engine outlives this window
            w.close()
            store.close()
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
