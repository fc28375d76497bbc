"""The llama.cpp engine on the tiny checkpoint exported to GGUF: the chat API's promises, and the same
tokens as the native engine.

The file is the all-F32 export with an F32 KV cache, where llama.cpp computes the reference's function
to ~1e-6 (test_llama_cpp_crosscheck.py): greedy token streams must then agree with the native engine's
wherever the native top-2 logit margin is clear of that noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from kimi_desktop.chat import (ChatRequestError, ContentDelta, Engine, Finish, ReasoningDelta,  # noqa: E402
                               Sampling, TokenLogprobs, ToolCallDelta, Usage)
from kimi_desktop.engines import open_engine  # noqa: E402
from kimi_desktop.engines.llama_cpp import (LlamaCppEngine, LlamaSession, LlamaVocab, load_llama,  # noqa: E402
                                            vocab_map)
from kimi_desktop.engines.native import NativeEngine  # noqa: E402
from kimi_desktop.gguf_export import export_gguf  # noqa: E402

GGML_TYPE_F32 = 0
F32_CACHE = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
CLEAR_MARGIN = 0.05             # top-2 logit gap far above llama.cpp's ~1e-5 difference on this file

from tests.kimi_desktop.engine_cases import (MSGS, TOOL_HISTORY, TOOLS, assert_required_tool_calls,  # noqa: E402
                                             cancel_after, check_fifo_with_a_cancelled_waiter, spy)
CONVERSATIONS = [
    MSGS,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，今天天气怎么样？"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. Why?"}],
]


@pytest.fixture(scope="module")
def gguf_f32(tiny_int4, tmp_path_factory):
    return export_gguf(tiny_int4, tmp_path_factory.mktemp("llama-engine") / "tiny-f32.gguf",
                       weights="f32", experts="f32")


@pytest.fixture(scope="module")
def engine(gguf_f32, tiny_int4):
    """The project's tokenizer and template (tokenizer_dir)."""
    e = LlamaCppEngine(gguf_f32, ctx=512, threads=2, tokenizer_dir=tiny_int4, **F32_CACHE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def engine_gguf(gguf_f32):
    """The GGUF's own vocabulary and embedded chat template."""
    e = open_engine("llama.cpp", gguf_f32, ctx=512, threads=2, **F32_CACHE)
    yield e
    e.close()


@pytest.fixture(scope="module")
def native(tiny_int4):
    e = NativeEngine(tiny_int4, ctx=512)
    yield e
    e.close()


def greedy_run(monkeypatch, engine, msgs, n):
    """(result, generated ids, logits before each generated token) of a greedy request."""
    engine.reset()
    f = spy(monkeypatch, engine)
    r = engine.chat(msgs, sampling=Sampling(temperature=0, max_tokens=n)).result()
    monkeypatch.undo()
    return r, f.generated(), [c.logits for c in f.calls]


def text_of(r):
    return r.reasoning + "|" + r.content + "|" + json.dumps(r.tool_calls)


# ------------------------------------------------------------------------------ protocol

def test_protocol_and_stats(engine):
    assert isinstance(engine, Engine)
    r = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=4)).result()
    st = engine.stats()
    for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "context_used", "context_size", "resident_bytes",
              "expert_cache_hits", "expert_cache_misses", "expert_cache_bytes", "last_prefill_tokens", "waiting",
              "busy", "n_threads", "n_gpu_layers", "llama_n_ctx", "evaluated_tokens_total", "model_bytes"):
        assert k in st, k
    assert st["engine"] == "llama.cpp" and st["context_size"] == 512 and st["vocab_mapped"] is False
    assert st["context_used"] == st["llama_tokens"] == engine.llm.n_tokens >= r.usage.prompt_tokens
    assert st["ttft_s"] is not None and st["resident_bytes"] > 0 and st["model_bytes"] > 0
    assert st["waiting"] == 0 and not st["busy"] and st["expert_cache_hits"] is None
    assert r.finish_reason in ("length", "stop", "tool_calls") and r.usage.completion_tokens <= 4


