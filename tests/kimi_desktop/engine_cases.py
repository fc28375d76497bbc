"""Conversations and stream helpers shared by the engine tests (native, llama.cpp, remote)."""

import json
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from kimi_desktop.chat import ContentDelta, ReasoningDelta, Sampling

from tests.kimi_desktop.server.helpers import wait_until


MSGS = [{"role": "user", "content": "Hi"}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
]
# one earlier tool call in the history -> the next call's IDX is 1
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    {"role": "user", "content": "And 2+3?"},
]


def cancel_after(stream, n: int, kinds=(ReasoningDelta, ContentDelta), at_cancel=lambda: None):
    """Read the stream to its end, cancelling it from another thread after the n-th event of `kinds`.
    Returns (monotonic time of the cancel or None, what at_cancel() returned right after it)."""
    seen, t_cancel, mark = 0, None, None
    for ev in stream:
        if isinstance(ev, kinds):
            seen += 1
            if seen == n:
                th = threading.Thread(target=stream.cancel)
                th.start()
                th.join()
                t_cancel = time.monotonic()
                mark = at_cancel()
    return t_cancel, mark


@dataclass
class Feed:
    t: float                            # monotonic time the call started
    ids: list[int]
    logits: np.ndarray | None = None    # a copy of what the session returned, once it has


class FeedSpy:
    """Wraps an engine session's feed: records every call as it starts; optionally slows it down (delay,
    seconds) or edits the logits it returns (edit(logits, call number from 1) -> logits)."""

    def __init__(self, session, delay=0.0, edit=None):
        self.inner, self.delay, self.edit = session.feed, delay, edit
        self.calls: list[Feed] = []

    def __call__(self, ids, **kw):
        call = Feed(time.monotonic(), list(ids))
        self.calls.append(call)
        if self.delay:
            time.sleep(self.delay)
        out = self.inner(call.ids, **kw)
        call.logits = np.array(out)
        return self.edit(out, len(self.calls)) if self.edit else out

    def generated(self):
        """Token ids fed after the first (prefill) call."""
        return [i for c in self.calls[1:] for i in c.ids]


def spy(monkeypatch, engine, **kw) -> FeedSpy:
    """Spy on the feeds of the engine's session, or, with a session pool, of whichever session the
    pool hands each request (one generation runs at a time)."""
    s = FeedSpy(engine.session, **kw)
    monkeypatch.setattr(engine.session, "feed", s)
    pool = getattr(engine, "pool", None)
    if pool is not None:
        acquire = pool.acquire

        def spied(prompt):
            session, n = acquire(prompt)
            s.inner = type(session).feed.__get__(session)
            monkeypatch.setattr(session, "feed", s)
            return session, n
        monkeypatch.setattr(pool, "acquire", spied)
    return s


CALL_ID = re.compile(r"^functions\.([A-Za-z0-9_]+):(\d+)$")


def assert_required_tool_calls(r, max_tokens: int) -> None:
    """A reply to TOOL_HISTORY with tool_choice="required": only calls, each named in its id and numbered
    after the history's one, with JSON-object arguments that hold the schema's required keys."""
    assert r.finish_reason == "tool_calls" and r.tool_calls and r.content == ""
    for i, tc in enumerate(r.tool_calls):
        m = CALL_ID.match(tc["id"])
        assert m and m.group(1) == tc["name"] and int(m.group(2)) == 1 + i
        assert tc["name"] in ("get_weather", "add")
        args = json.loads(tc["arguments"])
        assert isinstance(args, dict)
        if tc["name"] == "get_weather":
            assert "city" in args                       # the schema's required key
    assert r.usage.completion_tokens <= max_tokens


def check_fifo_with_a_cancelled_waiter(engine) -> None:
    """Four requests at once run one at a time in arrival order; the third, cancelled while it waits,
    leaves the queue without ever starting."""
    samp = Sampling(temperature=0, max_tokens=10)
    s1 = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=40))
    s2, s3, s4 = (engine.chat(MSGS + [{"role": "user", "content": n}], sampling=samp) for n in ("two", "three", "four"))
    assert s1.started.wait(5)
    assert engine.waiting() == 3
    s3.cancel()
    assert wait_until(lambda: engine.waiting() == 2)
    results = {}

    def consume(name, s):
        results[name] = s.result()
    ths = [threading.Thread(target=consume, args=(n, s)) for n, s in (("s4", s4), ("s2", s2), ("s1", s1), ("s3", s3))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    assert results["s3"].finish_reason == "cancelled" and s3.started_at is None
    assert results["s3"].usage.completion_tokens == 0
    assert s1.finished_at <= s2.started_at and s2.finished_at <= s4.started_at
    assert s1.started_at < s2.started_at < s4.started_at
    assert all(results[n].finish_reason == "length" for n in ("s1", "s2", "s4"))
    assert engine.waiting() == 0
