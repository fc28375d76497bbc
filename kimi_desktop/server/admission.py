"""Queueing and cancellation shared by every API: an admission limit on waiting requests, the
engine's blocking event stream turned into an async one, and cancel-on-disconnect.

The engine runs one generation at a time and queues the rest in FIFO order (chat.FifoLock); the
server only caps how many may wait (503 with Retry-After beyond it). A client that goes away
cancels its stream: a running generation stops before its next token, a waiting one leaves the queue.
"""

from __future__ import annotations

import asyncio
import threading

from kimi_desktop.chat import Finish, Usage

from .errors import APIError

RETRY_AFTER_S = 2


class Admission:
    """The admission limit: a request is refused (503) when `max_queue` requests already wait behind
    the running one. Counts the streams this server started that have not finished, so a request
    leaves the count when its generation ends, whatever happened to its connection. `cancel_all()`
    is for shutdown."""

    def __init__(self, max_queue: int = 16):
        self.max_queue = int(max_queue)
        self._lock = threading.Lock()
        self._active: set = set()

    def admit(self, start):
        """`start()` -> a ChatStream (it may raise ChatRequestError); APIError 503 when full."""
        with self._lock:
            self._active = {s for s in self._active if not s.finished.is_set()}
            if len(self._active) > self.max_queue:       # one runs, max_queue wait
                raise APIError(503, f"the server is busy: {len(self._active) - 1} requests are already "
                                    f"waiting (--max-queue {self.max_queue}); retry shortly", None,
                               "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            stream = start()
            self._active.add(stream)
        return stream

    def held(self) -> int:
        with self._lock:
            return sum(1 for s in self._active if not s.finished.is_set())

    def cancel_all(self) -> None:
        with self._lock:
            streams = list(self._active)
        for s in streams:
            s.cancel()


async def events(stream):
    """Async iteration over a ChatStream: the engine's worker hands each event to the event loop
    (ChatStream.relay), so no thread sits between them. A worker error is re-raised here; text that
    arrives after a cancel is dropped, as ChatStream's own iterator does."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def deliver(item) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:                    # the loop has closed (server shut down)
            stream.cancel()

    stream.relay(deliver)
    while True:
        item = await q.get()
        if item is None:
            if stream.error is not None:
                raise stream.error
            return
        if stream.cancelled and not isinstance(item, (Usage, Finish)):
            continue
        yield item


async def watch_disconnect(receive, stream) -> None:
    """Cancel `stream` when the client disconnects (run as a task beside a non-streamed answer;
    the request body has been read, so the next message is the disconnect)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            stream.cancel()
            return