def test_max_tokens_finishes_with_length(engine):
    evs = list(engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=6)))
    assert evs[-1] == Finish("length") and isinstance(evs[-2], Usage) and evs[-2].completion_tokens == 6
    tok = engine.tokenizer
    assert evs[-2].prompt_tokens == len(tok.encode(tok.render_chat(MSGS)))
    assert all(isinstance(e, (ReasoningDelta, ContentDelta, ToolCallDelta)) for e in evs[:-2])


@pytest.mark.parametrize("which", ["engine", "engine_gguf", "native"])
def test_reasoning_cap_forces_end_think_in_plain_mode(request, which):
    """max_reasoning_tokens outside constrained modes: the shared decode loop forces </think> after
    exactly N reasoning tokens (0: <think></think> at once), on both local engines."""
    e = request.getfixturevalue(which)

    def tokens(cap):
        r = e.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8, logprobs=True,
                                           max_reasoning_tokens=cap)).result()
        return r, [lp.token for lp in r.logprobs]
    free, free_tokens = tokens(None)
    assert "</think>" not in free_tokens and free.reasoning        # the tiny model would think on
    none, none_tokens = tokens(0)
    assert none_tokens[:2] == ["<think>", "</think>"] and none.reasoning == "" and none.content
    two, two_tokens = tokens(2)
    assert two_tokens[:3] == free_tokens[:2] + ["</think>"] and two.content and len(two_tokens) == 8


# ------------------------------------------------------------------------------ same tokens as native

def test_greedy_tokens_equal_the_native_engine(engine, native, monkeypatch):
    compared = whole = 0
    for msgs in CONVERSATIONS:
        rn, ids_n, logits_n = greedy_run(monkeypatch, native, msgs, 24)
        rl, ids_l, _ = greedy_run(monkeypatch, engine, msgs, 24)
        assert rl.usage.prompt_tokens == rn.usage.prompt_tokens
        clear = True
        for k, t in enumerate(ids_n):
            top2 = np.sort(logits_n[k])[-2:]
            if top2[1] - top2[0] < CLEAR_MARGIN:
                clear = False
                break
            assert ids_l[k] == t, (msgs, k)
            compared += 1
        if clear and len(ids_n) == len(ids_l):
            assert text_of(rl) == text_of(rn) and rl.finish_reason == rn.finish_reason
            whole += 1
    assert compared >= 20 and whole >= 1


def test_gguf_vocabulary_and_template_give_the_same_prompt_and_tokens(engine, engine_gguf, monkeypatch):
    v = engine_gguf.tokenizer
    assert isinstance(v, LlamaVocab) and engine_gguf.stats()["tokenizer"] == "gguf"
    tok = engine.tokenizer
    assert v.num_base == tok.num_base and v.special_ids == {k: i for k, i in tok.special_ids.items()
                                                            if i < v.vocab_size}
    for msgs, tools in ((MSGS, None), (TOOL_HISTORY, TOOLS), (CONVERSATIONS[1], None)):
        want = tok.encode(tok.render_chat(msgs, tools=tools))
        assert engine_gguf._encode_prompt(v.render_chat(msgs, tools=tools)) == want
    for msgs in CONVERSATIONS[:2]:
        ra, ids_a, _ = greedy_run(monkeypatch, engine, msgs, 16)
        rb, ids_b, _ = greedy_run(monkeypatch, engine_gguf, msgs, 16)
        assert ids_a == ids_b and text_of(ra) == text_of(rb)


# ------------------------------------------------------------------------------ sampling, constraints

def test_seed_reproduces_and_different_seeds_differ(engine):
    def run(seed):
        engine.reset()
        r = engine.chat(MSGS, sampling=Sampling(temperature=1.0, seed=seed, max_tokens=12)).result()
        return text_of(r)
    a, b, c = run(11), run(11), run(12)
    assert a == b
    assert a != c


