"""/v1/messages and /v1/messages/count_tokens through the official anthropic client and raw SSE: plain and
streamed answers on the tiny random model, reasoning and a K2 tool call on the scripted one, the
tool_result turn's rendering, tool_choice, stop_sequences, and Anthropic's error shape."""

from __future__ import annotations

import json
import re

import anthropic
import pytest

from kimi_desktop.chat import Sampling
from kimi_desktop.server.anthropic_api import _error_event, _sampling, conversation
from kimi_desktop.server.anthropic_schema import MessagesRequest

from tests.kimi_desktop.engine_cases import TOOLS

from .helpers import KEY, openai_client, raw
from .test_openai_chat import THINK_AND_CALL, prompt_tokens

CALL_ID = re.compile(r"^functions\.([A-Za-z0-9_]+):(\d+)$")
A_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
HI = [{"role": "user", "content": "Hi"}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TURN = {"role": "assistant", "content": [
    {"type": "thinking", "thinking": "I should look it up.", "signature": ""},
    {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {"city": "Paris"}}]}
RESULT_TURN = {"role": "user", "content": [
    {"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": "sunny"}]}
# the same conversation as the OpenAI-shaped messages a Chat Completions client sends
OPENAI_HISTORY = QUESTION + [
    {"role": "assistant", "content": "", "reasoning_content": "I should look it up.", "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]


GREEDY = {"temperature": 0}      # this client passes sampling fields as extra_body only


def api_args(body: dict) -> dict:
    """A raw body as the client's arguments."""
    return {**{k: v for k, v in body.items() if k not in ("stream", "temperature")},
            "extra_body": {"temperature": body["temperature"]}}


def client(srv, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base_url, api_key=key, max_retries=0, timeout=30)


def sse_named(data: bytes) -> list[tuple[str, dict]]:
    """(event name, object) of each `event:` + `data:` block of an SSE body."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            head, payload = block.split("\n", 1)
            assert head.startswith("event: ") and payload.startswith("data: "), block
            out.append((head[len("event: "):], json.loads(payload[len("data: "):])))
    return out


def blocks_of(events: list[tuple[str, dict]]) -> list[dict]:
    """The content blocks a stream adds up to, checking the block framing on the way: each block
    starts, gets its deltas and stops before the next (index + 1) starts; thinking gets a signature."""
    blocks, open_ = [], None
    for name, ev in events:
        assert ev["type"] == name
        if name == "content_block_start":
            assert open_ is None and ev["index"] == len(blocks)
            blocks.append(dict(ev["content_block"], partial_json="", signed=False))
            open_ = ev["index"]
        elif name == "content_block_delta":
            assert ev["index"] == open_
            b, d = blocks[open_], ev["delta"]
            kind = d["type"]
            if kind == "signature_delta":
                b["signed"] = True
            else:
                field = {"thinking_delta": "thinking", "text_delta": "text", "input_json_delta": "partial_json"}[kind]
                assert not b["signed"]
                b[field] += d[field]
        elif name == "content_block_stop":
            assert ev["index"] == open_
            b = blocks[open_]
            assert b.pop("signed") == (b["type"] == "thinking")
            if b["type"] == "tool_use":
                b["input"] = json.loads(b["partial_json"])
            b.pop("partial_json")
            open_ = None
    assert open_ is None
    return blocks


def texts(content) -> tuple[str, str]:
    """(thinking, text) of a response's content blocks (dicts or the client's objects)."""
    get = (lambda b, k: b[k]) if content and isinstance(content[0], dict) else getattr
    kinds = [get(b, "type") for b in content]
    think = "".join(get(b, "thinking") for b, k in zip(content, kinds) if k == "thinking")
    return think, "".join(get(b, "text") for b, k in zip(content, kinds) if k == "text")


# -- the tiny random model: the answer is the engine's ----------------------------------------------------

def test_plain_answer_is_the_engine_answer(server, server_engine):
    r = client(server).messages.create(model="claude-sonnet-4-5", max_tokens=8, system="Be brief.", messages=HI,
                                       extra_body=GREEDY)
    same = [{"role": "system", "content": "Be brief."}] + HI
    direct = server_engine.chat(same, sampling=Sampling(temperature=0, max_tokens=8)).result()
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model == "claude-sonnet-4-5"                      # any name is served
    assert texts(r.content) == (direct.reasoning, direct.content)
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    u = r.usage
    assert u.output_tokens == 8 and u.cache_creation_input_tokens == 0
    assert u.input_tokens + u.cache_read_input_tokens == prompt_tokens(server_engine, same)
    assert all(b.type != "thinking" or b.signature == "" for b in r.content)


def test_stream_has_anthropics_event_sequence_and_the_plain_answer(server, server_engine):
    body = {"model": "m", "max_tokens": 10, "temperature": 0, "messages": HI}
    status, headers, data = raw(server, "POST", "/v1/messages", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_named(data)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    assert start["usage"]["input_tokens"] == prompt_tokens(server_engine, HI)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 10
    streamed = blocks_of(events)
    _, _, plain = raw(server, "POST", "/v1/messages", body)
    plain = json.loads(plain)
    assert streamed == plain["content"] and plain["stop_reason"] == "max_tokens"
    # the client's stream helpers add the same events up to the same message
    with client(server).messages.stream(**api_args(body)) as s:
        final = s.get_final_message()
    assert texts(final.content) == texts(plain["content"]) and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 10
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == start["usage"]["input_tokens"]


def test_stop_sequences_name_the_one_that_matched(server):
    c = client(server)
    kw = dict(model="m", max_tokens=12, messages=HI, extra_body=GREEDY)
    think, text = texts(c.messages.create(**kw).content)
    full = think + text
    longer = think if len(think) >= len(text) else text
    assert len(longer) >= 4
    stop = longer[1:3]
    r = c.messages.create(stop_sequences=["\x01never\x02", stop], **kw)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert "".join(texts(r.content)) == full[:full.find(stop)]


def test_tool_choice_any_tool_and_none_are_enforced(server, server_engine):
    c = client(server)
    kw = dict(model="m", max_tokens=60, tools=A_TOOLS, messages=QUESTION, extra_body={"temperature": 1.0})
    r = c.messages.create(tool_choice={"type": "any"}, **kw)
    calls = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and calls and not [b for b in r.content if b.type == "text"]
    for i, b in enumerate(calls):
        m = CALL_ID.match(b.id)
        assert m and m.group(1) == b.name and int(m.group(2)) == i and isinstance(b.input, dict)
    named = c.messages.create(tool_choice={"type": "tool", "name": "add"}, **kw)
    assert [b.name for b in named.content if b.type == "tool_use"] == ["add"] and named.stop_reason == "tool_use"
    one = c.messages.create(tool_choice={"type": "any", "disable_parallel_tool_use": True}, **kw)
    assert len([b for b in one.content if b.type == "tool_use"]) == 1
    none = c.messages.create(tool_choice={"type": "none"}, **kw)
    assert none.stop_reason != "tool_use" and not [b for b in none.content if b.type == "tool_use"]
    u = none.usage
    assert u.input_tokens + u.cache_read_input_tokens == prompt_tokens(server_engine, QUESTION)   # tools dropped


# -- the scripted model: reasoning and a K2 tool call, block by block --------------------------------------

def check_thinking_and_call(srv, key: str, again=lambda: None) -> None:
    """The model writes THINK_AND_CALL: streamed raw, block by block, then through the client's stream
    helpers (`again()` before the second request)."""
    body = {"model": "m", "max_tokens": 100, "temperature": 0, "tools": A_TOOLS, "messages": QUESTION,
            "stream": True}
    status, _, data = raw(srv, "POST", "/v1/messages", body, headers={"x-api-key": key})
    assert status == 200
    events = sse_named(data)
    assert blocks_of(events) == CALL_TURN["content"]
    starts = [ev["content_block"] for n, ev in events if n == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {}}
    fragments = [ev["delta"]["partial_json"] for n, ev in events
                 if n == "content_block_delta" and ev["delta"]["type"] == "input_json_delta"]
    assert "".join(fragments) == '{"city": "Paris"}'
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    again()
    with client(srv, key).messages.stream(**api_args(body)) as s:
        final = s.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == CALL_TURN["content"]
    assert final.stop_reason == "tool_use"


def test_streamed_thinking_and_tool_use(scripted, script):
    script(THINK_AND_CALL)
    check_thinking_and_call(scripted, KEY, again=lambda: script(THINK_AND_CALL))


def test_streamed_thinking_and_tool_use_through_the_real_model_path(bigram_server):
    check_thinking_and_call(bigram_server, "unused")         # the scripted checkpoint writes the same


def test_thinking_disabled_closes_the_block(server):
    kw = dict(model="m", max_tokens=6, messages=HI, extra_body=GREEDY)
    assert client(server).messages.create(**kw).content[0].type == "thinking"      # this model thinks first
    off = client(server).messages.create(thinking={"type": "disabled"}, **kw)
    assert [b.type for b in off.content] == ["text"] and off.usage.output_tokens == 6


def test_tool_result_turn_renders_as_the_template_says(scripted, scripted_engine, script):
    c = client(scripted, KEY)
    script(THINK_AND_CALL)
    first = c.messages.create(model="m", max_tokens=100, tools=A_TOOLS, messages=QUESTION, extra_body=GREEDY)
    assert [b.model_dump(exclude_none=True) for b in first.content] == CALL_TURN["content"]
    history = QUESTION + [CALL_TURN, RESULT_TURN]
    script("<think>It is sunny.</think>Sunny in Paris.<|im_end|>")
    r = c.messages.create(model="m", max_tokens=100, tools=A_TOOLS, messages=history, extra_body=GREEDY)
    assert texts(r.content) == ("It is sunny.", "Sunny in Paris.") and r.stop_reason == "end_turn"
    expected = prompt_tokens(scripted_engine, OPENAI_HISTORY, TOOLS)
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == expected
    assert c.messages.count_tokens(model="m", tools=A_TOOLS, messages=history).input_tokens == expected
    script("Fine.<|im_end|>")
    via_openai = openai_client(scripted, KEY).chat.completions.create(model="m", messages=OPENAI_HISTORY,
                                                                      tools=TOOLS, max_tokens=5)
    assert via_openai.usage.prompt_tokens == expected
    # the earlier reasoning is in the rendered turn (the template keeps it in a tool loop)
    no_thinking = QUESTION + [{"role": "assistant", "content": CALL_TURN["content"][1:]}, RESULT_TURN]
    assert c.messages.count_tokens(model="m", tools=A_TOOLS, messages=no_thinking).input_tokens < expected


@pytest.mark.parametrize("arguments", ['{"city": 1e999}', '{"city": -2E400}', '["Paris"]', '{"city": "Par'])
def test_arguments_that_are_not_a_json_object_arrive_as_an_empty_input(scripted, script, arguments):
    """A random model may write a number no double holds (json.loads makes it inf, which no JSON
    encoder writes): the call still arrives, its input {}, the raw text in the stream's deltas."""
    text = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            f"{arguments}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    body = {"model": "m", "max_tokens": 100, "temperature": 0, "tools": A_TOOLS, "messages": QUESTION}
    script(text)
    r = client(scripted, KEY).messages.create(**api_args({**body, "stream": False}))
    assert [(b.type, b.name, b.input) for b in r.content] == [("tool_use", "get_weather", {})]
    assert r.stop_reason == "tool_use"
    script(text)
    status, _, data = raw(scripted, "POST", "/v1/messages", {**body, "stream": True}, headers={"x-api-key": KEY})
    events = sse_named(data)
    assert status == 200 and events[-1][0] == "message_stop"
    fragments = [ev["delta"]["partial_json"] for n, ev in events
                 if n == "content_block_delta" and ev["delta"]["type"] == "input_json_delta"]
    assert "".join(fragments) == arguments


def test_blocks_map_to_the_chat_api_messages():
    body = MessagesRequest(model="m", max_tokens=5, system=[{"type": "text", "text": "Rules."}], messages=[
        *QUESTION, CALL_TURN,
        {"role": "user", "content": [
            {"type": "text", "text": "and also"},
            {"type": "tool_result", "tool_use_id": "functions.get_weather:0",
             "content": [{"type": "text", "text": "sun"}]},
            {"type": "tool_result", "tool_use_id": "x_2", "content": "rain", "is_error": True}]},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "opaque"},
                                          {"type": "text", "text": "Done."}]}],
        tools=[*A_TOOLS, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 300}, stop_sequences=["END"])
    messages, tools, choice, parallel = conversation(body)
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "Rules."}]}, *QUESTION, OPENAI_HISTORY[1],
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": [{"type": "text", "text": "sun"}]},
        {"role": "tool", "tool_call_id": "x_2", "content": "rain"},
        {"role": "user", "content": [{"type": "text", "text": "and also"}]},
        {"role": "assistant", "content": "Done."}]
    assert tools == TOOLS                                    # the server tool is dropped
    assert choice == {"type": "function", "function": {"name": "add"}} and parallel is False
    s = _sampling(body, parallel, {"temperature": 0.6})
    assert (s.max_tokens, s.stop, s.max_reasoning_tokens, s.parallel_tool_calls, s.temperature) == (
        5, ["END"], 300, False, 0.6)
    for thinking, budget in (({"type": "disabled"}, 0), ({"type": "adaptive"}, None), (None, None)):
        b = MessagesRequest(model="m", max_tokens=5, messages=HI, thinking=thinking)
        assert _sampling(b, True, {}).max_reasoning_tokens == budget


