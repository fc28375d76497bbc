"""The window check of packaging/build.py: the bundled app under Xvfb (Linux; needs Xvfb, xdotool and
ImageMagick's `import`). Launch `kimi-desktop --demo`, wait for the window and for the demo model, type a
message, wait for the answer to settle, save a screenshot, close the window as a window manager would
(a WM_DELETE_WINDOW message: the app's own close path runs) and require exit status 0."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import time
from pathlib import Path

SCREEN = "1600x1000x24"
TITLE = "Kimi Desktop"
BOTTOM_PX = 140          # the message box and the status row (a blinking cursor, live numbers): not compared


class Failed(Exception):
    """A smoke check failed: the message is the one line build.py prints."""


def start_xvfb(log: Path) -> tuple[subprocess.Popen, str]:
    """Xvfb on a display it picks itself (-displayfd): no clash with a display already running."""
    r, w = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", SCREEN, "-nolisten", "tcp"],
                            pass_fds=(w,), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    os.close(w)
    with os.fdopen(r) as f:
        number = f.readline().strip()
    if not number.isdigit():
        proc.kill()
        raise Failed(f"Xvfb did not start ({log})")
    return proc, f":{number}"


def xdotool(env: dict, *args: str) -> str:
    r = subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def find_window(env: dict, proc: subprocess.Popen, t0: float, timeout: float) -> tuple[str, float]:
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise Failed(f"the app exited {proc.returncode} before its window appeared")
        found = xdotool(env, "search", "--onlyvisible", "--name", f"^{TITLE}$").split()
        if found:
            return found[0], time.monotonic() - t0
        time.sleep(0.05)
    raise Failed(f"no window titled {TITLE!r} after {timeout:.0f} s")


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, t0: float, timeout: float) -> float:
    while time.monotonic() - t0 < timeout:
        content = log.read_text(errors="replace")
        if "could not load" in content:
            raise Failed("the app: " + next(ln for ln in content.splitlines() if "could not load" in ln))
        if text in content:
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise Failed(f"the app exited {proc.returncode} before logging {text!r} ({log})")
        time.sleep(0.05)
    raise Failed(f"the app did not log {text!r} within {timeout:.0f} s ({log})")


def shot(env: dict, win: str, path: Path, crop: str | None = None) -> bytes:
    args = ["import", "-window", win] + (["-crop", crop] if crop else []) + [f"png:{path}"]
    if subprocess.run(args, env=env, capture_output=True, timeout=60).returncode != 0:
        raise Failed(f"ImageMagick import could not capture window {win}")
    return path.read_bytes()


def wait_settled(env: dict, win: str, tmp: Path, timeout: float) -> float:
    """Seconds until the chat area (the window less its bottom) stops changing for a second."""
    geo = dict(ln.strip().split("=", 1) for ln in xdotool(env, "getwindowgeometry", "--shell", win).splitlines()
               if "=" in ln)
    crop = f"{geo.get('WIDTH', 1180)}x{int(geo.get('HEIGHT', 780)) - BOTTOM_PX}+0+0"
    t0 = time.monotonic()
    before = shot(env, win, tmp, crop)
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now = shot(env, win, tmp, crop)
        if now == before:
            return time.monotonic() - t0 - 1.0
        before = now
    raise Failed(f"the chat did not settle within {timeout:.0f} s of sending the message")


def close_window(display: str, win: str) -> None:
    """What a window manager sends when the user clicks the close button (xdotool has no such command)."""
    x11 = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]

    class ClientMessage(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                    ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                    ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]

    class XEvent(ctypes.Union):
        _fields_ = [("xclient", ClientMessage), ("pad", ctypes.c_long * 24)]

    x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                               ctypes.POINTER(XEvent)]
    d = x11.XOpenDisplay(display.encode())
    if not d:
        raise Failed(f"cannot open X display {display}")
    ev = XEvent()
    ev.xclient.type = 33                                    # ClientMessage
    ev.xclient.window = int(win)
    ev.xclient.message_type = x11.XInternAtom(d, b"WM_PROTOCOLS", 0)
    ev.xclient.format = 32
    ev.xclient.data[0] = x11.XInternAtom(d, b"WM_DELETE_WINDOW", 0)
    ok = x11.XSendEvent(d, int(win), 0, 0, ctypes.byref(ev))
    x11.XFlush(d)
    x11.XCloseDisplay(d)
    if not ok:
        raise Failed("XSendEvent(WM_DELETE_WINDOW) failed")


def run_window_check(exe: Path, env: dict, screenshot: Path, work: Path, prompt: str, timeout: float) -> dict:
    missing = [t for t in ("Xvfb", "xdotool", "import") if shutil.which(t) is None]
    if missing:
        raise Failed(f"the window check needs {', '.join(missing)} (apt-get install xvfb xdotool imagemagick), "
                     f"or pass --no-window")
    xvfb, display = start_xvfb(work / "xvfb.log")
    env = dict(env, DISPLAY=display, QT_QPA_PLATFORM="xcb")
    log = work / "app.log"
    app = None
    try:
        t0 = time.monotonic()
        app = subprocess.Popen([str(exe), "--demo"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        win, window_s = find_window(env, app, t0, 120)
        model_s = wait_for_line(log, "model: ", app, t0, timeout)
        print(f"   window shown {window_s:.2f} s after launch; demo model loaded at {model_s:.2f} s")
        xdotool(env, "windowfocus", "--sync", win)
        xdotool(env, "type", "--delay", "10", prompt)
        xdotool(env, "key", "Return")
        answer_s = wait_settled(env, win, work / "settle.png", 300)
        shot(env, win, screenshot)
        print(f"   answer settled {answer_s:.2f} s after sending; screenshot {screenshot}")
        t_close = time.monotonic()
        close_window(display, win)
        try:
            rc = app.wait(30)
        except subprocess.TimeoutExpired:
            raise Failed("the app did not exit within 30 s of its window being closed") from None
        close_s = time.monotonic() - t_close
        text = log.read_text(errors="replace")
        if rc != 0 or "Traceback" in text:
            raise Failed(f"the app exited {rc} after its window closed" + (" with a traceback" if "Traceback" in text
                                                                           else "") + f" ({log})")
        print(f"   closed: exit 0 in {close_s:.2f} s")
        return {"window_shown_s": window_s, "window_model_loaded_s": model_s, "window_answer_s": answer_s,
                "window_close_s": close_s}
    finally:
        if app is not None and app.poll() is None:
            app.kill()
            app.wait()
        xvfb.terminate()
        xvfb.wait(10)
