"""The chat API every engine speaks (design.md section 5); the server and the UI use only this.

    engine = open_engine("native", path)               # kimi_desktop.engines
    stream = engine.chat(messages, tools=None, tool_choice="auto", sampling=Sampling(max_tokens=256))
    for ev in stream:                                    # ReasoningDelta, ContentDelta, ToolCallDelta,
        ...                                              # TokenLogprobs (if asked), then Usage, Finish
    stream.cancel()                                      # any thread; takes effect before the next token
    engine.stats(); engine.waiting(); engine.close()

Requests are validated before anything runs: a bad one raises ChatRequestError (a ValueError) whose
`.param` names the offending request field (OpenAI's error `param`).
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable
from collections.abc import Iterator, Mapping, Sequence

from kimi_desktop.runtime.events import (ContentDelta, Event, Finish, PrefillProgress, ReasoningDelta, TokenLogprobs,
                                         ToolCallDelta, Usage)
from kimi_desktop.runtime.sampling import SamplerConfig, SamplingError, check_integer

__all__ = [
    "ChatRequestError", "ChatResult", "ChatStream", "ContentDelta", "Engine", "Event", "FifoLock",
    "Finish", "PrefillProgress", "ReasoningDelta", "Sampling", "TokenLogprobs", "ToolCallDelta", "Usage",
    "FINISH_REASONS", "StopMatcher", "validate_request", "count_history_tool_calls", "parse_tool_arguments",
]

FINISH_REASONS = ("stop", "length", "tool_calls", "cancelled")
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")      # OpenAI's rule; K2 ids are functions.NAME:IDX
ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatRequestError(ValueError):
    """A request the engine will not run; `param` names the request field (e.g. "temperature")."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------------------------
# Sampling settings

@dataclass
class Sampling(SamplerConfig):
    """Generation settings: the sampler's (runtime/sampling.py's SamplerConfig: temperature, top_p,
    top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, repetition_last_n, seed)
    and the request's own below; field names are the OpenAI request's, plus top_k, min_p,
    repetition_penalty, repetition_last_n and max_reasoning_tokens. None = the default.

    max_reasoning_tokens: after that many tokens inside the think block the engine forces </think>
    and the model answers (0: the block is closed at once, `<think></think>`); a no-op for a model
    without think tokens. None: no cap but max_tokens (constrained modes keep half the budget).
    parallel_tool_calls: False allows at most one tool call per turn (OpenAI's parallel_tool_calls,
    Anthropic's disable_parallel_tool_use)."""
    max_tokens: int | None = None           # None: until the context is full
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None         # 0..20, needs logprobs
    response_format: Mapping[str, Any] | None = None    # {"type": "text" | "json_object" | "json_schema", ...}
    max_reasoning_tokens: int | None = None     # cap on tokens inside <think>; None: see above
    parallel_tool_calls: bool = True

    # fields a checkpoint's generation_config.json may set (engine.generation_defaults())
    DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

    @classmethod
    def from_openai(cls, body: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Sampling:
        """The sampling fields of an OpenAI chat request body (others are ignored);
        max_completion_tokens is read as max_tokens; None values mean the default: the model's
        (`defaults`, from engine.generation_defaults(): only DEFAULTABLE fields), else Sampling's."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in (defaults or {}).items() if k in cls.DEFAULTABLE and v is not None}
        kw.update((k, v) for k, v in body.items() if k in names and v is not None)
        if body.get("max_completion_tokens") is not None and "max_tokens" not in kw:
            kw["max_tokens"] = body["max_completion_tokens"]
        return cls(**kw)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self) -> None:
        """Raise ChatRequestError naming the first bad field (the sampler's fields by its validator)."""
        try:
            super().validate()
            check_integer("max_tokens", self.max_tokens, 1)
            check_integer("max_reasoning_tokens", self.max_reasoning_tokens, 0)
            check_integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        except SamplingError as e:
            raise ChatRequestError(str(e), e.field) from None
        if not isinstance(self.parallel_tool_calls, bool):
            raise ChatRequestError(f"parallel_tool_calls must be true or false, got {self.parallel_tool_calls!r}",
                                   "parallel_tool_calls")
        if not isinstance(self.logprobs, bool):
            raise ChatRequestError(f"logprobs must be true or false, got {self.logprobs!r}", "logprobs")
        if self.top_logprobs and not self.logprobs:
            raise ChatRequestError("top_logprobs needs logprobs: true", "top_logprobs")
        stop = self.stop
        if stop is not None:
            items = [stop] if isinstance(stop, str) else stop
            if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
                raise ChatRequestError("stop must be a string or a list of strings", "stop")
            if len(items) > MAX_STOP_STRINGS:
                raise ChatRequestError(f"stop may have at most {MAX_STOP_STRINGS} strings", "stop")
            if any(s == "" for s in items):
                raise ChatRequestError("stop strings must not be empty", "stop")
        response_format_kind(self.response_format)


def response_format_kind(rf: Any) -> tuple[str, Mapping | None]:
    """("text" | "json_object" | "json_schema", schema or None); ChatRequestError for a bad value."""
    if rf is None:
        return "text", None
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise ChatRequestError('response_format must be an object like {"type": "json_object"}',
                               "response_format")
    kind = rf["type"]
    if kind in ("text", "json_object"):
        schema = rf.get("schema")           # llama-cpp-python's json_object + schema
        if schema is not None and not isinstance(schema, Mapping):
            raise ChatRequestError("response_format.schema must be an object", "response_format")
        return kind, schema
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping):
            raise ChatRequestError('response_format json_schema needs {"json_schema": {"name": ..., '
                                   '"schema": {...}}}', "response_format")
        schema = js.get("schema", {})
        if not isinstance(schema, Mapping):
            raise ChatRequestError("response_format.json_schema.schema must be an object", "response_format")
        return kind, schema
    raise ChatRequestError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                           "response_format")


