"""The native engine on a tiny random checkpoint: the chat API's promises, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimi_desktop.chat import (ChatRequestError, ContentDelta, Engine, Finish, ReasoningDelta, Sampling,
                               TokenLogprobs, ToolCallDelta, Usage)
from kimi_desktop.engines import open_engine
from kimi_desktop.engines.native import NativeEngine

from tests.kimi_desktop.engine_cases import (MSGS, TOOL_HISTORY, TOOLS, assert_required_tool_calls, cancel_after,
                                             check_fifo_with_a_cancelled_waiter, spy)


@pytest.fixture(scope="module")
def engine(tiny_int4):
    e = open_engine("native", tiny_int4)
    yield e
    e.close()


def test_protocol_and_stats(engine):
    assert isinstance(engine, Engine)
    r = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=4)).result()
    st = engine.stats()
    for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "context_used", "context_size", "resident_bytes",
              "expert_cache_hits", "expert_cache_misses", "expert_cache_bytes", "last_prefill_tokens", "waiting"):
        assert k in st
    assert st["context_used"] >= r.usage.prompt_tokens and st["resident_bytes"] > 0
    assert st["expert_cache_hits"] == 0 and st["waiting"] == 0


def test_max_tokens_finishes_with_length(engine):
    s = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=6))
    evs = list(s)
    assert isinstance(evs[-1], Finish) and evs[-1].reason == "length"
    assert isinstance(evs[-2], Usage) and evs[-2].completion_tokens == 6
    assert evs[-2].prompt_tokens == len(engine.tokenizer.encode(engine.tokenizer.render_chat(MSGS)))
    assert all(isinstance(e, (ReasoningDelta, ContentDelta, ToolCallDelta)) for e in evs[:-2])


def test_end_token_stops_whatever_config_eos_says(tiny_int4, monkeypatch):
    from kimi_desktop.runtime import load_model
    model = load_model(tiny_int4)
    model.end_ids = frozenset()                       # as if config.json named another eos
    e = NativeEngine(tiny_int4, model=model)
    im_end = e.tokenizer.special_ids["<|im_end|>"]

    def boost(logits, k):
        out = np.array(logits)
        if k == 4:                                    # after prefill + 2 decode steps
            out[im_end] = out.max() + 100
        return out
    spy(monkeypatch, e, edit=boost)
    r = e.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=50)).result()
    assert r.finish_reason == "stop" and r.usage.completion_tokens == 4
    e.close()


def test_seed_reproduces_and_different_seeds_differ(engine):
    def run(seed):
        r = engine.chat(MSGS, sampling=Sampling(temperature=1.0, seed=seed, max_tokens=12)).result()
        return r.reasoning + r.content + json.dumps(r.tool_calls)
    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c


def test_cancel_from_another_thread_stops_within_one_token(engine, monkeypatch):
    feed = spy(monkeypatch, engine, delay=0.01)
    s = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=300))
    t_cancel, n_before = cancel_after(s, 3, at_cancel=lambda: len(feed.calls))
    assert t_cancel is not None
    assert s.finish_reason == "cancelled"
    started_after = [c for c in feed.calls if c.t > t_cancel]
    assert len(started_after) <= 1                     # the check comes before every forward pass
    assert len(feed.calls) - n_before <= 1
    assert s.usage.completion_tokens < 300


def test_stop_string_spanning_tokens(engine, monkeypatch):
    tok = engine.tokenizer
    feed = spy(monkeypatch, engine)
    sampling = dict(temperature=0, max_tokens=40)
    r = engine.chat(MSGS, sampling=Sampling(**sampling)).result()
    text = r.reasoning
    ids = feed.generated()
    stop = None
    for a, b in zip(ids, ids[1:]):
        if tok.is_special(a) or tok.is_special(b):
            continue
        pa, pb = tok.decode([a]), tok.decode([b])
        if "\ufffd" in pa + pb or not pa.strip() or not pb.strip():
            continue
        cand = pa[-2:] + pb[:2]
        if cand in text and len(cand) >= 2:
            stop = cand
            break
    assert stop is not None, "no pair of clean tokens in the greedy output"
    expected = text[:text.find(stop)]
    r2 = engine.chat(MSGS, sampling=Sampling(stop=[stop, "never-seen-zzz"], **sampling)).result()
    assert r2.finish_reason == "stop"
    assert r2.reasoning == expected and r2.content == ""
    assert stop not in r2.reasoning


def test_second_turn_prefills_only_new_tokens(engine, monkeypatch):
    tok = engine.tokenizer
    p1 = tok.encode(tok.render_chat(MSGS))
    r1 = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8)).result()
    turn2 = MSGS + [r1.message(), {"role": "user", "content": "Tell me more."}]
    p2 = tok.encode(tok.render_chat(turn2))
    feed = spy(monkeypatch, engine)
    r2 = engine.chat(turn2, sampling=Sampling(temperature=0, max_tokens=4)).result()
    st = engine.stats()
    assert r2.usage.prompt_tokens == len(p2)
    assert r2.usage.cached_prompt_tokens >= len(p1)
    assert st["last_prefill_tokens"] == len(p2) - r2.usage.cached_prompt_tokens
    assert len(feed.calls[0].ids) == st["last_prefill_tokens"] <= len(p2) - len(p1)
    # the same request again: everything but the last prompt token comes from the cache
    r3 = engine.chat(turn2, sampling=Sampling(temperature=0, max_tokens=4)).result()
    assert r3.usage.cached_prompt_tokens == len(p2) - 1 and engine.stats()["last_prefill_tokens"] == 1
    assert r3.content + r3.reasoning == r2.content + r2.reasoning


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required(engine, seed):
    r = engine.chat(TOOL_HISTORY, tools=TOOLS, tool_choice="required",
                    sampling=Sampling(temperature=1.0, seed=seed, max_tokens=60)).result()
    assert_required_tool_calls(r, 60)


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_named(engine, seed):
    r = engine.chat(TOOL_HISTORY, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                    sampling=Sampling(temperature=1.0, seed=seed, max_tokens=40)).result()
    assert r.finish_reason == "tool_calls"
    assert [tc["name"] for tc in r.tool_calls] == ["add"] and r.tool_calls[0]["id"] == "functions.add:1"
    assert isinstance(json.loads(r.tool_calls[0]["arguments"]), dict)


def test_tool_choice_named_with_a_tight_budget(engine):
    r = engine.chat(MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    sampling=Sampling(temperature=1.0, seed=5, max_tokens=24)).result()
    assert r.finish_reason == "tool_calls" and r.usage.completion_tokens <= 24
    assert "city" in json.loads(r.tool_calls[0]["arguments"])


@pytest.mark.parametrize("kind", ["named", "json_schema"])
@pytest.mark.parametrize("max_tokens", [18, 22])
def test_constrained_output_is_closed_within_a_tight_budget(engine, kind, max_tokens):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    for seed in range(2):
        if kind == "named":
            r = engine.chat(MSGS, tools=TOOLS[1:], tool_choice={"type": "function", "function": {"name": "add"}},
                            sampling=Sampling(temperature=1.0, seed=seed, max_tokens=max_tokens)).result()
            assert r.finish_reason == "tool_calls" and isinstance(json.loads(r.tool_calls[0]["arguments"]), dict)
        else:
            r = engine.chat(MSGS, sampling=Sampling(temperature=1.0, seed=seed, max_tokens=max_tokens, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})).result()
            assert r.finish_reason == "stop" and "name" in json.loads(r.content)
        assert r.usage.completion_tokens <= max_tokens


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_none_never_calls(engine, monkeypatch, seed):
    feed = spy(monkeypatch, engine)
    r = engine.chat(MSGS, tools=TOOLS, tool_choice="none",
                    sampling=Sampling(temperature=1.5, seed=seed, max_tokens=60)).result()
    assert not r.tool_calls and r.finish_reason in ("stop", "length")
    tool_ids = {engine.tokenizer.special_ids[s] for s in ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")}
    assert not tool_ids & set(feed.generated())
    # and the tools were dropped from the prompt
    assert len(feed.calls[0].ids) + r.usage.cached_prompt_tokens == len(
        engine.tokenizer.encode(engine.tokenizer.render_chat(MSGS)))


@pytest.mark.parametrize("seed", range(3))
def test_response_format_json_object(engine, seed):
    r = engine.chat(MSGS, sampling=Sampling(temperature=1.0, seed=seed, max_tokens=40,
                                            response_format={"type": "json_object"})).result()
    assert r.finish_reason == "stop"
    assert isinstance(json.loads(r.content), dict)


@pytest.mark.parametrize("branch", ["tool", "json"])
def test_json_object_with_tools_auto_is_json_or_a_tool_call(engine, monkeypatch, branch):
    sec = engine.tokenizer.special_ids["<|tool_calls_section_begin|>"]

    def steer(logits, k):                  # k == 1: the prefill's logits pick the first token
        out = np.array(logits)
        if k == 1 and branch == "tool":
            out[sec] = out.max() + 100
        return out
    spy(monkeypatch, engine, edit=steer)
    r = engine.chat(MSGS, tools=TOOLS, sampling=Sampling(temperature=1.0, seed=0, max_tokens=40,
                                                         response_format={"type": "json_object"})).result()
    if branch == "tool":
        assert r.finish_reason == "tool_calls" and r.content == "" and r.tool_calls
        assert all(isinstance(json.loads(tc["arguments"]), dict) for tc in r.tool_calls)
    else:
        assert r.finish_reason == "stop" and not r.tool_calls and isinstance(json.loads(r.content), dict)


def test_response_format_json_schema_required_keys(engine):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    r = engine.chat(MSGS, sampling=Sampling(temperature=1.0, seed=1, max_tokens=50, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})).result()
    obj = json.loads(r.content)
    assert {"name", "n"} <= set(obj)


def test_logprobs_with_top_n(engine):
    evs = list(engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)))
    lps = [e for e in evs if isinstance(e, TokenLogprobs)]
    assert len(lps) == 5
    for e in lps:
        assert len(e.top) == 3 and e.logprob <= 0
        vals = [v for _, v in e.top]
        assert vals == sorted(vals, reverse=True)
        assert e.logprob == pytest.approx(vals[0])         # greedy takes the most likely token
        assert e.token == e.top[0][0]
    none = list(engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=3)))
    assert not any(isinstance(e, TokenLogprobs) for e in none)


def test_fifo_order_and_a_cancelled_waiter_leaves_the_queue(engine, monkeypatch):
    spy(monkeypatch, engine, delay=0.004)
    check_fifo_with_a_cancelled_waiter(engine)


def test_bad_requests_raise_before_queueing(engine):
    with pytest.raises(ChatRequestError) as ei:
        engine.chat(MSGS, sampling=Sampling(temperature=-1))
    assert ei.value.param == "temperature" and "temperature" in str(ei.value)
    with pytest.raises(ChatRequestError) as ei:
        engine.chat(MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert ei.value.param == "tool_choice"
    with pytest.raises(ChatRequestError) as ei:
        engine.chat([{"role": "user", "content": "word " * 3000}])
    assert ei.value.param == "messages" and "context" in str(ei.value)
    assert engine.waiting() == 0 and not engine.stats()["busy"]


def test_worker_errors_reach_the_reader(engine, monkeypatch):
    def broken(ids, all_logits=False, **kw):
        raise RuntimeError("disk on fire")
    for session in engine.pool.sessions:               # whichever the request gets
        monkeypatch.setattr(session, "feed", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        engine.chat(MSGS, sampling=Sampling(max_tokens=3)).result()
    monkeypatch.undo()
    r = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=3)).result()   # the engine still works
    assert r.finish_reason == "length"
