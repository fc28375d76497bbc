"""Progress notes for the person waiting: logged to the `kimi_desktop` logger, which the CLI shows
on stderr (one plain line each) and the server and app can route where they like."""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager

log = logging.getLogger("kimi_desktop")

COMPILE_NOTICE = ("compiling the numba kernels for this machine: a one-time wait of a minute or two "
                  "(later starts load them from numba's cache in seconds)")


@contextmanager
def notice_if_slow(message: str, after_s: float = 2.0):
    """Log `message` once if the block is still running after `after_s` seconds."""
    timer = threading.Timer(after_s, log.info, (message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def warm_up(model, after_s: float = 2.0) -> float:
    """model.warmup() (kernel compile or cache load), telling the user when it is the slow first time."""
    with notice_if_slow(COMPILE_NOTICE, after_s):
        return model.warmup()


def show_on_stderr(level: int = logging.INFO) -> None:
    """Print the project's notices as plain lines on stderr (the CLI; stdout stays the output)."""
    if not any(getattr(h, "_kimi_cli", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._kimi_cli = True
        log.addHandler(h)
    log.setLevel(level)
