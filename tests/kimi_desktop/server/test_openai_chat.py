"""/v1/chat/completions, /v1/models and /health through the official openai client and raw SSE."""

from __future__ import annotations

import json
import re

import openai
import pytest

from kimi_desktop.chat import Sampling

from tests.kimi_desktop.engine_cases import MSGS, TOOL_HISTORY, TOOLS

from .helpers import KEY, openai_client, raw, sse_events

CALL_ID = re.compile(r"^functions\.([A-Za-z0-9_]+):(\d+)$")
THINK_AND_CALL = ('<think>I should look it up.</think><|tool_calls_section_begin|><|tool_call_begin|>'
                  'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
                  '<|tool_calls_section_end|><|im_end|>')


def prompt_tokens(engine, messages, tools=None) -> int:
    tok = engine.tokenizer
    return len(tok.encode(tok.render_chat(messages, tools=tools, add_generation_prompt=True)))


def test_health_and_models(server, server_engine):
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    models = openai_client(server).models.list().data
    assert [m.id for m in models] == ["tiny-k2"]
    assert models[0].model_extra["context_length"] == server_engine.ctx
    assert openai_client(server).models.retrieve("any-name").id == "any-name"


def test_plain_chat_is_the_engine_answer(server, server_engine):
    r = openai_client(server).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=8, temperature=0)
    direct = server_engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8)).result()
    msg = r.choices[0].message
    assert r.object == "chat.completion" and r.model == "gpt-4o"        # any name is served
    assert (msg.content or "") == direct.content
    assert msg.model_extra.get("reasoning_content", "") == direct.reasoning
    assert msg.model_extra.get("reasoning", "") == direct.reasoning
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == prompt_tokens(server_engine, MSGS) and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    t = r.model_extra["timings"]
    assert t["predicted_n"] == 8 and t["prompt_n"] + t["cache_n"] == r.usage.prompt_tokens


def test_second_turn_reports_cached_prompt_tokens(server):
    c = openai_client(server)
    first = c.chat.completions.create(model="m", messages=MSGS, max_tokens=4, temperature=0)
    history = MSGS + [{"role": "assistant", "content": first.choices[0].message.content or "ok"},
                      {"role": "user", "content": "More"}]
    c.chat.completions.create(model="m", messages=history[:1], max_tokens=2, temperature=0)
    second = c.chat.completions.create(model="m", messages=history, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_stream_matches_plain_and_has_openai_chunk_shapes(server):
    body = {"model": "m", "messages": MSGS, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    status, headers, data = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    evs = sse_events(data)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in choice_chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert choice_chunks[-1]["choices"][0]["delta"] == {} and "timings" in choice_chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in choice_chunks)
    plain = openai_client(server).chat.completions.create(model="m", messages=MSGS, max_tokens=10, temperature=0)
    assert text == (plain.choices[0].message.content or "")
    assert reasoning == plain.choices[0].message.model_extra.get("reasoning_content", "")


def test_stream_through_the_openai_client(server):
    stream = openai_client(server).chat.completions.create(model="m", messages=MSGS, max_tokens=6, temperature=0,
                                                           stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)       # no usage chunk unless asked


def test_list_of_parts_content_renders_like_a_string(server):
    c = openai_client(server)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    a = c.chat.completions.create(model="m", messages=parts, max_tokens=3, temperature=0)
    b = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi there"}], max_tokens=3,
                                  temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.model_dump() == b.choices[0].message.model_dump()


def test_seed_stop_and_penalties(server):
    c = openai_client(server)
    kw = dict(model="m", messages=MSGS, max_tokens=12, temperature=1.0, top_p=0.9, presence_penalty=0.5,
              frequency_penalty=0.5, extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1})

    def text(r):
        m = r.choices[0].message
        return (m.model_extra.get("reasoning_content") or "") + (m.content or "")
    a, b = (text(c.chat.completions.create(seed=-7, **kw)) for _ in range(2))
    assert a == b and a
    stop = a[2:4]
    s = c.chat.completions.create(seed=-7, stop=[stop], **kw)
    assert text(s) == a[:a.find(stop)] and s.choices[0].finish_reason == "stop"
    mc = c.chat.completions.create(model="m", messages=MSGS, max_completion_tokens=3, temperature=0)
    assert mc.usage.completion_tokens == 3


