"""What every API's routes share: admitting a generation, gathering its events for a plain answer,
and sending them as server-sent events; a client that goes away cancels its generation.

    stream = await start(request, lambda: engine.chat(...))      # 503 when the queue is full
    turn = Turn(request, stream, "chatcmpl", body.model)
    await gather(request, turn, on_event)                           # plain answer
    StreamingResponse(streamed(turn, chunks, encode=sse, done=DONE, on_error=...))   # SSE answer

The API modules only turn chat-API events into their own shapes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from anyio import to_thread
from fastapi import Request

from kimi_desktop.chat import Finish, Usage

from .admission import events, watch_disconnect
from .errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def generation_defaults(engine) -> dict:
    """The engine's sampling defaults (its model's generation_config.json), {} when it has none."""
    get = getattr(engine, "generation_defaults", None)
    return get() if callable(get) else {}


async def start(request: Request, begin):
    """Admit and start a generation (rendering and tokenizing run off the event loop)."""
    st = request.app.state.kimi
    return await to_thread.run_sync(st.admission.admit, begin)


class Turn:
    """What one generation produced, gathered from its events, plus the response's identity
    (id: prefix-HEX, or prefixHEX for a prefix ending in "_" as Anthropic's msg_...)."""

    def __init__(self, request: Request, stream, prefix: str, model: str | None):
        st = request.app.state.kimi
        self.stream = stream
        self._metrics = st.metrics
        self.id = f"{prefix}{'' if prefix.endswith('_') else '-'}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model or st.model_name
        self.fingerprint = st.fingerprint
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.ended_at: float | None = None

    def see(self, ev) -> None:
        if isinstance(ev, Usage):
            self.usage = ev
            self._metrics.add_usage(ev)
        elif isinstance(ev, Finish):
            self.finish = ev.reason
            self.ended_at = time.monotonic()

    @property
    def tokens(self) -> Usage:
        return self.usage or Usage(0, 0, 0)

    def timings(self) -> dict:
        """llama-server's `timings`: prompt_* covers the prefill (start of the turn to the first token),
        predicted_* the tokens after the first."""
        s, u = self.stream, self.tokens
        begin = s.started_at or s.queued_at
        end = self.ended_at or time.monotonic()
        first = s.first_token_at or end
        prompt_n, prompt_s = u.prompt_tokens - u.cached_prompt_tokens, max(first - begin, 0.0)
        gen_n, gen_s = max(u.completion_tokens - 1, 0), max(end - first, 0.0)
        return {"cache_n": u.cached_prompt_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_s * 1e3,
                "prompt_per_token_ms": prompt_s * 1e3 / prompt_n if prompt_n else None,
                "prompt_per_second": prompt_n / prompt_s if prompt_n and prompt_s > 0 else None,
                "predicted_n": u.completion_tokens, "predicted_ms": gen_s * 1e3,
                "predicted_per_token_ms": gen_s * 1e3 / gen_n if gen_n else None,
                "predicted_per_second": gen_n / gen_s if gen_n and gen_s > 0 else None}


def sse(obj: Any, event: str | None = None) -> bytes:
    """One server-sent event: `data: JSON` (with an `event:` line when named, as Anthropic's)."""
    data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    return data if event is None else b"event: " + event.encode() + b"\n" + data


async def gather(request: Request, turn: Turn, on_event: Callable[[Any], None]) -> None:
    """Consume a stream for a non-streamed answer; a client that disconnects cancels it."""
    watcher = asyncio.create_task(watch_disconnect(request.receive, turn.stream))
    try:
        async for ev in events(turn.stream):
            turn.see(ev)
            on_event(ev)
    finally:
        watcher.cancel()
        if turn.finish is None:
            turn.stream.cancel()
    if turn.finish == "cancelled":
        raise APIError(503, "the request was cancelled (the server is stopping)", None, "cancelled")


async def streamed(turn: Turn, chunks: Callable[[Any], list[bytes]], on_error: Callable[[Exception], bytes],
                   done: bytes | None = None, head: bytes = b"") -> AsyncIterator[bytes]:
    """An SSE body: `head` at once (before the first token), then `chunks(ev)` -> encoded events to
    send; `done` ends a complete stream; a worker error becomes `on_error(e)` in-band (the status line
    has gone). A cancelled generation just ends. Leaving early (the client disconnected: Starlette
    cancels this) cancels the generation."""
    try:
        if head:
            yield head
        async for ev in events(turn.stream):
            turn.see(ev)
            for data in chunks(ev):
                yield data
            if turn.finish == "cancelled":
                return
        if done is not None:
            yield done
    except Exception as e:                      # noqa: BLE001 - the stream is open: report in-band
        yield on_error(e)
    finally:
        if turn.finish is None:
            turn.stream.cancel()
