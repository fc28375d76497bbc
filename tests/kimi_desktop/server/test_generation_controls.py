"""Generation controls at the engine and through the server: the reasoning budget in every mode
(reasoning_effort / thinking_token_budget), parallel_tool_calls false, n choices, and sampling
defaults from the checkpoint's generation_config.json."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kimi_desktop.chat import ChatStream, Sampling
from kimi_desktop.engines.common import sampling_defaults
from kimi_desktop.engines.llama_cpp import gguf_generation_defaults
from kimi_desktop.engines.native import NativeEngine
from kimi_desktop.server import LocalServer, create_app
from kimi_desktop.server.openai_api import chat_request
from kimi_desktop.server.openai_schema import ChatCompletionRequest

from tests.kimi_desktop.engine_cases import MSGS, TOOLS

from .helpers import KEY, open_stream, openai_client, raw, read_until, sse_events, wait_until

QUESTION = [{"role": "user", "content": "Weather in Paris and Rome?"}]
LONG_THOUGHT = "<think>" + " a" * 10 + "</think>answer<|im_end|>"
CALL = ('<|tool_call_begin|>functions.get_weather:{i}<|tool_call_argument_begin|>{{"city": "{city}"}}'
        '<|tool_call_end|>')
TWO_CALLS = ("<think>Two cities.</think><|tool_calls_section_begin|>" + CALL.format(i=0, city="Paris")
             + CALL.format(i=1, city="Rome") + "<|tool_calls_section_end|><|im_end|>")
AUTH = {"Authorization": f"Bearer {KEY}"}


def _think_script(engine, script) -> None:
    """LONG_THOUGHT, and after a </think> (the model's own or forced) the script goes on with the answer."""
    script(LONG_THOUGHT)
    tok = engine.tokenizer
    engine.session.jumps = {tok.special_ids["</think>"]: tok.encode("answer<|im_end|>")}


# -- the reasoning budget ------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [0, 1, 4, None])
@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_reasoning_cap_forces_end_think_after_exactly_n_tokens(scripted_engine, script, cap, tool_choice):
    _think_script(scripted_engine, script)
    r = scripted_engine.chat(MSGS, tools=TOOLS, tool_choice=tool_choice, sampling=Sampling(
        temperature=0, max_reasoning_tokens=cap, logprobs=True)).result()
    n = 10 if cap is None else cap
    assert r.reasoning == " a" * n and r.content == "answer" and r.finish_reason == "stop"
    tokens = [lp.token for lp in r.logprobs]
    answer = len(scripted_engine.tokenizer.encode("answer"))
    assert tokens[:n + 2] == ["<think>"] + [" a"] * n + ["</think>"]     # </think> right after n tokens
    assert r.usage.completion_tokens == 1 + n + 1 + answer + 1            # ... <|im_end|>


def test_the_cap_counts_from_a_prompt_that_opened_the_block(scripted_engine, script):
    """A template that prefills <think> (K2.5's, a GGUF's own): the tokens after it are reasoning at once."""
    _think_script(scripted_engine, script)
    sess = scripted_engine.session
    sess.script = sess.script[1:]                       # the prompt holds the <think>
    tok = scripted_engine.tokenizer
    ids = tok.encode(tok.render_chat(MSGS, add_generation_prompt=True) + "<think>")
    sampling = Sampling(temperature=0, max_reasoning_tokens=3)
    r = scripted_engine._start(ChatStream(), lambda s: scripted_engine._generate(s, ids, 40, sampling, None),
                               len(ids)).result()
    assert r.reasoning == " a" * 3 and r.content == "answer"


def test_reasoning_effort_and_thinking_token_budget_map_to_the_cap():
    def cap(**kw):
        body = ChatCompletionRequest.model_validate({"messages": MSGS, **kw})
        return chat_request(body)[3].max_reasoning_tokens
    assert cap() is None and cap(reasoning_effort="none") == 0 and cap(reasoning_effort="low") == 1024
    assert cap(reasoning_effort="xhigh") == 32768
    assert cap(reasoning_effort="high", thinking_token_budget=7) == 7          # the explicit number wins
    with pytest.raises(ValidationError, match="reasoning_effort"):
        cap(reasoning_effort="huge")


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_effort_through_the_server(scripted, scripted_engine, script, stream):
    c = openai_client(scripted, KEY)
    for kw, want in [({"reasoning_effort": "none"}, ""), ({"extra_body": {"thinking_token_budget": 3}}, " a" * 3),
                     ({}, " a" * 10)]:
        _think_script(scripted_engine, script)
        if stream:
            chunks = list(c.chat.completions.create(model="m", messages=MSGS, temperature=0, stream=True, **kw))
            deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
            reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
        else:
            m = c.chat.completions.create(model="m", messages=MSGS, temperature=0, **kw).choices[0].message
            reasoning, content = m.model_extra.get("reasoning_content") or "", m.content
        assert (reasoning, content) == (want, "answer")


def test_the_remote_engine_passes_the_budget_to_this_server(scripted, scripted_engine, script):
    from kimi_desktop.engines.remote import RemoteEngine

    remote = RemoteEngine(scripted.base_url + "/v1", api_key=KEY, model="m")
    try:
        _think_script(scripted_engine, script)
        r = remote.chat(MSGS, sampling=Sampling(temperature=0, max_reasoning_tokens=2)).result()
        assert (r.reasoning, r.content) == (" a" * 2, "answer")
    finally:
        remote.close()


# -- parallel_tool_calls ----------------------------------------------------------------------------

@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_parallel_tool_calls_false_keeps_the_first_call(scripted_engine, script, tool_choice):
    script(TWO_CALLS)
    both = scripted_engine.chat(QUESTION, tools=TOOLS, tool_choice=tool_choice,
                                sampling=Sampling(temperature=0)).result()
    assert [(c["id"], c["arguments"]) for c in both.tool_calls] == [
        ("functions.get_weather:0", '{"city": "Paris"}'), ("functions.get_weather:1", '{"city": "Rome"}')]
    script(TWO_CALLS)
    one = scripted_engine.chat(QUESTION, tools=TOOLS, tool_choice=tool_choice,
                               sampling=Sampling(temperature=0, parallel_tool_calls=False)).result()
    assert one.tool_calls == [{"id": "functions.get_weather:0", "name": "get_weather",
                               "arguments": '{"city": "Paris"}'}]
    assert one.finish_reason == "tool_calls" and one.reasoning == "Two cities." and not one.content


def test_parallel_tool_calls_false_through_the_server(scripted, script):
    c = openai_client(scripted, KEY)
    script(TWO_CALLS)
    r = c.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0, parallel_tool_calls=False)
    calls = r.choices[0].message.tool_calls
    assert [(t.id, t.function.arguments) for t in calls] == [("functions.get_weather:0", '{"city": "Paris"}')]
    assert r.choices[0].finish_reason == "tool_calls"
    script(TWO_CALLS)
    chunks = list(c.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0, stream=True,
                                            parallel_tool_calls=True))
    assert {tc.index for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or ()} == {0, 1}


