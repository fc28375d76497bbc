"""Anthropic Messages (POST /v1/messages, POST /v1/messages/count_tokens) over the chat API.

Request -> the OpenAI-shaped conversation engine.chat() takes:
    system (string or text blocks)            a system message first
    user text blocks                          a user message (text parts, rendered as the template joins them)
    user tool_result blocks                   tool messages (tool_call_id = tool_use_id), in order, before
                                              the same message's text
    assistant text / thinking / tool_use      one assistant message: content, reasoning_content (so
                                              K2-Thinking's reasoning returns to history) and tool_calls
                                              whose ids are the tool_use ids, unchanged
    redacted_thinking                         dropped (opaque to this model); image / document: 400
    tools                                     client tools -> function tools (input_schema -> parameters);
                                              server tools (a type other than custom) dropped with a log line
    tool_choice auto | any | tool | none      auto | required | named | none; disable_parallel_tool_use
                                              -> at most one call (Sampling.parallel_tool_calls)
    thinking                                  Sampling.max_reasoning_tokens (reasoning.thinking_budget)
    max_tokens, stop_sequences, temperature, top_p, top_k -> Sampling (unset ones: the model's defaults)

Events -> content blocks in the order they come: thinking (signature ""), text, tool_use (id K2's own
functions.NAME:IDX, input the parsed arguments). stop_reason: end_turn, stop_sequence (with the
string), max_tokens, tool_use. usage as Anthropic counts it: input_tokens excludes
cache_read_input_tokens (the prompt prefix the engine reused); message_start carries the whole prompt
as input_tokens (the reuse is known only later) and message_delta the final counts, which the
client's accumulator keeps. Streamed as message_start, content_block_start / _delta / _stop per block,
message_delta, message_stop; a failure mid-stream is an `error` event. Errors are in Anthropic's shape
(errors.body_for picks it by path).
"""

from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kimi_desktop.chat import (ChatRequestError, ContentDelta, Finish, ReasoningDelta, Sampling, ToolCallDelta,
                              parse_tool_arguments)
from kimi_desktop.notices import log

from .anthropic_schema import (CountTokensRequest, MediaBlock, MessagesRequest, RedactedThinkingBlock,
                               TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock)
from .errors import APIError, anthropic_error_body, from_chat_error
from .reasoning import thinking_budget
from .streaming import SSE_HEADERS, Turn, gather, generation_defaults, sse, start, streamed

router = APIRouter()

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
PARAMS = {"stop": "stop_sequences", "max_reasoning_tokens": "thinking.budget_tokens"}   # chat API -> ours


# -- the request -> the chat API ----------------------------------------------------------------------

def _media(block: MediaBlock, where: str):
    raise APIError(400, f"{where}.type: this model reads text only: {block.type} blocks are not supported",
                   f"{where}.type")


def _parts(blocks, where: str) -> list[dict]:
    """Text blocks as OpenAI text parts; anything else is refused."""
    out = []
    for j, b in enumerate(blocks):
        if isinstance(b, MediaBlock):
            _media(b, f"{where}[{j}]")
        if not isinstance(b, TextBlock):
            raise APIError(400, f"{where}[{j}]: only text blocks belong here, got a {b.type} block",
                           f"{where}[{j}].type")
        out.append({"type": "text", "text": b.text})
    return out


def _user(content: list, where: str) -> list[dict]:
    tools, parts = [], []
    for j, b in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(b, ToolResultBlock):
            result = b.content if isinstance(b.content, str) else _parts(b.content or [], f"{at}.content")
            tools.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": result})
        elif isinstance(b, TextBlock):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, MediaBlock):
            _media(b, at)
        else:
            raise APIError(400, f"{at}.type: {b.type} blocks belong to assistant messages", f"{at}.type")
    return tools + ([{"role": "user", "content": parts}] if parts or not tools else [])


def _assistant(content: list, where: str) -> dict:
    text, reasoning, calls = [], [], []
    for j, b in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(b, TextBlock):
            text.append(b.text)
        elif isinstance(b, ThinkingBlock):
            reasoning.append(b.thinking)
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif isinstance(b, MediaBlock):
            _media(b, at)
        elif not isinstance(b, RedactedThinkingBlock):
            raise APIError(400, f"{at}.type: {b.type} blocks belong to user messages", f"{at}.type")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(tools) -> list[dict] | None:
    out = []
    for i, t in enumerate(tools or ()):
        if t.type not in (None, "custom"):
            log.info(f"/v1/messages: dropping tools[{i}] ({t.name!r}, type {t.type}): this server runs "
                     f"client tools only")
            continue
        if t.input_schema is None:
            raise APIError(400, f"tools[{i}].input_schema: a custom tool needs an input_schema (a JSON schema "
                                f"object)", f"tools[{i}].input_schema")
        fn = {"name": t.name, "parameters": t.input_schema}
        if t.description is not None:
            fn["description"] = t.description
        out.append({"type": "function", "function": fn})
    return out or None


def conversation(body: CountTokensRequest) -> tuple[list[dict], list[dict] | None, Any, bool]:
    """(messages, tools, tool_choice, parallel_tool_calls) for engine.chat()."""
    messages: list[dict] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else _parts(body.system, "system")
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
        elif m.role == "system":
            messages.append({"role": "system", "content": _parts(m.content, where)})
        elif m.role == "user":
            messages += _user(m.content, where)
        else:
            messages.append(_assistant(m.content, where))
    tc = body.tool_choice
    choice: Any = "auto" if tc is None else {"auto": "auto", "any": "required", "none": "none"}.get(tc.type)
    if choice is None:
        choice = {"type": "function", "function": {"name": tc.name}}
    parallel = not getattr(tc, "disable_parallel_tool_use", None)
    return messages, _tools(body.tools), choice, parallel