# ---------------------------------------------------------------------------------------------
# Request validation shared by engines

def validate_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatRequestError("messages must be a list of message objects", "messages")
    if not messages:
        raise ChatRequestError("messages must not be empty", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ChatRequestError(f"{where} must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise ChatRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        c = m.get("content")
        if c is not None and not isinstance(c, str):
            if not isinstance(c, Sequence) or not all(isinstance(p, Mapping) for p in c):
                raise ChatRequestError(f"{where}.content must be a string, null or a list of content "
                                       f"parts", "messages")
        tcs = m.get("tool_calls")
        if tcs is not None:
            if role != "assistant" or not isinstance(tcs, Sequence) or isinstance(tcs, (str, bytes)):
                raise ChatRequestError(f"{where}.tool_calls must be a list on an assistant message",
                                       "messages")
            for j, tc in enumerate(tcs):
                fn = tc.get("function") if isinstance(tc, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) \
                        or not isinstance(fn.get("arguments", ""), (str, Mapping)):
                    raise ChatRequestError(f"{where}.tool_calls[{j}] must be {{id, type, function: "
                                           f"{{name, arguments}}}}", "messages")


def validate_tools(tools: Any) -> list[dict]:
    """The tools list normalised to [{"name", "parameters"}] (for constraints); ChatRequestError if bad."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatRequestError("tools must be a list of tool objects", "tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise ChatRequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}',
                                   "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise ChatRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', "
                                   f"got {name!r}", "tools")
        if name in names:
            raise ChatRequestError(f"tools[{i}].function.name {name!r} is declared twice", "tools")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ChatRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append({"name": name, "parameters": params})
    return out


def tool_choice_kind(tool_choice: Any, tools: list[dict]) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", name); ChatRequestError if bad."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ChatRequestError(f"tool_choice must be auto, none, required or "
                                   f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r}',
                                   "tool_choice")
        if tool_choice == "required" and not tools:
            raise ChatRequestError('tool_choice "required" needs tools', "tool_choice")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ChatRequestError('tool_choice must be auto, none, required or {"type": "function", '
                               '"function": {"name": ...}}', "tool_choice")
    name = fn["name"]
    if name not in {t["name"] for t in tools}:
        raise ChatRequestError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    return "named", name


def validate_request(messages: Any, tools: Any, tool_choice: Any, sampling: Sampling | None):
    """Everything an engine checks before queuing: returns (sampling, tools_norm, (choice, name),
    (format_kind, schema))."""
    sampling = sampling if sampling is not None else Sampling()
    if not isinstance(sampling, Sampling):
        raise ChatRequestError("sampling must be a Sampling", "sampling")
    validate_messages(messages)
    norm = validate_tools(tools)
    choice = tool_choice_kind(tool_choice, norm)
    sampling.validate()
    fmt = response_format_kind(sampling.response_format)
    return sampling, norm, choice, fmt


def count_history_tool_calls(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tool calls made so far in the conversation (K2's running IDX in functions.NAME:IDX)."""
    return sum(len(m.get("tool_calls") or ()) for m in messages
               if isinstance(m, Mapping) and m.get("role") == "assistant")


# ---------------------------------------------------------------------------------------------
# Tool-call arguments

def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text[:40]} is out of range for a JSON number")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_tool_arguments(arguments: str) -> dict:
    """A model's tool-call arguments as a dict: strict JSON (no NaN / Infinity, no number that overflows
    a double, as JSON encoders and the tools' own parsers reject them); "" is {}. ValueError otherwise."""
    if not arguments.strip():
        return {}
    try:
        v = json.loads(arguments, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the arguments are not valid JSON ({e}): {arguments[:200]}") from None
    if not isinstance(v, dict):
        raise ValueError(f"the arguments must be a JSON object, got {type(v).__name__}: {arguments[:200]}")
    return v


# ---------------------------------------------------------------------------------------------
# Stop strings

class StopMatcher:
    """Finds stop strings in a text stream that arrives in pieces.

    feed(text) -> (safe_text, matched): safe_text can be shown now; text that could still be the start
    of a stop string is held back. On a match, safe_text ends just before the stop string and matched
    is True (the stop string and what follows are dropped), and `matched` says which string it was
    (Anthropic's stop_sequence). flush() returns what is held back.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None
        self.longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda h: h[0])
            self.held = ""
            return buf[:at], True
        keep = 0
        for k in range(min(self.longest - 1, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ---------------------------------------------------------------------------------------------
# The engine's generation lock: FIFO, cancellable waiters

class FifoLock:
    """One holder at a time; waiters are served in arrival order (tickets). A waiter whose
    `cancelled()` turns true leaves the queue (call wake() after cancelling so it notices)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._holder: object | None = None

    def enqueue(self) -> object:
        """Take a ticket now (fixes the order); wait for it with acquire(ticket)."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
        return ticket

    def acquire(self, ticket: object, cancelled=lambda: False, timeout: float | None = None) -> bool:
        """Block until this ticket is first and the lock is free: True; False if cancelled / timed out
        (the ticket is then removed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if cancelled():
                    self._drop(ticket)
                    return False
                if self._holder is None and self._queue and self._queue[0] is ticket:
                    self._queue.popleft()
                    self._holder = ticket
                    return True
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    self._drop(ticket)
                    return False
                self._cond.wait(0.5 if wait is None else min(wait, 0.5))

    def release(self, ticket: object) -> None:
        with self._cond:
            if self._holder is ticket:
                self._holder = None
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def busy(self) -> bool:
        with self._cond:
            return self._holder is not None

    def _drop(self, ticket: object) -> None:
        try:
            self._queue.remove(ticket)
        except ValueError:
            pass
        self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# The stream

_END = object()


class ChatStream:
    """An iterable of events for one request. Events are produced by a worker (the engine's thread);
    iterate from any one thread. `cancel()` is thread-safe: generation stops before the next token,
    undelivered text events are dropped, and the stream ends with Usage and Finish("cancelled").

    Attributes for callers and tests: `finish_reason`, `usage`, `queued_at`, `started_at` (lock taken;
    None if it never ran), `finished_at`, `error` (an exception from the worker, re-raised to the reader).
    """

    def __init__(self, on_cancel=None):
        self._q: queue.Queue[object] = queue.Queue()
        self._cancel = threading.Event()
        self._on_cancel = on_cancel
        self._done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.prompt_tokens: int | None = None       # set when queued, by engines that know it
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self._relay = None
        self._relay_lock = threading.Lock()

    # -- consumer side -------------------------------------------------------------------------
    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._cancel.set()
            if self._on_cancel is not None:
                self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while True:
            if self._done:
                raise StopIteration
            item = self._q.get()
            if item is _END:
                self._done = True
                if self.error is not None:
                    raise self.error
                raise StopIteration
            if self._cancel.is_set() and not isinstance(item, (Usage, Finish)):
                continue                    # drop text produced before the cancel reached the worker
            return item

    def result(self) -> ChatResult:
        """Consume the stream and gather it (non-streaming responses, tests, the CLI)."""
        r = ChatResult()
        for ev in self:
            r.add(ev)
        return r

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def relay(self, callback) -> None:
        """Instead of iterating, have every item handed to `callback(item)` on the producer's thread,
        in order (those already produced first): each event, then None when the stream has closed
        (`error` then says whether the worker failed). For async readers (the server), which then need
        no thread of their own. The callback must be quick and must not raise. Text events that
        arrive after cancel() are still handed over: the reader drops them."""
        with self._relay_lock:
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                callback(None if item is _END else item)
            self._relay = callback

    # -- producer side (engines) ----------------------------------------------------------------
    def put(self, ev: Event) -> None:
        if isinstance(ev, Usage):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.finish_reason = ev.reason
        self._emit(ev)

    def close(self, error: BaseException | None = None) -> None:
        self.error = error
        self.finished_at = time.monotonic()
        self._emit(_END)
        self.finished.set()

    def _emit(self, item) -> None:
        with self._relay_lock:
            relay = self._relay
            if relay is None:
                self._q.put(item)
                return
        relay(None if item is _END else item)

    def mark_started(self) -> None:
        self.started_at = time.monotonic()
        self.started.set()


@dataclass
class ChatResult:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)     # [{"id", "name", "arguments"}]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    events: list = field(default_factory=list)

    def add(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, ReasoningDelta):
            self.reasoning += ev.text
        elif isinstance(ev, ContentDelta):
            self.content += ev.text
        elif isinstance(ev, ToolCallDelta):
            while len(self.tool_calls) <= ev.index:
                self.tool_calls.append({"id": None, "name": None, "arguments": ""})
            tc = self.tool_calls[ev.index]
            if ev.id is not None:
                tc["id"] = ev.id
            if ev.name is not None:
                tc["name"] = ev.name
            tc["arguments"] += ev.arguments_fragment
        elif isinstance(ev, TokenLogprobs):
            self.logprobs.append(ev)
        elif isinstance(ev, Usage):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.finish_reason = ev.reason

    def message(self) -> dict:
        """An OpenAI-shaped assistant message."""
        m: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.reasoning:
            m["reasoning_content"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = [{"id": tc["id"], "type": "function",
                                "function": {"name": tc["name"], "arguments": tc["arguments"]}}
                               for tc in self.tool_calls]
        return m


# ---------------------------------------------------------------------------------------------
# The protocol

@runtime_checkable
class Engine(Protocol):
    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] = "auto", sampling: Sampling | None = None) -> ChatStream:
        """Validate (ChatRequestError), queue, and return the stream at once."""
        ...

    def stats(self) -> dict:
        """Snapshot for the UI: decode_tok_s, prefill_tok_s, ttft_s, context_used, context_size,
        resident_bytes, last_prefill_tokens, last_cached_tokens, waiting, busy, and expert-cache fields
        (expert_cache_hits, expert_cache_misses, expert_cache_bytes, disk_read_mb_s, disk_read_bytes)."""
        ...

    def waiting(self) -> int:
        """Requests queued behind the running one."""
        ...

    def close(self) -> None:
        ...