def test_a_failure_mid_stream_is_an_error_event():
    assert sse_named(_error_event(RuntimeError("boom"))) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "generation failed: boom"}})]


# -- errors: Anthropic's shape ----------------------------------------------------------------------------

def msg(**kw) -> dict:
    return {"model": "m", "max_tokens": 4, "messages": HI, **kw}


# (id, path, body, status, error type, text the message must contain)
ERRORS = [
    ("no-max-tokens", "/v1/messages", {"model": "m", "messages": HI}, 400, "invalid_request_error", "max_tokens"),
    ("max-tokens-zero", "/v1/messages", msg(max_tokens=0), 400, "invalid_request_error", "max_tokens"),
    ("bad-role", "/v1/messages", msg(messages=[{"role": "tool", "content": "x"}]), 400, "invalid_request_error",
     "messages[0].role"),
    ("image-block", "/v1/messages", msg(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]), 400,
     "invalid_request_error", "messages[0].content[0].type: this model reads text only"),
    ("image-in-tool-result", "/v1/messages", msg(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "a", "content": [{"type": "image", "source": {}}]}]}]), 400,
     "invalid_request_error", "messages[0].content[0].content[0].type: this model reads text only"),
    ("tool-choice-undeclared", "/v1/messages", msg(tools=A_TOOLS, tool_choice={"type": "tool", "name": "nope"}), 400,
     "invalid_request_error", "tool_choice"),
    ("tool-choice-unknown-type", "/v1/messages", msg(tool_choice={"type": "sometimes"}), 400,
     "invalid_request_error", "tool_choice"),
    ("tool-without-schema", "/v1/messages", msg(tools=[{"name": "f"}]), 400, "invalid_request_error",
     "tools[0].input_schema"),
    ("temperature-above-one", "/v1/messages", msg(temperature=1.5), 400, "invalid_request_error", "temperature"),
    ("empty-stop-sequence", "/v1/messages", msg(stop_sequences=[""]), 400, "invalid_request_error", "stop_sequences"),
    ("tool-use-from-user", "/v1/messages", msg(messages=[{"role": "user", "content": [
        {"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]), 400, "invalid_request_error",
     "messages[0].content[0].type"),
    ("count-no-messages", "/v1/messages/count_tokens", {"model": "m"}, 400, "invalid_request_error", "messages"),
    ("malformed-json", "/v1/messages", b'{"messages": [', 400, "invalid_request_error", "JSON"),
]


@pytest.mark.parametrize("path,body,status,kind,text", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors_are_in_anthropics_shape(server, path, body, status, kind, text):
    got, _, data = raw(server, "POST", path, body)
    err = json.loads(data)
    assert got == status and err["type"] == "error" and set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] == kind and text in err["error"]["message"]


def test_key_errors_and_the_clients_exceptions(scripted, server):
    for headers in ({}, {"x-api-key": "wrong"}):
        status, _, data = raw(scripted, "POST", "/v1/messages", msg(), headers=headers)
        assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        client(scripted, "wrong").messages.create(**msg())
    with pytest.raises(anthropic.BadRequestError, match="this model reads text only"):
        client(server).messages.create(**msg(messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]))
    assert client(server).messages.create(**msg()).type == "message"         # still serving


def test_count_tokens_needs_a_local_engine(server):
    from kimi_desktop.engines.remote import RemoteEngine
    from kimi_desktop.server import LocalServer, create_app

    remote = RemoteEngine(server.base_url + "/v1")
    proxy = LocalServer(create_app(remote, "proxied"), port=0, logs=False).start_in_thread()
    try:
        with pytest.raises(anthropic.BadRequestError, match="needs a local engine"):
            client(proxy).messages.count_tokens(model="m", messages=HI)
        r = client(proxy).messages.create(**msg(), extra_body=GREEDY)      # the messages route works over it
        assert r.usage.output_tokens == 4 and r.stop_reason == "max_tokens"
    finally:
        proxy.stop()
        remote.close()


def test_claude_code_shapes_system_turns_and_effort(server, server_engine):
    """Claude Code (2.1) puts system turns inside `messages` and sends output_config.effort with
    adaptive thinking: the turn renders as a system message, the effort caps the reasoning."""
    body = MessagesRequest.model_validate({
        "model": "claude-sonnet-4-5", "max_tokens": 64, "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "low"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                     {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}]})
    messages, _, _, parallel = conversation(body)
    assert messages[1] == {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}
    assert _sampling(body, parallel, {}).max_reasoning_tokens == 1024
    status, _, data = raw(server, "POST", "/v1/messages", {**body.model_dump(exclude_none=True), "max_tokens": 4})
    assert status == 200, data
    bad = {"model": "m", "max_tokens": 4, "messages": [
        {"role": "system", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]}
    status, _, data = raw(server, "POST", "/v1/messages", bad)
    err = json.loads(data)
    assert status == 400 and err["type"] == "error" and "messages[0].content[0]" in err["error"]["message"]
