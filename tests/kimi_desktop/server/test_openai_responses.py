"""/v1/responses through the official openai client (plain, create(stream=True) and the stream helper),
a raw replay of Codex CLI's request shape, and the stateless refusals."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from kimi_desktop.chat import Sampling

from tests.kimi_desktop.engine_cases import MSGS, TOOL_HISTORY, TOOLS

from .helpers import KEY, open_stream, openai_client, raw, read_until, wait_until
from .test_openai_chat import CALL_ID, THINK_AND_CALL, prompt_tokens

EVENT = TypeAdapter(ResponseStreamEvent)
# the chat tools in the Responses shape
RTOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
          for t in TOOLS]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def strict(obj) -> Response:
    """The response as the SDK's model validates it (the client itself only constructs, unchecked)."""
    return Response.model_validate(obj.model_dump() if hasattr(obj, "model_dump") else obj)


def sse_typed(data: bytes) -> list:
    """An SSE body's events: each `event:` line names its data's type; every event validates as the
    SDK's typed union and the sequence numbers count from 0; no [DONE]."""
    out = []
    for block in data.decode().strip().split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        obj = json.loads(lines[1][len("data: "):])
        assert obj["type"] == lines[0][len("event: "):]
        out.append(EVENT.validate_python(obj))
    assert [e.sequence_number for e in out] == list(range(len(out)))
    return out


def texts(r) -> tuple[str, str]:
    """(reasoning, text) of a response's output."""
    reasoning = "".join(c.text for it in r.output if it.type == "reasoning" for c in it.content or [])
    return reasoning, "".join(c.text for it in r.output if it.type == "message" for c in it.content)


# -- the tiny random model: the engine's answer ----------------------------------------------------------------

def test_plain_answer_is_the_engine_answer_and_stops_incomplete(server, server_engine):
    r = openai_client(server).responses.create(model="gpt-5", input="Hi", max_output_tokens=8, temperature=0)
    strict(r)
    direct = server_engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8)).result()
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "gpt-5"
    assert texts(r) == (direct.reasoning, direct.content) and r.output_text == direct.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == prompt_tokens(server_engine, MSGS) and r.usage.output_tokens == 8
    assert r.usage.total_tokens == r.usage.input_tokens + 8
    assert 0 <= r.usage.output_tokens_details.reasoning_tokens <= 8
    kinds = [it.type for it in r.output]
    assert kinds == (["reasoning"] if direct.reasoning else []) + (["message"] if direct.content else [])
    for it in r.output:
        assert it.id.startswith({"reasoning": "rs_", "message": "msg_"}[it.type])
    assert r.output[-1].type != "message" or r.output[-1].status == "incomplete"