def test_logprobs(server):
    r = openai_client(server).chat.completions.create(model="m", messages=MSGS, max_tokens=5, temperature=0,
                                                      logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5
    for e in lp:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob == pytest.approx(tops[0])
        assert e.bytes == list(e.token.encode("utf-8"))


def test_tool_choice_required_none_and_json(server):
    c = openai_client(server)
    r = c.chat.completions.create(model="m", messages=TOOL_HISTORY, tools=TOOLS, tool_choice="required",
                                  max_tokens=60, temperature=1.0, seed=1)
    assert r.choices[0].finish_reason == "tool_calls"
    for i, tc in enumerate(r.choices[0].message.tool_calls):
        m = CALL_ID.match(tc.id)
        assert m and m.group(1) == tc.function.name and int(m.group(2)) == 1 + i and tc.type == "function"
        assert isinstance(json.loads(tc.function.arguments), dict)
    named = c.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, max_tokens=40, temperature=1.0, seed=2,
                                      tool_choice={"type": "function", "function": {"name": "add"}})
    assert [tc.function.name for tc in named.choices[0].message.tool_calls] == ["add"]
    none = c.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=20,
                                     temperature=1.0, seed=3)
    assert not none.choices[0].message.tool_calls
    assert none.usage.prompt_tokens == prompt_tokens(server.app.state.kimi.engine, MSGS)   # tools dropped
    js = c.chat.completions.create(model="m", messages=MSGS, max_tokens=40, temperature=1.0, seed=4,
                                   response_format={"type": "json_object"})
    assert isinstance(json.loads(js.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    jss = c.chat.completions.create(model="m", messages=MSGS, max_tokens=40, temperature=1.0, seed=5,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": schema}})
    assert "name" in json.loads(jss.choices[0].message.content)


# -- the scripted model: reasoning and a K2 tool-call section, end to end ------------------------------

@pytest.mark.parametrize("section", ["<|tool_calls_section_begin|>", "<|tool_call_section_begin|>"])
def test_streamed_tool_call_deltas(scripted, script, section):
    script(THINK_AND_CALL.replace("<|tool_calls_section_begin|>", section))   # K2 writes both spellings
    stream = openai_client(scripted, KEY).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, stream=True,
        temperature=0)
    chunks = list(stream)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert reasoning == "I should look it up."
    assert all(not d.content for d in deltas)                   # no marker text leaks into content
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id == "functions.get_weather:0" and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest and all(tc.id is None and tc.function.name is None and tc.index == 0 for tc in rest)
    assert "".join(tc.function.arguments for tc in rest) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_turn_and_reasoning_back_in_history(scripted, scripted_engine, script):
    c = openai_client(scripted, KEY)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    script(THINK_AND_CALL)
    r = c.chat.completions.create(model="m", messages=question, tools=TOOLS, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.model_extra["reasoning_content"] == "I should look it up."
    assert [(t.id, t.function.name, t.function.arguments) for t in msg.tool_calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    history = question + [msg.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    script("<think>It is sunny.</think>Sunny in Paris.<|im_end|>")
    r2 = c.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0)
    assert r2.choices[0].message.content == "Sunny in Paris." and r2.choices[0].finish_reason == "stop"
    sent = [dict(m) for m in history]
    assert r2.usage.prompt_tokens == prompt_tokens(scripted_engine, sent, TOOLS)
    # the reasoning sent back (under either name) is part of the rendered turn where the template keeps it
    without = [dict(m) for m in sent]
    without[1].pop("reasoning_content", None)
    without[1].pop("reasoning", None)
    alias = [dict(m) for m in without]
    alias[1]["reasoning"] = "I should look it up."
    r3 = c.chat.completions.create(model="m", messages=alias, tools=TOOLS, temperature=0)
    assert r3.usage.prompt_tokens == r2.usage.prompt_tokens
    r4 = c.chat.completions.create(model="m", messages=without, tools=TOOLS, temperature=0)
    assert r4.usage.prompt_tokens == prompt_tokens(scripted_engine, without, TOOLS) < r2.usage.prompt_tokens


def test_the_remote_engine_through_this_server(server, server_engine):
    """The server over --engine remote pointed at another of its kind: the same answer, reasoning included."""
    from kimi_desktop.engines.remote import RemoteEngine
    from kimi_desktop.server import LocalServer, create_app

    remote = RemoteEngine(server.base_url + "/v1")
    proxy = LocalServer(create_app(remote, "proxied"), port=0, logs=False).start_in_thread()
    try:
        c = openai_client(proxy)
        r = c.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0)
        direct = server_engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8)).result()
        assert r.choices[0].message.model_extra.get("reasoning_content", "") == direct.reasoning
        assert (r.choices[0].message.content or "") == direct.content
        assert r.usage.completion_tokens == 8 and c.models.list().data[0].id == "proxied"
        with pytest.raises(openai.BadRequestError, match="needs a local engine"):
            c.completions.create(model="m", prompt="x", max_tokens=2)
    finally:
        proxy.stop()
        remote.close()
