"""The OpenAI Responses API (POST /v1/responses), stateless, over the chat API.

Request -> chat API:
    instructions                      a system message first
    input "text"                      one user message
    message items                     messages (input_text / output_text parts joined; images and files: 400)
    reasoning items                   the assistant message's reasoning_content (content's reasoning_text,
                                      else the summary's text), so K2-Thinking's reasoning returns to history
    function_call items               the assistant message's tool_calls (id = call_id, unchanged)
    function_call_output items        tool messages (tool_call_id = call_id)
    Codex's custom_tool_call (+ _output), local_shell_call   tool calls / tool messages as above
    other item types                  dropped with one log line; item_reference: 400 (nothing is stored)
    consecutive assistant-side items (reasoning, assistant message, calls) make one assistant message.
    tools: type function kept; every other type (Codex's local_shell, web_search, custom) dropped with
    one log line; tool_choice auto | none | required | {type: function, name}; parallel_tool_calls
    (max_tool_calls 1 means false; larger values are not enforced); max_output_tokens ->
    max_tokens; reasoning.effort -> Sampling.max_reasoning_tokens (reasoning.effort_budget);
    text.format -> response_format. previous_response_id, conversation and background answer 400 (this
    server keeps nothing); store, include, metadata, user, service_tier, prompt_cache_key, truncation
    are accepted (truncation "auto" never truncates: a prompt past the context is a 400, as "disabled").
    An empty request (no input items, or Codex's warm-up `generate: false`) is answered with an empty
    completed response without running the model.

Events -> response (responses_output.py): a reasoning item (rs_...) while it thinks, a message item
(msg_...) while it writes, a function_call item (fc_..., call_id K2's own functions.NAME:IDX) per call;
status completed, or incomplete (reason max_output_tokens) when the token budget ran out. Streamed as
the Responses event types, each `event: TYPE` + `data: JSON` with a sequence_number; no [DONE].
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kimi_desktop.chat import ChatRequestError, Sampling
from kimi_desktop.notices import log

from .errors import APIError, from_chat_error
from .reasoning import effort_budget
from .responses_output import Output, new_id, response_object, usage_object
from .responses_schema import (CustomToolCallItem, CustomToolCallOutputItem, FunctionCallItem,
                               FunctionCallOutputItem, FunctionTool, ItemReference, LocalShellCallItem,
                               MediaPart, MessageItem, NamedFunction, ReasoningItem, RefusalPart,
                               ResponsesRequest)
from .streaming import SSE_HEADERS, Turn, gather, generation_defaults, sse, start, streamed

router = APIRouter()

SAMPLING_FIELDS = {"temperature", "top_p", "stop", "seed", "top_k", "min_p", "presence_penalty",
                   "frequency_penalty", "repetition_penalty"}
STATELESS = "this server keeps no responses; send the whole conversation in input"


# -- the request -> the chat API -------------------------------------------------------------------------------

def _refuse_state(body: ResponsesRequest) -> None:
    if body.previous_response_id is not None:
        raise APIError(400, f"previous_response_id is not supported: {STATELESS}", "previous_response_id")
    if body.conversation is not None:
        raise APIError(400, f"conversation is not supported: {STATELESS}", "conversation")
    if body.background:
        raise APIError(400, "background is not supported: this server answers while the client waits "
                            "and keeps no responses to poll", "background")


def _text(content, where: str) -> str:
    """A string, or text parts joined (as the chat template joins a message's text parts)."""
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if isinstance(part, MediaPart):
            raise APIError(400, f"this model reads text only: {part.type} content is not supported",
                           f"{where}[{j}].type")
        out.append(part.refusal if isinstance(part, RefusalPart) else part.text)
    return "".join(out)


def _reasoning_text(item: ReasoningItem) -> str:
    parts = item.content if item.content else item.summary
    return "\n\n".join(p.text for p in parts)


def to_messages(body: ResponsesRequest) -> list[dict]:
    """The OpenAI-shaped conversation that `instructions` and `input` stand for."""
    messages: list[dict] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input or []
    turn: dict | None = None            # the assistant message that assistant-side items add to
    dropped: list[str] = []

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    def call(call_id: str, name: str, arguments: str) -> None:
        assistant().setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})

    for i, it in enumerate(items):
        where = f"input[{i}]"
        if isinstance(it, MessageItem) and it.role == "assistant":
            assistant()["content"] += _text(it.content, f"{where}.content")
        elif isinstance(it, MessageItem):
            turn = None
            messages.append({"role": it.role, "content": _text(it.content, f"{where}.content")})
        elif isinstance(it, ReasoningItem):
            text = _reasoning_text(it)
            if text:
                a = assistant()
                a["reasoning_content"] = a.get("reasoning_content", "") + text
        elif isinstance(it, FunctionCallItem):
            call(it.call_id, it.name, it.arguments)
        elif isinstance(it, CustomToolCallItem):
            call(it.call_id, it.name, it.input)
        elif isinstance(it, LocalShellCallItem):
            call(it.call_id or it.id or f"local_shell:{i}", "local_shell", json.dumps(it.action, ensure_ascii=False))
        elif isinstance(it, (FunctionCallOutputItem, CustomToolCallOutputItem)):
            turn = None
            messages.append({"role": "tool", "tool_call_id": it.call_id,
                             "content": _text(it.output, f"{where}.output")})
        elif isinstance(it, ItemReference):
            raise APIError(400, "item_reference is not supported: this server keeps no items; send the items "
                                "themselves in input", f"{where}.id")
        else:
            dropped.append(it.type)
    if dropped:
        log.info("responses: dropped input items of types this server does not use: %s", ", ".join(dropped))
    return messages