@pytest.mark.parametrize("which", ["engine", "engine_gguf"])
@pytest.mark.parametrize("seed", range(2))
def test_tool_choice_required(request, which, seed):
    e = request.getfixturevalue(which)
    r = e.chat(TOOL_HISTORY, tools=TOOLS, tool_choice="required",
               sampling=Sampling(temperature=1.0, seed=seed, max_tokens=60)).result()
    assert_required_tool_calls(r, 60)


def test_tool_choice_named_and_json_schema(engine_gguf):
    r = engine_gguf.chat(TOOL_HISTORY, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                         sampling=Sampling(temperature=1.0, seed=3, max_tokens=40)).result()
    assert r.finish_reason == "tool_calls" and [tc["name"] for tc in r.tool_calls] == ["add"]
    assert r.tool_calls[0]["id"] == "functions.add:1" and isinstance(json.loads(r.tool_calls[0]["arguments"]), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    r = engine_gguf.chat(MSGS, sampling=Sampling(temperature=1.0, seed=1, max_tokens=30, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})).result()
    assert r.finish_reason == "stop" and "name" in json.loads(r.content)


def test_logprobs_and_stop_string(engine):
    evs = list(engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)))
    lps = [e for e in evs if isinstance(e, TokenLogprobs)]
    assert len(lps) == 5
    for e in lps:
        vals = [v for _, v in e.top]
        assert len(e.top) == 3 and vals == sorted(vals, reverse=True) and e.logprob == pytest.approx(vals[0])
    r = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=30)).result()
    text = r.reasoning + r.content
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and
                 "\ufffd" not in text[i:i + 2] and len(text[i:i + 2]) == 2), None)
    if stop is not None and r.reasoning and stop in r.reasoning:
        r2 = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=30, stop=stop)).result()
        assert r2.finish_reason == "stop" and r2.reasoning == r.reasoning[:r.reasoning.find(stop)]


# ------------------------------------------------------------------------------ cancel, FIFO, prefix reuse

def test_cancel_from_another_thread_stops_within_one_token(engine, monkeypatch):
    feed = spy(monkeypatch, engine, delay=0.01)
    s = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=300))
    t_cancel, n_before = cancel_after(s, 3, at_cancel=lambda: len(feed.calls))
    assert t_cancel is not None and s.finish_reason == "cancelled"
    assert len([c for c in feed.calls if c.t > t_cancel]) <= 1     # the check comes before every forward pass
    assert len(feed.calls) - n_before <= 1
    assert s.usage.completion_tokens < 300
    monkeypatch.undo()
    assert engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=3)).result().finish_reason == "length"


def test_fifo_one_at_a_time(engine, monkeypatch):
    spy(monkeypatch, engine, delay=0.003)
    check_fifo_with_a_cancelled_waiter(engine)


def test_second_turn_reuses_the_prefix(engine, monkeypatch):
    tok = engine.tokenizer
    engine.reset()
    p1 = tok.encode(tok.render_chat(MSGS))
    r1 = engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8)).result()
    assert r1.usage.cached_prompt_tokens == 0
    turn2 = MSGS + [r1.message(), {"role": "user", "content": "Tell me more."}]
    p2 = tok.encode(tok.render_chat(turn2))
    before = engine.stats()["evaluated_tokens_total"]
    feed = spy(monkeypatch, engine)
    r2 = engine.chat(turn2, sampling=Sampling(temperature=0, max_tokens=4)).result()
    st = engine.stats()
    assert r2.usage.prompt_tokens == len(p2) and r2.usage.cached_prompt_tokens >= len(p1)
    assert feed.calls[0].ids == p2[r2.usage.cached_prompt_tokens:]
    assert st["last_prefill_tokens"] == len(p2) - r2.usage.cached_prompt_tokens <= len(p2) - len(p1)
    assert st["evaluated_tokens_total"] - before == st["last_prefill_tokens"] + len(feed.calls) - 1
    assert engine.llm.n_tokens == len(engine.session) and \
        list(engine.llm.input_ids[:engine.llm.n_tokens]) == engine.session.tokens
    r3 = engine.chat(turn2, sampling=Sampling(temperature=0, max_tokens=4)).result()
    assert r3.usage.cached_prompt_tokens == len(p2) - 1 and engine.stats()["last_prefill_tokens"] == 1
    assert text_of(r3) == text_of(r2)


