"""kill -9 of the app while an answer streams: the database opens cleanly, every finished message is
there, and the half-streamed answer is there up to a recent point, marked incomplete."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi_desktop.conversations import ConversationStore

from .stream_app import LONG

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_9_while_streaming_keeps_a_clean_database(tiny_int4, tmp_path):
    db = tmp_path / "conversations.sqlite3"
    p = subprocess.Popen([sys.executable, "-m", "tests.ui.stream_app", str(tiny_int4), str(db)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    try:
        line = p.stdout.readline()
        assert line.startswith("STREAMING"), (line, p.stderr.read() if p.poll() is not None else "")
        written = int(line.split()[1])
        time.sleep(0.7)                             # more is written meanwhile (every 0.5 s)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL

    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    raw.close()
    store = ConversationStore(db)
    try:
        (conv,) = store.conversations()
        msgs = store.messages(conv.id)
        assert [(m.role, m.content, m.complete) for m in msgs[:3]] == [
            ("user", "first question", True), ("assistant", "The first answer.", True),
            ("user", "count to six hundred", True)]
        assert msgs[1].reasoning == "easy"
        partial = msgs[3]
        assert partial.role == "assistant" and not partial.complete and partial.finish == ""
        full = LONG.split("</think>")[1].replace("<|im_end|>", "")
        assert partial.reasoning == "Counting slowly."
        assert full.startswith(partial.content) and written < len(partial.content) < len(full)
        assert store.search("n5")                   # the index survived too
    finally:
        store.close()
