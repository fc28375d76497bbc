"""Pieces of the chat API that need no model: validation, stop strings, the FIFO lock, results."""

from __future__ import annotations

import threading
import time

import pytest

from kimi_desktop.chat import (ChatRequestError, ChatResult, ChatStream, ContentDelta, FifoLock, Finish,
                               ReasoningDelta, Sampling, StopMatcher, ToolCallDelta, Usage,
                               count_history_tool_calls, validate_request)

MSGS = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.1}, "top_p"), ({"min_p": -0.1}, "min_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": 1.5}, "seed"), ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [1]}, "stop"), ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"), ({"repetition_last_n": -1}, "repetition_last_n"),
])
def test_bad_sampling_names_the_parameter(kw, param):
    with pytest.raises(ChatRequestError, match=param) as ei:
        validate_request(MSGS, None, "auto", Sampling(**kw))
    assert ei.value.param == param
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("messages, tools, tool_choice, param", [
    ([], None, "auto", "messages"),
    ("hi", None, "auto", "messages"),
    ([{"role": "robot", "content": "x"}], None, "auto", "messages"),
    ([{"role": "user", "content": 5}], None, "auto", "messages"),
    ([{"role": "user", "content": "x", "tool_calls": []}], None, "auto", "messages"),
    (MSGS, [{"type": "function", "function": {"name": "a b"}}], "auto", "tools"),
    (MSGS, [{"type": "function", "function": {}}], "auto", "tools"),
    (MSGS, [{"type": "function", "function": {"name": "mcp.tool"}}], "auto", "tools"),
    (MSGS, TOOLS + TOOLS, "auto", "tools"),
    (MSGS, {"name": "x"}, "auto", "tools"),
    (MSGS, None, "required", "tool_choice"),
    (MSGS, TOOLS, "always", "tool_choice"),
    (MSGS, TOOLS, {"type": "function", "function": {"name": "mul"}}, "tool_choice"),
    (MSGS, TOOLS, {"type": "function"}, "tool_choice"),
])
def test_bad_requests_name_the_parameter(messages, tools, tool_choice, param):
    with pytest.raises(ChatRequestError) as ei:
        validate_request(messages, tools, tool_choice, None)
    assert ei.value.param == param and param in str(ei.value)


def test_good_requests_pass():
    s, tools, choice, fmt = validate_request(MSGS, TOOLS, {"type": "function", "function": {"name": "add"}},
                                             Sampling(response_format={"type": "json_object"}, stop="x"))
    assert choice == ("named", "add") and fmt == ("json_object", None) and tools[0]["name"] == "add"
    assert s.stop_list() == ["x"]


def test_sampling_is_the_samplers_config_with_one_validator():
    from kimi_desktop.runtime.sampling import Sampler, SamplerConfig, SamplingError
    s = Sampling(temperature=0.5, top_k=3, max_tokens=9)
    assert isinstance(s, SamplerConfig) and Sampler(s).cfg is s          # the engines sample with it as it is
    with pytest.raises(SamplingError, match="presence_penalty") as ei:  # the sampler's ranges are the API's
        SamplerConfig(presence_penalty=2.5).validate()
    assert ei.value.field == "presence_penalty"


def test_sampling_from_openai_body():
    s = Sampling.from_openai({"model": "k2", "temperature": 0.2, "max_completion_tokens": 9, "top_p": None,
                              "stream": True, "top_k": 5})
    assert (s.temperature, s.max_tokens, s.top_p, s.top_k) == (0.2, 9, 1.0, 5)


def test_history_tool_call_count():
    msgs = [{"role": "assistant", "tool_calls": [{}, {}]}, {"role": "tool"}, {"role": "assistant", "tool_calls": [{}]}]
    assert count_history_tool_calls(msgs) == 3


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("q") == ("ENq", False)
    assert m.feed("hello x") == ("hello ", False)
    assert m.feed("y and more") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("aEN") == ("a", False)
    assert m.feed("Dtail") == ("", True)
    m = StopMatcher(["ab"])
    assert m.feed("za") == ("z", False)
    assert m.flush() == "a"
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_fifo_lock_order_and_cancelled_waiter():
    lock = FifoLock()
    order = []
    t0 = lock.enqueue()
    assert lock.acquire(t0)
    tickets = [lock.enqueue() for _ in range(3)]
    cancel = threading.Event()
    results = {}

    def waiter(i):
        ok = lock.acquire(tickets[i], cancelled=cancel.is_set if i == 1 else (lambda: False))
        results[i] = ok
        if ok:
            order.append(i)
            time.sleep(0.01)
            lock.release(tickets[i])

    threads = [threading.Thread(target=waiter, args=(i,)) for i in (2, 1, 0)]   # start out of order
    for th in threads:
        th.start()
    time.sleep(0.05)
    assert lock.waiting() == 3
    cancel.set()
    lock.wake()
    for _ in range(100):
        if lock.waiting() == 2:
            break
        time.sleep(0.01)
    assert lock.waiting() == 2
    lock.release(t0)
    for th in threads:
        th.join(5)
    assert order == [0, 2] and results[1] is False


def test_stream_cancel_drops_text_but_keeps_usage_and_finish():
    s = ChatStream()
    s.put(ContentDelta("a"))
    s.cancel()
    s.put(ContentDelta("b"))
    s.put(Usage(1, 2, 0))
    s.put(Finish("cancelled"))
    s.close()
    evs = list(s)
    assert evs == [Usage(1, 2, 0), Finish("cancelled")]


def test_stream_reraises_worker_errors():
    s = ChatStream()
    s.put(ContentDelta("a"))
    s.close(error=RuntimeError("boom"))
    it = iter(s)
    assert next(it) == ContentDelta("a")
    with pytest.raises(RuntimeError, match="boom"):
        next(it)


def test_result_gathers_events():
    r = ChatResult()
    for ev in [ReasoningDelta("hm"), ContentDelta("A"), ToolCallDelta(0, "functions.f:0", "f", ""),
               ToolCallDelta(0, None, None, '{"a":'), ToolCallDelta(0, None, None, "1}"), Usage(3, 4, 1),
               Finish("tool_calls")]:
        r.add(ev)
    assert r.message() == {"role": "assistant", "content": "A", "reasoning_content": "hm",
                           "tool_calls": [{"id": "functions.f:0", "type": "function",
                                           "function": {"name": "f", "arguments": '{"a":1}'}}]}
    assert r.finish_reason == "tool_calls" and r.usage == Usage(3, 4, 1)