def test_bad_requests_and_worker_errors(engine, monkeypatch):
    with pytest.raises(ChatRequestError) as ei:
        engine.chat(MSGS, sampling=Sampling(top_p=0))
    assert ei.value.param == "top_p"
    with pytest.raises(ChatRequestError) as ei:
        engine.chat([{"role": "user", "content": "word " * 2000}])
    assert ei.value.param == "messages" and "context" in str(ei.value)

    def broken(ids, **kw):
        raise RuntimeError("llama on fire")
    monkeypatch.setattr(engine.session, "feed", broken)
    with pytest.raises(RuntimeError, match="llama on fire"):
        engine.chat(MSGS, sampling=Sampling(max_tokens=3)).result()
    monkeypatch.undo()
    assert engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=3)).result().finish_reason == "length"
    assert engine.waiting() == 0 and not engine.stats()["busy"]
    with pytest.raises(FileNotFoundError):
        LlamaCppEngine(engine.path.with_name("missing.gguf"))


# ------------------------------------------------------------------------------ id mapping

class _Vocab:
    def __init__(self, ranks, special_ids, vocab_size):
        self.ranks, self.special_ids, self.vocab_size = ranks, special_ids, vocab_size


def test_vocab_map():
    a = _Vocab({b"a": 0, b"b": 1}, {"<|im_end|>": 2, "<|reserved_token_3|>": 3}, 4)
    assert vocab_map(a, _Vocab({b"a": 0, b"b": 1}, {"<|im_end|>": 2, "<|reserved_token_3|>": 3}, 4)) is None
    assert vocab_map(a, _Vocab({b"a": 0, b"b": 1}, {"<|im_end|>": 2, "[PAD3]": 3}, 4)) is None
    p2l = vocab_map(a, _Vocab({b"b": 0, b"a": 1}, {"<|im_end|>": 5}, 6))
    assert p2l.tolist() == [1, 0, 5, -1]                      # a reserved token may be missing
    with pytest.raises(ValueError, match="ordinary"):
        vocab_map(a, _Vocab({b"a": 0}, {"<|im_end|>": 2}, 4))
    with pytest.raises(ValueError, match="im_end"):
        vocab_map(a, _Vocab({b"a": 0, b"b": 1}, {}, 4))


def test_session_maps_ids_and_logits(gguf_f32, engine):
    llm = load_llama(gguf_f32, n_threads=2, n_ctx=64, **F32_CACHE)
    try:
        n = int(llm.n_vocab())
        perm = np.random.default_rng(0).permutation(n)            # project id i is llama id perm[i]
        plain, mapped = LlamaSession(llm), LlamaSession(llm, p2l=perm)
        lids = engine.tokenizer.encode("Hello world")
        want = plain.feed(lids)
        plain.truncate(0)
        got = mapped.feed(np.argsort(perm)[lids].tolist())
        np.testing.assert_array_equal(got, want[perm])
        assert mapped.tokens == np.argsort(perm)[lids].tolist() and llm.n_tokens == len(lids)
    finally:
        llm.close()


def test_close_frees_llama_and_stays_safe(gguf_f32):
    e = LlamaCppEngine(gguf_f32, ctx=64, threads=1)
    assert e.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=2)).result().usage.completion_tokens == 2
    e.close()
    st = e.stats()                                   # no llama call on the freed model
    assert st["llama_tokens"] is None and st["context_size"] == 64
    e.reset()
    with pytest.raises(RuntimeError, match="closed"):
        e.chat(MSGS)