# -- n choices --------------------------------------------------------------------------------------

def test_n_choices_are_the_seeded_single_answers(server, server_engine):
    c = openai_client(server)
    kw = dict(model="m", messages=MSGS, max_tokens=6, temperature=1.0)
    r = c.chat.completions.create(n=3, seed=11, **kw)
    singles = [c.chat.completions.create(seed=11 + i, **kw) for i in range(3)]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.model_dump() for ch in r.choices] == [s.choices[0].message.model_dump() for s in singles]
    assert len({(ch.message.content, ch.message.model_extra.get("reasoning_content")) for ch in r.choices}) > 1
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles) == 18
    c.chat.completions.create(n=2, seed=3, **kw)
    assert server_engine.stats()["last_cached_tokens"] == r.usage.prompt_tokens - 1   # the prompt came from cache


def test_n_choices_streamed(server):
    body = {"model": "m", "messages": MSGS, "max_tokens": 5, "temperature": 1.0, "seed": 4, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    status, _, data = raw(server, "POST", "/v1/chat/completions", body)
    evs = sse_events(data)
    assert status == 200 and evs[-1] == "[DONE]"
    *chunks, usage = evs[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert len({c["id"] for c in evs[:-1]}) == 1
    plain = openai_client(server).chat.completions.create(**{k: v for k, v in body.items()
                                                             if k not in ("stream", "stream_options")})
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] for m in mine][-1] == "length" and not any(m["finish_reason"] for m in mine[:-1])
        text = "".join((m["delta"].get("reasoning_content") or "") + (m["delta"].get("content") or "") for m in mine)
        p = plain.choices[i].message
        assert text == (p.model_extra.get("reasoning_content") or "") + (p.content or "")
    indices = [c["choices"][0]["index"] for c in chunks]
    assert indices == sorted(indices)                   # the choices run one after another