def test_instructions_and_message_items_render_as_messages(server, server_engine):
    c = openai_client(server)
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Hi "},
                                          {"type": "input_text", "text": "there"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": "More"}]
    r = c.responses.create(model="m", instructions="You are terse.", input=items, max_output_tokens=3, temperature=0)
    same = [{"role": "system", "content": "You are terse."}, {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "More"}]
    assert r.usage.input_tokens == prompt_tokens(server_engine, same)
    direct = server_engine.chat(same, sampling=Sampling(temperature=0, max_tokens=3)).result()
    assert texts(r) == (direct.reasoning, direct.content)


def test_streamed_answer_matches_the_plain_one(server):
    c = openai_client(server)
    plain = c.responses.create(model="m", input="Hi", max_output_tokens=10, temperature=0)
    status, headers, data = raw(server, "POST", "/v1/responses",
                                {"model": "m", "input": "Hi", "max_output_tokens": 10, "temperature": 0,
                                 "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    evs = sse_typed(data)
    assert [e.type for e in evs[:2]] == ["response.created", "response.in_progress"]
    assert evs[0].response.status == "in_progress" and evs[0].response.output == []
    assert evs[-1].type == "response.incomplete"
    final = evs[-1].response
    assert final.id == evs[0].response.id and final.incomplete_details.reason == "max_output_tokens"
    assert "".join(e.delta for e in evs if e.type == "response.output_text.delta") == plain.output_text
    assert "".join(e.delta for e in evs if e.type == "response.reasoning_text.delta") == texts(plain)[0]
    assert texts(final) == texts(plain) and final.usage.output_tokens == 10
    # the same through the client's own stream
    got = list(c.responses.create(model="m", input="Hi", max_output_tokens=10, temperature=0, stream=True))
    assert [e.type for e in got] == [e.type for e in evs] and texts(got[-1].response) == texts(plain)


def test_reasoning_effort_is_the_reasoning_budget(server, server_engine):
    c = openai_client(server)
    for effort, cap in (("none", 0), ("minimal", 256)):
        r = c.responses.create(model="m", input="Hi", max_output_tokens=8, temperature=0, reasoning={"effort": effort})
        direct = server_engine.chat(MSGS, sampling=Sampling(temperature=0, max_tokens=8,
                                                            max_reasoning_tokens=cap)).result()
        assert texts(r) == (direct.reasoning, direct.content) and r.reasoning.effort == effort
    assert texts(r)[0] and not texts(c.responses.create(model="m", input="Hi", max_output_tokens=8, temperature=0,
                                                        reasoning={"effort": "none"}))[0]


def test_tool_choice_required_named_and_none(server, server_engine):
    c = openai_client(server)
    r = c.responses.create(model="m", input=[{"role": "user", "content": "Weather in Paris?"}], tools=RTOOLS,
                           tool_choice="required", max_output_tokens=60, temperature=1.0, extra_body={"seed": 1})
    calls = [it for it in r.output if it.type == "function_call"]
    assert calls and r.status == "completed" and not any(it.type == "message" for it in r.output)
    for i, fc in enumerate(calls):
        m = CALL_ID.match(fc.call_id)
        assert m and m.group(1) == fc.name and int(m.group(2)) == i and fc.id.startswith("fc_")
        assert isinstance(json.loads(fc.arguments), dict) and fc.status == "completed"
    named = c.responses.create(model="m", input="Hi", tools=RTOOLS, tool_choice={"type": "function", "name": "add"},
                               max_output_tokens=40, temperature=1.0, extra_body={"seed": 2})
    assert [it.name for it in named.output if it.type == "function_call"] == ["add"]
    assert named.tool_choice.name == "add"
    none = c.responses.create(model="m", input="Hi", tools=RTOOLS, tool_choice="none", max_output_tokens=20,
                              temperature=1.0, extra_body={"seed": 3})
    assert not any(it.type == "function_call" for it in none.output)
    assert none.usage.input_tokens == prompt_tokens(server_engine, MSGS)        # tools not offered
    js = c.responses.create(model="m", input="Hi", max_output_tokens=40, temperature=1.0, extra_body={"seed": 4},
                            text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(js.output_text), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    jss = c.responses.create(model="m", input="Hi", max_output_tokens=40, temperature=1.0, extra_body={"seed": 5},
                             text={"format": {"type": "json_schema", "name": "x", "schema": schema, "strict": True}})
    assert "name" in json.loads(jss.output_text) and jss.text.format.type == "json_schema"


# -- the scripted model: reasoning and K2 tool calls end to end ----------------------------------------------------

def test_reasoning_and_function_call_items(scripted, script):
    script(THINK_AND_CALL)
    r = openai_client(scripted, KEY).responses.create(model="m", input=QUESTION, tools=RTOOLS, temperature=0)
    strict(r)
    assert r.status == "completed" and [it.type for it in r.output] == ["reasoning", "function_call"]
    rs, fc = r.output
    assert rs.summary == [] and [(c.type, c.text) for c in rs.content] == [("reasoning_text", "I should look it up.")]
    assert (fc.call_id, fc.name, fc.arguments, fc.status) == (
        "functions.get_weather:0", "get_weather", '{"city": "Paris"}', "completed")
    assert r.output_text == "" and r.usage.output_tokens_details.reasoning_tokens > 0
    assert [t.name for t in r.tools] == ["get_weather", "add"] and r.tool_choice == "auto"


def test_streamed_reasoning_and_function_call_through_the_stream_helper(scripted, script):
    script(THINK_AND_CALL)
    c = openai_client(scripted, KEY)
    with c.responses.stream(model="m", input=QUESTION, tools=RTOOLS, temperature=0) as stream:
        evs = list(stream)
        final = stream.get_final_response()
    script(THINK_AND_CALL)
    plain = c.responses.create(model="m", input=QUESTION, tools=RTOOLS, temperature=0)
    assert [e.type for e in evs] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        *["response.reasoning_text.delta"] * sum(e.type == "response.reasoning_text.delta" for e in evs),
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * sum(e.type == "response.function_call_arguments.delta"
                                                          for e in evs),
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert "".join(e.delta for e in evs if e.type == "response.reasoning_text.delta") == "I should look it up."
    added = [e.item for e in evs if e.type == "response.output_item.added"]
    assert added[1].type == "function_call" and added[1].call_id == "functions.get_weather:0"
    assert added[1].arguments == "" and added[1].status == "in_progress"
    assert "".join(e.delta for e in evs if e.type == "response.function_call_arguments.delta") == '{"city": "Paris"}'
    done = next(e for e in evs if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"city": "Paris"}' and done.item_id == added[1].id
    strip = lambda r: [{k: v for k, v in it.model_dump().items() if k not in ("id", "parsed_arguments")}  # noqa: E731
                       for it in r.output]              # parsed_arguments: the stream helper's own field
    assert strip(final) == strip(plain) and final.status == "completed"


def test_streamed_reasoning_and_message_through_the_stream_helper(scripted, script):
    script("<think>It is sunny.</think>Sunny in Paris.<|im_end|>")
    with openai_client(scripted, KEY).responses.stream(model="m", input=QUESTION, temperature=0) as stream:
        evs = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in evs]
    n_r, n_t = kinds.count("response.reasoning_text.delta"), kinds.count("response.output_text.delta")
    assert n_r and n_t and kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", *["response.reasoning_text.delta"] * n_r,
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", *["response.output_text.delta"] * n_t,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert evs[-2].item.status == "completed" and evs[-3].part.text == evs[-4].text == "Sunny in Paris."
    assert [e.snapshot for e in evs if e.type == "response.output_text.delta"][-1] == "Sunny in Paris."
    assert final.output_text == "Sunny in Paris." and texts(final) == ("It is sunny.", "Sunny in Paris.")
    assert final.status == "completed" and final.usage.output_tokens > 0


PARALLEL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
            '{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.add:1<|tool_call_argument_begin|>'
            '{"a": 2, "b": 3}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


@pytest.mark.parametrize("parallel", [None, False])
def test_parallel_function_calls_and_parallel_tool_calls_false(scripted, script, parallel):
    script(PARALLEL)
    kw = {} if parallel is None else {"parallel_tool_calls": parallel}
    if parallel is False:
        script(PARALLEL)
        one = openai_client(scripted, KEY).responses.create(model="m", input=QUESTION, tools=RTOOLS, max_tool_calls=1)
        assert [it.call_id for it in one.output] == ["functions.get_weather:0"]
        script(PARALLEL)
    c = openai_client(scripted, KEY)
    r = c.responses.create(model="m", input=QUESTION, tools=RTOOLS, temperature=0, **kw)
    calls = [(it.call_id, it.name, it.arguments) for it in r.output if it.type == "function_call"]
    both = [("functions.get_weather:0", "get_weather", '{"city": "Paris"}'),
            ("functions.add:1", "add", '{"a": 2, "b": 3}')]
    assert calls == (both if parallel is None else both[:1]) and r.status == "completed"
    assert r.parallel_tool_calls is (parallel is None)
    script(PARALLEL)
    with c.responses.stream(model="m", input=QUESTION, tools=RTOOLS, temperature=0, **kw) as stream:
        evs = list(stream)
    added = [e.item.call_id for e in evs if e.type == "response.output_item.added"]
    assert added == [c[0] for c in calls]
    assert [(it.call_id, it.name, it.arguments) for it in stream.get_final_response().output] == calls


def test_a_failure_mid_stream_is_response_failed(scripted, scripted_engine):
    scripted_engine.session.script = [scripted_engine.vocab + 1]      # the session's feed raises IndexError
    c = openai_client(scripted, KEY)
    evs = list(c.responses.create(model="m", input=QUESTION, temperature=0, stream=True))
    assert [e.type for e in evs] == ["response.created", "response.in_progress", "response.failed"]
    assert evs[-1].response.status == "failed" and evs[-1].response.error.code == "server_error"
    with pytest.raises(openai.InternalServerError):
        c.responses.create(model="m", input=QUESTION, temperature=0)


def test_tool_results_sent_back_render_as_the_template_says(scripted, scripted_engine, script):
    c = openai_client(scripted, KEY)
    script(THINK_AND_CALL)
    first = c.responses.create(model="m", input=QUESTION, tools=RTOOLS, temperature=0)
    back = QUESTION + [it.model_dump(exclude_none=True) for it in first.output] + [
        {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sunny"}]
    script("<think>It is sunny.</think>Sunny in Paris.<|im_end|>")
    r = c.responses.create(model="m", input=back, tools=RTOOLS, temperature=0)
    assert r.output_text == "Sunny in Paris." and r.status == "completed"
    assert texts(r) == ("It is sunny.", "Sunny in Paris.")
    same = QUESTION + [{"role": "assistant", "content": "", "reasoning_content": "I should look it up.",
                        "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                       {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    assert r.usage.input_tokens == prompt_tokens(scripted_engine, same, TOOLS)
    # the reasoning item is what puts the earlier reasoning into the rendered turn
    no_reasoning = [it for it in back if it.get("type") != "reasoning"]
    r2 = c.responses.create(model="m", input=no_reasoning, tools=RTOOLS, temperature=0)
    del same[1]["reasoning_content"]
    assert r2.usage.input_tokens == prompt_tokens(scripted_engine, same, TOOLS) < r.usage.input_tokens
    # tool output as parts, and a custom_tool_call of Codex's kept as a call
    parts = back[:-1] + [{"type": "function_call_output", "call_id": "functions.get_weather:0",
                          "output": [{"type": "input_text", "text": "sun"}, {"type": "input_text", "text": "ny"}]}]
    assert c.responses.create(model="m", input=parts, tools=RTOOLS).usage.input_tokens == r.usage.input_tokens


def test_tool_history_ids_are_kept(server, server_engine):
    """function_call items keep their call_id as the tool call's id; the next call's IDX counts them."""
    hist = [{"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "functions.get_weather:0", "name": "get_weather",
             "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "functions.get_weather:0", "output": "sunny"},
            {"role": "user", "content": "And 2+3?"}]
    r = openai_client(server).responses.create(model="m", input=hist, tools=RTOOLS, tool_choice="required",
                                               max_output_tokens=60, temperature=1.0, extra_body={"seed": 1})
    assert r.usage.input_tokens == prompt_tokens(server_engine, TOOL_HISTORY, TOOLS)
    idx = [int(CALL_ID.match(it.call_id).group(2)) for it in r.output if it.type == "function_call"]
    assert idx and idx[0] == 1


# -- Codex CLI -------------------------------------------------------------------------------------------------------

SHELL = {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
         "strict": False, "parameters": {"type": "object", "properties": {
             "command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"}},
             "required": ["command"], "additionalProperties": False}}


PERMISSIONS = "<permissions instructions>sandbox: workspace-write</permissions instructions>"


def codex_body(**kw) -> dict:
    """A request as Codex CLI builds it (codex-rs ResponsesApiRequest: model, instructions, input,
    tools, tool_choice, parallel_tool_calls, reasoning, store, stream, include, prompt_cache_key, text)."""
    body = {
        "model": "gpt-5-codex", "instructions": "You are Codex, a coding agent.",
        "input": [
            {"type": "message", "role": "developer", "content": [
                {"type": "input_text", "text": PERMISSIONS}]},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "<environment_context><cwd>/repo</cwd></environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]}],
        "tools": [SHELL, {"type": "local_shell"}, {"type": "web_search"},
                  {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch.",
                   "format": {"type": "grammar", "syntax": "lark",
                              "definition": "start: begin_patch hunk+ end_patch"}}],
        "tool_choice": "auto", "parallel_tool_calls": False, "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False, "stream": True, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "text": {"verbosity": "medium"}}
    body.update(kw)
    return body


CODEX_CALL = ('<think>Run ls.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.shell:0'
              '<|tool_call_argument_begin|>{"command": ["ls"]}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')


def test_codex_request_replay_streams_with_only_function_tools(scripted, scripted_engine, script, caplog):
    script(CODEX_CALL)
    with caplog.at_level(logging.INFO, logger="kimi_desktop"):
        status, headers, data = raw(scripted, "POST", "/v1/responses", codex_body(),
                                    {"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "responses=experimental",
                                     "session_id": "0199a1b2", "originator": "codex_cli_rs"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    evs = sse_typed(data)
    final = evs[-1].response
    assert evs[-1].type == "response.completed" and final.status == "completed"
    assert [(it.type, getattr(it, "name", None)) for it in final.output] == [
        ("reasoning", None), ("function_call", "shell")]
    call = final.output[1]
    assert call.call_id == "functions.shell:0" and json.loads(call.arguments) == {"command": ["ls"]}
    assert [t.name for t in final.tools] == ["shell"] and final.parallel_tool_calls is False
    # only the function tool reached the model: the prompt is the one rendered with it alone
    same = [{"role": "system", "content": "You are Codex, a coding agent."},
            {"role": "developer", "content": PERMISSIONS},
            {"role": "user", "content": "<environment_context><cwd>/repo</cwd></environment_context>"},
            {"role": "user", "content": "List the files."}]
    fn = {k: v for k, v in SHELL.items() if k != "type"}
    assert final.usage.input_tokens == prompt_tokens(scripted_engine, same, [{"type": "function", "function": fn}])
    dropped = [r.getMessage() for r in caplog.records if "dropped tools" in r.getMessage()]
    assert len(dropped) == 1 and "local_shell, web_search, custom (apply_patch)" in dropped[0]
    # Codex sends the whole history back, its reasoning item included (content, encrypted_content null)
    items = codex_body()["input"] + [it.model_dump() for it in final.output] + [
        {"type": "function_call_output", "call_id": "functions.shell:0", "output": "README.md\n"}]
    script("<think>Done.</think>One file: README.md<|im_end|>")
    status, _, data = raw(scripted, "POST", "/v1/responses", codex_body(input=items),
                          {"Authorization": f"Bearer {KEY}"})
    second = sse_typed(data)[-1].response
    assert status == 200 and texts(second) == ("Done.", "One file: README.md")


def test_codex_warm_up_and_empty_requests_get_an_empty_completed_response(scripted):
    auth = {"Authorization": f"Bearer {KEY}"}
    for body in (codex_body(input=[], generate=False), codex_body(generate=False), {"model": "m", "input": []},
                 {"model": "m"}, codex_body(input=[])):
        status, _, data = raw(scripted, "POST", "/v1/responses", body, auth)
        assert status == 200, data
        evs = sse_typed(data) if body.get("stream") else None
        final = evs[-1].response if evs else strict(json.loads(data))
        assert final.status == "completed" and final.output == [] and final.usage.output_tokens == 0
        if evs:
            assert [e.type for e in evs] == ["response.created", "response.in_progress", "response.completed"]


# -- refusals ------------------------------------------------------------------------------------------------------

def test_stateless_and_text_only_refusals(server):
    c = openai_client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="m", input="Hi", previous_response_id="resp_123")
    err = e.value.body
    assert err["param"] == "previous_response_id" and err["message"] == (
        "previous_response_id is not supported: this server keeps no responses; send the whole conversation in input")
    cases = [({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
              "input[0].content[0].type", "reads text only"),
             ({"input": [{"type": "function_call_output", "call_id": "x",
                          "output": [{"type": "input_file", "file_id": "f"}]}]},
              "input[0].output[0].type", "text only"),
             ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id", "keeps no items"),
             ({"input": "Hi", "conversation": "conv_1"}, "conversation", "keeps no responses"),
             ({"input": "Hi", "background": True}, "background", "background"),
             ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "required"),
             ({"input": "Hi", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", "pattern"),
             ({"input": "Hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
             ({"input": "Hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": RTOOLS}, "tool_choice",
              "not in tools"),
             ({"input": "Hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "Input should be"),
             ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens", "greater than"),
             ({"input": "x " * 5000}, "input", "context holds")]
    for extra, param, words in cases:
        status, _, data = raw(server, "POST", "/v1/responses", {"model": "m", **extra})
        err = json.loads(data)["error"]
        assert status == 400 and err["param"] == param and words in err["message"], (extra, err)
        assert err["type"] == "invalid_request_error"
    assert raw(server, "GET", "/health")[0] == 200                      # still serving


def test_unknown_fields_and_items_are_ignored(server, server_engine):
    body = {"model": "m", "input": [{"type": "web_search_call", "id": "ws_1", "status": "completed",
                                     "action": {"type": "search", "query": "x"}},
                                    {"role": "user", "content": "Hi"}],
            "max_output_tokens": 2, "temperature": 0, "store": True, "metadata": {"k": "v"}, "user": "u",
            "service_tier": "auto", "truncation": "auto", "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k", "safety_identifier": "s", "stream_options": {"include_obfuscation": False},
            "some_future_field": {"x": 1}}
    status, _, data = raw(server, "POST", "/v1/responses", body)
    r = strict(json.loads(data))
    assert status == 200 and r.usage.input_tokens == prompt_tokens(server_engine, MSGS)
    assert r.metadata == {"k": "v"} and r.truncation == "auto"


def test_a_client_that_disconnects_mid_stream_cancels_the_generation(scripted, scripted_engine, script):
    script("<think></think>" + " a" * 400 + "<|im_end|>", delay=0.01)
    sock = open_stream(scripted, "/v1/responses", {"model": "m", "input": "go", "stream": True}, KEY)
    assert b"response.created" in read_until(sock, b"response.output_text.delta")
    sock.close()
    at_close = scripted_engine.session.feeds
    assert wait_until(lambda: not scripted_engine.stats()["busy"], 5)
    assert scripted_engine.session.feeds - at_close < 50          # long before the 400 tokens