def _sampling(body: MessagesRequest, parallel: bool, defaults: dict) -> Sampling:
    kw = body.model_dump(include={"max_tokens", "temperature", "top_p", "top_k"}, exclude_none=True)
    kw.update(stop=body.stop_sequences or None, parallel_tool_calls=parallel,
              max_reasoning_tokens=thinking_budget(body.thinking.model_dump() if body.thinking else None,
                                                   body.output_config.effort if body.output_config else None))
    return Sampling.from_openai(kw, defaults)


def _refused(e: ChatRequestError) -> APIError:
    """The engine's refusal, naming our field where the chat API's name differs."""
    err = from_chat_error(e)
    err.param = PARAMS.get(err.param, err.param)
    return err


# -- chat-API events -> content blocks -------------------------------------------------------------------

class Blocks:
    """Chat-API events -> Anthropic stream events [(event name, object)], and the content blocks they
    add up to (`content`, for a plain answer); `finish` is the Finish event once it came."""

    def __init__(self):
        self.content: list[dict] = []
        self.finish: Finish | None = None
        self._open: tuple | None = None         # ("thinking" | "text", None) or ("tool_use", call index)
        self._args = ""                         # the open tool call's arguments so far

    def feed(self, ev) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if isinstance(ev, ReasoningDelta):
            out += self._switch(("thinking", None), {"type": "thinking", "thinking": "", "signature": ""})
            self.content[-1]["thinking"] += ev.text
            out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
        elif isinstance(ev, ContentDelta):
            out += self._switch(("text", None), {"type": "text", "text": ""})
            self.content[-1]["text"] += ev.text
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
        elif isinstance(ev, ToolCallDelta):
            out += self._switch(("tool_use", ev.index), {"type": "tool_use", "id": ev.id, "name": ev.name,
                                                         "input": {}})
            if ev.arguments_fragment:
                self._args += ev.arguments_fragment
                out.append(self._delta({"type": "input_json_delta", "partial_json": ev.arguments_fragment}))
        elif isinstance(ev, Finish):
            self.finish = ev
            out += self._close()
        return out

    def stop(self) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence)."""
        f = self.finish
        if f.reason == "stop" and f.stop_sequence is not None:
            return "stop_sequence", f.stop_sequence
        return STOP_REASONS[f.reason], None

    def _delta(self, delta: dict) -> tuple[str, dict]:
        return "content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                       "delta": delta}

    def _switch(self, key: tuple, block: dict) -> list[tuple[str, dict]]:
        if self._open == key:
            return []
        out = self._close()
        self._open = key
        self.content.append(block)
        return out + [("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                               "content_block": dict(block)})]

    def _close(self) -> list[tuple[str, dict]]:
        if self._open is None:
            return []
        out, block = [], self.content[-1]
        if block["type"] == "thinking":         # Anthropic's clients expect one before the block ends
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        elif block["type"] == "tool_use":
            block["input"] = _tool_input(self._args, block["name"])
            self._args = ""
        self._open = None
        return out + [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]


def _tool_input(arguments: str, name: str) -> dict:
    try:
        return parse_tool_arguments(arguments)
    except ValueError as e:
        log.warning(f"/v1/messages: the model's arguments for {name!r} are not a JSON object, sent as {{}}: {e}")
        return {}


def _usage(turn: Turn) -> dict:
    u = turn.tokens
    return {"input_tokens": u.prompt_tokens - u.cached_prompt_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_prompt_tokens}


def _message(turn: Turn, content: list, stop: tuple[str | None, str | None], usage: dict) -> dict:
    return {"id": turn.id, "type": "message", "role": "assistant", "model": turn.model, "content": content,
            "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}


# -- the routes ------------------------------------------------------------------------------------------------

@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    engine = request.app.state.kimi.engine
    msgs, tools, choice, parallel = conversation(body)
    sampling = _sampling(body, parallel, generation_defaults(engine))
    try:
        stream = await start(request, lambda: engine.chat(msgs, tools=tools, tool_choice=choice, sampling=sampling))
    except ChatRequestError as e:
        raise _refused(e) from None
    turn = Turn(request, stream, "msg_", body.model)
    blocks = Blocks()
    if body.stream:
        head = {"input_tokens": stream.prompt_tokens or 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}
        head = sse({"type": "message_start", "message": _message(turn, [], (None, None), head)},
                   event="message_start")
        return StreamingResponse(streamed(turn, _chunker(turn, blocks), _error_event, head=head),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await gather(request, turn, blocks.feed)
    return JSONResponse(_message(turn, blocks.content, blocks.stop(), _usage(turn)))


def _chunker(turn: Turn, blocks: Blocks):
    def chunks(ev) -> list[bytes]:
        out = [sse(obj, event=name) for name, obj in blocks.feed(ev)]
        if isinstance(ev, Finish) and ev.reason != "cancelled":
            reason, seq = blocks.stop()
            out.append(sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                            "usage": _usage(turn)}, event="message_delta"))
            out.append(sse({"type": "message_stop"}, event="message_stop"))
        return out
    return chunks


def _error_event(e: Exception) -> bytes:
    return sse(anthropic_error_body(500, f"generation failed: {e}"), event="error")


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    engine = request.app.state.kimi.engine
    if not callable(getattr(engine, "prompt_tokens", None)):
        raise APIError(400, "/v1/messages/count_tokens needs a local engine (native or llama.cpp); this server "
                            f"runs the {getattr(engine, 'kind', 'remote')} engine", None)
    msgs, tools, choice, _ = conversation(body)
    try:
        n = await to_thread.run_sync(engine.prompt_tokens, msgs, None if choice == "none" else tools)
    except ChatRequestError as e:
        raise _refused(e) from None
    return {"input_tokens": n}