def test_n_completions_plain_and_streamed(server):
    c = openai_client(server)
    r = c.completions.create(model="m", prompt="Once upon", max_tokens=4, temperature=1.0, seed=9, n=2, best_of=2)
    singles = [c.completions.create(model="m", prompt="Once upon", max_tokens=4, temperature=1.0, seed=9 + i)
               for i in range(2)]
    assert [ch.text for ch in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.completion_tokens == 8
    chunks = list(c.completions.create(model="m", prompt="Once upon", max_tokens=4, temperature=1.0, seed=9, n=2,
                                       stream=True))
    assert ["".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) for i in range(2)] == \
        [s.choices[0].text for s in singles]
    status, _, body = raw(server, "POST", "/v1/completions", {"prompt": "x", "n": 1, "best_of": 3})
    assert status == 400 and json.loads(body)["error"]["param"] == "best_of"


def test_a_disconnect_cancels_all_n_choices(scripted, scripted_engine, script):
    script("<think></think>" + " a" * 400 + "<|im_end|>", delay=0.01)
    sess = scripted_engine.session
    s = open_stream(scripted, "/v1/chat/completions", {"model": "m", "messages": MSGS, "temperature": 0, "n": 3,
                                                       "stream": True}, KEY)
    read_until(s, b'"content":" a')
    assert scripted_engine.waiting() == 2               # choices 1 and 2 wait behind choice 0
    s.close()
    at_close = sess.feeds
    assert wait_until(lambda: not scripted_engine.stats()["busy"] and scripted_engine.waiting() == 0, 5)
    assert sess.feeds - at_close < 50                   # neither the first choice nor the others went on


# -- sampling defaults from generation_config.json -----------------------------------------------------

def test_sampling_defaults_follow_the_config_fields(caplog):
    assert sampling_defaults({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 9,
                              "eos_token_id": 163586}, "x") == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_defaults({"temperature": 0.6, "do_sample": False}, "x") == {"temperature": 0.0}
    assert sampling_defaults({"temperature": -1, "top_p": "high", "min_p": 0.05, "repetition_penalty": 1.1},
                             "cfg.json") == {"min_p": 0.05, "repetition_penalty": 1.1}
    assert "cfg.json: ignoring temperature" in caplog.text and "top_p" in caplog.text
    meta = {"general.sampling.temp": "0.6", "general.sampling.top_k": "40", "general.architecture": "deepseek2"}
    assert gguf_generation_defaults(meta, "k2.gguf") == {"temperature": 0.6, "top_k": 40}
    assert gguf_generation_defaults({"general.architecture": "deepseek2"}, "k2.gguf") == {}


@pytest.fixture(scope="module")
def greedy_by_default(tiny_int4, server_engine, tmp_path_factory):
    """The tiny model in a folder whose generation_config.json asks for greedy decoding (and top_k 3)."""
    folder = tmp_path_factory.mktemp("gencfg")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 3, "do_sample": True,
                                                               "max_length": 4096}))
    e = NativeEngine(folder, model=server_engine.model, tokenizer=server_engine.tokenizer)
    s = LocalServer(create_app(e, "gencfg"), port=0, logs=False).start_in_thread()
    yield e, s
    s.stop()
    e.close()


def test_generation_config_fills_unset_fields(greedy_by_default, server_engine):
    e, srv = greedy_by_default
    assert e.generation_defaults() == {"temperature": 0.0, "top_k": 3}
    assert server_engine.generation_defaults() == {}
    c = openai_client(srv)
    kw = dict(model="m", messages=MSGS, max_tokens=8)
    greedy = e.chat(MSGS, sampling=Sampling(temperature=0, top_k=3, max_tokens=8)).result()
    for _ in range(2):              # no temperature sent: the checkpoint's greedy decoding, every time
        m = c.chat.completions.create(**kw).choices[0].message
        assert (m.model_extra.get("reasoning_content") or "", m.content or "") == (greedy.reasoning, greedy.content)
    hot = c.chat.completions.create(temperature=1.0, seed=5, **kw).choices[0].message      # the request wins
    direct = e.chat(MSGS, sampling=Sampling(temperature=1.0, top_k=3, seed=5, max_tokens=8)).result()
    assert (hot.model_extra.get("reasoning_content") or "", hot.content or "") == (direct.reasoning, direct.content)
    text = c.completions.create(model="m", prompt="Once upon", max_tokens=5).choices[0].text
    assert text == "".join(ev.text for ev in e.complete("Once upon", Sampling(temperature=0, max_tokens=5))
                           if hasattr(ev, "text"))
