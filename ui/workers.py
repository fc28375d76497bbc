"""Work off the UI thread: reading a ChatStream, loading a model. Results come back to the UI thread
through queued signals; stream events are batched (one `pending` signal is outstanding at a time,
however fast tokens come; the UI takes everything that piled up with take())."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal

__all__ = ["StreamWorker", "StreamEnd", "BackgroundCall", "Poller", "favour_the_ui_thread"]

UI_SWITCH_INTERVAL_S = 0.001


def favour_the_ui_thread() -> None:
    """Hand the GIL around every 1 ms instead of Python's 5 ms. PySide releases the GIL in each Qt call
    and the UI thread must take it back to run the next line of Python (or a Python override Qt calls:
    resizeEvent, a slot); while a worker computes (the engine's sampler, Pygments compiling a lexer)
    each such take can wait a whole interval, and one answer refresh makes dozens (stalls 3-5x the
    UI thread's own CPU time). Process-wide; the workers lose nothing measurable."""
    sys.setswitchinterval(min(sys.getswitchinterval(), UI_SWITCH_INTERVAL_S))


class StreamEnd:
    """The last item a StreamWorker delivers: the stream ended (error: the exception, or None)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class _Bridge(QObject):
    pending = Signal()          # events are waiting in StreamWorker.take(); emitted from the worker thread


class StreamWorker:
    """Iterates `stream` on a daemon thread; `on_pending` runs on the UI thread (queued) when there is
    something to take()."""

    def __init__(self, stream, on_pending: Callable[[], None]):
        self.stream = stream
        self._lock = threading.Lock()
        self._items: list[Any] = []
        self._signalled = False
        self._bridge = _Bridge()
        self._bridge.pending.connect(on_pending, Qt.QueuedConnection)
        self.thread = threading.Thread(target=self._run, name="kimi-ui-stream", daemon=True)

    def start(self) -> StreamWorker:
        self.thread.start()
        return self

    def _push(self, item) -> None:
        with self._lock:
            self._items.append(item)
            if self._signalled:
                return
            self._signalled = True
        self._bridge.pending.emit()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                self._push(ev)
        except BaseException as e:          # reported in the chat, never raised into Qt
            self._push(StreamEnd(e))
            return
        self._push(StreamEnd())

    def take(self) -> list[Any]:
        with self._lock:
            items, self._items, self._signalled = self._items, [], False
        return items

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


class BackgroundCall(QObject):
    """Runs `work(progress)` on a thread (a model load, tool calls): done(result) or failed(problem,
    details), queued to the thread this object lives in; progress(text) reports what it is doing."""

    done = Signal(object)           # what work() returned
    failed = Signal(str, str)       # one-line problem, traceback (for a "details" view, not the dialog)
    progress = Signal(str)

    def __init__(self, work: Callable[[Callable[[str], None]], Any], parent: QObject | None = None):
        super().__init__(parent)
        self._work = work
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="kimi-ui-call", daemon=True)

    def start(self) -> BackgroundCall:
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._work(self.progress.emit)
        except BaseException as e:                  # noqa: BLE001 - every failure becomes a message
            self.failed.emit(_problem(e), traceback.format_exc())
            return
        self.done.emit(result)


def _problem(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory (a smaller expert cache or context leaves more)"
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    return first if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {first}"


class Poller(QObject):
    """Calls `sample()` every `interval_s` on a thread (engine.stats() and psutil take tens of ms on a
    busy machine: not the UI thread's time); each result arrives as `sampled(dict)`, queued."""

    sampled = Signal(dict)

    def __init__(self, sample: Callable[[], dict], interval_s: float, parent: QObject | None = None):
        super().__init__(parent)
        self._sample, self.interval_s = sample, interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kimi-ui-status", daemon=True)

    def start(self) -> Poller:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                snap = self._sample()
            except Exception:                   # an engine closing under us: skip this sample
                continue
            if not self._stop.is_set():
                self.sampled.emit(snap)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2.0)