def to_tools(body: ResponsesRequest) -> list[dict] | None:
    """Function tools in the chat API's shape; the other tool types are dropped (one log line)."""
    kept, dropped = [], []
    for t in body.tools or []:
        if isinstance(t, FunctionTool):
            fn = t.model_dump(include={"name", "description", "parameters", "strict"}, exclude_none=True)
            kept.append({"type": "function", "function": fn})
        else:
            dropped.append(t.type + (f" ({t.model_extra['name']})" if isinstance((t.model_extra or {}).get("name"), str)
                                     else ""))
    if dropped:
        log.info("responses: dropped tools this server does not run (only function tools reach the model): %s",
                 ", ".join(dropped))
    return kept or None


def to_sampling(body: ResponsesRequest, defaults: dict | None = None) -> Sampling:
    """`defaults` (the model's generation_config) fill the sampling fields the request leaves unset."""
    kw: dict[str, Any] = body.model_dump(include=SAMPLING_FIELDS, exclude_none=True)
    if "seed" in kw:
        kw["seed"] %= 2 ** 64                   # OpenAI's seeds are int64; numpy's are unsigned
    if body.max_output_tokens is not None:
        kw["max_tokens"] = body.max_output_tokens
    if body.reasoning is not None and body.reasoning.effort is not None:
        kw["max_reasoning_tokens"] = effort_budget(body.reasoning.effort)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        kw["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name or "response", "schema": fmt.schema_ or {}}
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        kw["response_format"] = {"type": "json_schema", "json_schema": spec}
    if body.parallel_tool_calls is not None:
        kw["parallel_tool_calls"] = body.parallel_tool_calls
    if body.max_tool_calls == 1:            # one call at most: what parallel_tool_calls false does
        kw["parallel_tool_calls"] = False
    return Sampling.from_openai(kw, defaults)


def _tool_choice(body: ResponsesRequest):
    tc = body.tool_choice
    if isinstance(tc, NamedFunction):
        return {"type": "function", "function": {"name": tc.name}}
    return tc or "auto"


def _engine_error(e: ChatRequestError) -> APIError:
    """The engine names the chat API's fields; this API calls the conversation `input`."""
    err = from_chat_error(e)
    if err.param == "messages":
        err.param = "input"
        if err.message.startswith("messages"):
            err.message = "input" + err.message[len("messages"):]
    return err


# -- the route ---------------------------------------------------------------------------------------------------

@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request):
    _refuse_state(body)
    st = request.app.state.kimi
    messages, tools = to_messages(body), to_tools(body)
    sampling, tool_choice = to_sampling(body, generation_defaults(st.engine)), _tool_choice(body)
    probe = body.generate is False or not any(m["role"] != "system" for m in messages)
    if probe:                           # a warm-up or an empty request: nothing to generate
        return _empty_answer(body, st.model_name)
    engine = st.engine
    try:
        stream = await start(request, lambda: engine.chat(messages, tools=tools, tool_choice=tool_choice,
                                                           sampling=sampling))
    except ChatRequestError as e:
        raise _engine_error(e) from None
    turn = Turn(request, stream, "resp_", body.model)
    out = Output(getattr(engine, "tokenizer", None))
    if body.stream:
        return StreamingResponse(_sse(turn, body, out), media_type="text/event-stream", headers=SSE_HEADERS)
    await gather(request, turn, out.feed)
    return JSONResponse(response_object(turn.id, turn.created, turn.model, body, out.status(turn.finish),
                                        out.items, usage_object(turn.tokens, out.reasoning_tokens())))


def _empty_answer(body: ResponsesRequest, model_name: str):
    rid, created, model = new_id("resp"), int(time.time()), body.model or model_name
    final = response_object(rid, created, model, body, "completed", [], usage_object(None, 0))
    if not body.stream:
        return JSONResponse(final)
    pending = response_object(rid, created, model, body, "in_progress", [], None)
    events = [("response.created", pending), ("response.in_progress", pending), ("response.completed", final)]
    data = b"".join(sse({"type": t, "sequence_number": i, "response": r}, event=t)
                    for i, (t, r) in enumerate(events))
    return StreamingResponse(iter([data]), media_type="text/event-stream", headers=SSE_HEADERS)


def _sse(turn: Turn, body: ResponsesRequest, out: Output):
    seq = 0

    def enc(obj: dict) -> bytes:
        nonlocal seq
        obj["sequence_number"] = seq
        seq += 1
        return sse(obj, event=obj["type"])

    def lifecycle(kind: str, status: str) -> dict:
        usage = usage_object(turn.tokens, out.reasoning_tokens()) if status != "in_progress" else None
        return {"type": kind, "response": response_object(turn.id, turn.created, turn.model, body, status,
                                                          out.items if status != "in_progress" else [], usage)}

    def chunks(ev) -> list[bytes]:
        data = [enc(e) for e in out.feed(ev)]
        if out.finished is not None and out.finished != "cancelled":
            status = out.status(out.finished)
            data.append(enc(lifecycle("response.incomplete" if status == "incomplete" else "response.completed",
                                      status)))
        return data

    def on_error(e: Exception) -> bytes:
        failed = lifecycle("response.failed", "failed")
        failed["response"]["error"] = {"code": "server_error", "message": f"generation failed: {e}"}
        return enc(failed)

    # created / in_progress go out at once: the client sees them while the request waits in the queue
    head = enc(lifecycle("response.created", "in_progress")) + enc(lifecycle("response.in_progress", "in_progress"))
    return streamed(turn, chunks, on_error, head=head)
