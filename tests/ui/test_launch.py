"""`kimi-desktop` and `kimi-desktop --demo` open the window (a subprocess, offscreen, with its own data
and cache folders); --demo loads the demo model on a worker thread while the window is up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch(args, tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.Popen([sys.executable, "-m", "kimi_desktop", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(p, needle: str, timeout: float = 120.0) -> list[str]:
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen; stderr: {lines}")


def test_the_bare_command_opens_the_window(tmp_path):
    p = launch([], tmp_path)
    try:
        lines = read_until(p, "window ready in")
        assert p.poll() is None                             # the event loop runs
        assert (tmp_path / "data" / "kimi-desktop" / "conversations.sqlite3").exists()
        assert not any("Traceback" in x for x in lines)
    finally:
        p.kill()
        p.wait(10)


def test_demo_opens_the_window_then_loads_the_demo_model(tmp_path):
    p = launch(["--demo"], tmp_path)
    try:
        lines = read_until(p, "window ready in")
        lines += read_until(p, "model: demo")
        assert p.poll() is None
        assert not any("Traceback" in x for x in lines)
    finally:
        p.kill()
        p.wait(10)


def test_garbage_is_collected_on_the_ui_thread(qtbot):
    """The app turns automatic collection off (a worker thread's collection would destroy Qt objects
    off the UI thread) and collects from a UI-thread timer instead: cycles made on a worker are freed
    there, on the UI thread."""
    import gc
    import threading
    import weakref

    from PySide6.QtCore import QObject
    from kimi_desktop.ui.app import UiThreadGc

    freed_on = []

    class Cycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            freed_on.append(threading.current_thread() is threading.main_thread())

    parent = QObject()
    collector = UiThreadGc(parent, interval_ms=10)
    try:
        assert not gc.isenabled()
        refs = []

        def work():                         # allocate well past the gen-0 threshold, on a worker
            for _ in range(5 * collector.thresholds[0]):
                refs.append(weakref.ref(Cycle()))
        t = threading.Thread(target=work)
        t.start()
        t.join()
        qtbot.waitUntil(lambda: all(r() is None for r in refs), timeout=5000)
        assert freed_on and all(freed_on)   # every cycle was freed by the UI thread's timer
    finally:
        collector.timer.stop()
        gc.enable()


def test_a_long_session_of_qt_calls_keeps_none_alive(tmp_path):
    """PySide6 6.12 on CPython 3.11 loses a reference to None in every Qt call that returns None; the
    app gives None a count no session spends. 20,000 setHtml calls (a few hours of streaming) abort
    the interpreter without it. A subprocess: an abort must not take the test run with it."""
    code = ("import kimi_desktop.ui, sys\n"
            "from PySide6.QtWidgets import QApplication, QTextBrowser\n"
            "app = QApplication([]); b = QTextBrowser(); r0 = sys.getrefcount(None)\n"
            "for n in range(20000): b.setHtml(f'<p>{n}</p>')\n"
            "print('ok', r0 - sys.getrefcount(None))\n")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
