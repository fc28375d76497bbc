"""The app's controller as a process of its own, for the kill -9 test: on the scripted engine over a
checkpoint, it answers one message, then streams a long answer slowly and prints
"STREAMING <chars>" once the store holds a part of it (then keeps streaming until it is killed).

    python -m tests.ui.stream_app CHECKPOINT DB
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

FIRST = "<think>easy</think>The first answer.<|im_end|>"
LONG = "<think>Counting slowly.</think>" + "".join(f" n{i}" for i in range(600)) + "<|im_end|>"


def main(ckpt: str, db: str) -> int:
    from PySide6.QtCore import QCoreApplication

    from kimi_desktop.conversations import ConversationStore
    from kimi_desktop.engines.native import NativeEngine
    from kimi_desktop.ui.controller import Controller
    from tests.kimi_desktop.server.helpers import ScriptedSession

    app = QCoreApplication(sys.argv[:1])
    engine = NativeEngine(ckpt)
    sess = engine.session = ScriptedSession(engine.vocab)
    engine.pool = None                                  # every request on the scripted session
    c = Controller(ConversationStore(db), engine, "scripted")

    def script(text: str, delay: float) -> None:
        sess.script, sess.delay = engine.tokenizer.encode(text), delay

    def second(index: int, reason: str) -> None:
        c.answerFinished.disconnect(second)
        script(LONG, 0.02)
        c.send("count to six hundred")
        c.answerUpdated.connect(announce)

    def announce(index: int) -> None:
        w = c.turn.writer if c.turn is not None else None
        if w is not None and w.writes >= 2 and w.written_chars:
            c.answerUpdated.disconnect(announce)
            print(f"STREAMING {w.written_chars}", flush=True)

    script(FIRST, 0.0)
    c.answerFinished.connect(second)
    c.send("first question")
    return app.exec()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
