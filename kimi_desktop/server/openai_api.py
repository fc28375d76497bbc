"""OpenAI Chat Completions and Completions over the chat API: requests in, chat-API events out in
OpenAI's exact response and SSE chunk shapes.

Chat: reasoning goes out as `reasoning_content` (mirrored as `reasoning`, the name Ollama and vLLM
use) and is accepted back in history under either name; tool calls keep K2's own ids
(functions.NAME:IDX) and stream as OpenAI's deltas (first the id, type and name with empty
arguments, then argument fragments). A stream the engine cancelled (client gone, server stopping)
just ends: "cancelled" is never a client-visible finish_reason.

Every response carries llama-server's `timings` (streaming.Turn.timings).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kimi_desktop.chat import ContentDelta, Finish, ReasoningDelta, Sampling, TokenLogprobs, ToolCallDelta

from .errors import APIError, error_body
from .openai_schema import ChatCompletionRequest, CompletionRequest, OtherPart
from .streaming import DONE, SSE_HEADERS, Turn, gather, sse, start, streamed

router = APIRouter()

SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop",
                   "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"}


# -- requests -> the chat API -----------------------------------------------------------------------

def _common_checks(body) -> None:
    if body.n is not None and body.n > 1:
        raise APIError(400, "n must be 1: this server generates one choice per request", "n")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")


def _sampling(body, **extra) -> Sampling:
    kw = body.model_dump(include=SAMPLING_FIELDS, exclude_none=True)
    if "seed" in kw:
        kw["seed"] %= 2 ** 64                   # OpenAI's seeds are int64; numpy's are unsigned
    return Sampling.from_openai({**kw, **extra})


def chat_request(body: ChatCompletionRequest) -> tuple[list[dict], list[dict] | None, Any, Sampling]:
    _common_checks(body)
    messages = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if isinstance(part, OtherPart):
                    raise APIError(400, f"this model reads text only: {part.type} content parts are not "
                                        f"supported", f"messages[{i}].content[{j}].type")
        messages.append(m.model_dump(exclude_none=True))
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tool_choice = body.tool_choice
    if tool_choice is not None and not isinstance(tool_choice, str):
        tool_choice = tool_choice.model_dump()
    extra: dict[str, Any] = {}
    if body.logprobs:
        extra["logprobs"] = True
    if body.top_logprobs is not None:
        extra["top_logprobs"] = body.top_logprobs
    if body.response_format is not None:
        extra["response_format"] = body.response_format.model_dump(by_alias=True, exclude_none=True)
    return messages, tools, tool_choice or "auto", _sampling(body, **extra)


def completion_request(body: CompletionRequest) -> tuple[str | list[int], Sampling]:
    _common_checks(body)
    if body.suffix is not None:
        raise APIError(400, "this model has no fill-in-the-middle tokens: suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of > 1:
        raise APIError(400, "best_of must be 1: this server generates one choice per request", "best_of")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if body.echo and not isinstance(prompt, str):
        raise APIError(400, "echo needs a text prompt", "echo")
    extra = {} if body.logprobs is None else {"logprobs": True, "top_logprobs": body.logprobs}
    return prompt, _sampling(body, **extra)


def _error_event(e: Exception) -> bytes:
    return sse(error_body(500, f"generation failed: {e}", None, "internal_error"))


def _sse_response(turn: Turn, chunks) -> StreamingResponse:
    body = streamed(turn, lambda ev: [sse(o) for o in chunks(ev)], _error_event, DONE)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


def usage_dict(turn: Turn) -> dict:
    u = turn.tokens
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def _closing(turn: Turn, head: dict, last: dict, include_usage: bool) -> list[dict]:
    """The finish chunk (with llama-server's timings) and, when asked, the usage chunk (choices: [])."""
    last["timings"] = turn.timings()
    return [last] + ([{**head, "choices": [], "usage": usage_dict(turn)}] if include_usage else [])


def _logprob_entry(lp: TokenLogprobs) -> dict:
    def one(tok: str, v: float) -> dict:
        return {"token": tok, "logprob": v, "bytes": list(tok.encode("utf-8"))}
    return {**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}


# -- /v1/chat/completions -----------------------------------------------------------------------------

@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    messages, tools, tool_choice, sampling = chat_request(body)
    engine = request.app.state.kimi.engine
    stream = await start(request, lambda: engine.chat(messages, tools=tools, tool_choice=tool_choice,
                                                       sampling=sampling))
    turn = Turn(request, stream, "chatcmpl", body.model)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(turn, _chat_chunker(turn, usage))
    acc = {"reasoning": [], "content": [], "calls": [], "logprobs": []}

    def on_event(ev) -> None:
        if isinstance(ev, ReasoningDelta):
            acc["reasoning"].append(ev.text)
        elif isinstance(ev, ContentDelta):
            acc["content"].append(ev.text)
        elif isinstance(ev, ToolCallDelta):
            calls = acc["calls"]
            while len(calls) <= ev.index:
                calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            c = calls[ev.index]
            c["id"] = ev.id if ev.id is not None else c["id"]
            if ev.name is not None:
                c["function"]["name"] = ev.name
            c["function"]["arguments"] += ev.arguments_fragment
        elif isinstance(ev, TokenLogprobs):
            acc["logprobs"].append(_logprob_entry(ev))

    await gather(request, turn, on_event)
    content = "".join(acc["content"])
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not acc["calls"] else None}
    reasoning = "".join(acc["reasoning"])
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    if acc["calls"]:
        message["tool_calls"] = acc["calls"]
    choice = {"index": 0, "message": message,
              "logprobs": {"content": acc["logprobs"]} if sampling.logprobs else None,
              "finish_reason": turn.finish}
    return JSONResponse({"id": turn.id, "object": "chat.completion", "created": turn.created, "model": turn.model,
                         "system_fingerprint": turn.fingerprint, "choices": [choice], "usage": usage_dict(turn),
                         "timings": turn.timings()})


def _chat_chunker(turn: Turn, include_usage: bool):
    head = {"id": turn.id, "object": "chat.completion.chunk", "created": turn.created, "model": turn.model,
            "system_fingerprint": turn.fingerprint}
    opened = False

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        c = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    def chunks(ev) -> list[dict]:
        nonlocal opened
        out = []
        if not opened:
            opened = True
            out.append(chunk({"role": "assistant", "content": ""}))
        if isinstance(ev, ReasoningDelta):
            out.append(chunk({"reasoning_content": ev.text, "reasoning": ev.text}))
        elif isinstance(ev, ContentDelta):
            out.append(chunk({"content": ev.text}))
        elif isinstance(ev, ToolCallDelta):
            call: dict[str, Any] = {"index": ev.index}
            if ev.id is not None or ev.name is not None:
                call.update(id=ev.id, type="function", function={"name": ev.name, "arguments": ev.arguments_fragment})
            else:
                call["function"] = {"arguments": ev.arguments_fragment}
            out.append(chunk({"tool_calls": [call]}))
        elif isinstance(ev, TokenLogprobs):
            out.append(chunk({}, logprobs={"content": [_logprob_entry(ev)]}))
        elif isinstance(ev, Finish) and ev.reason != "cancelled":
            out += _closing(turn, head, chunk({}, ev.reason), include_usage)
        return out
    return chunks


# -- /v1/completions ----------------------------------------------------------------------------------

@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    prompt, sampling = completion_request(body)
    engine = request.app.state.kimi.engine
    if not callable(getattr(engine, "complete", None)):
        raise APIError(400, "/v1/completions needs a local engine (native or llama.cpp); this server runs "
                            f"the {getattr(engine, 'kind', 'remote')} engine", None)
    stream = await start(request, lambda: engine.complete(prompt, sampling))
    turn = Turn(request, stream, "cmpl", body.model)
    echo = prompt if body.echo else ""
    want_lp = body.logprobs is not None
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(turn, _completion_chunker(turn, usage, echo, want_lp))
    text, lps = [echo], []
    await gather(request, turn, lambda ev: text.append(ev.text) if isinstance(ev, ContentDelta)
                  else lps.append(ev) if isinstance(ev, TokenLogprobs) else None)
    choice = {"text": "".join(text), "index": 0, "logprobs": _legacy_logprobs(lps, len(echo)) if want_lp else None,
              "finish_reason": turn.finish}
    return JSONResponse({"id": turn.id, "object": "text_completion", "created": turn.created, "model": turn.model,
                         "system_fingerprint": turn.fingerprint, "choices": [choice], "usage": usage_dict(turn),
                         "timings": turn.timings()})


def _legacy_logprobs(lps: list[TokenLogprobs], offset: int) -> dict:
    """The Completions API's logprobs object: parallel lists and character offsets."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


def _completion_chunker(turn: Turn, include_usage: bool, echo: str, want_lp: bool):
    head = {"id": turn.id, "object": "text_completion", "created": turn.created, "model": turn.model,
            "system_fingerprint": turn.fingerprint}
    state = {"offset": len(echo), "echo": echo}

    def chunk(text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        c = {**head, "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return c

    def chunks(ev) -> list[dict]:
        out = []
        if state["echo"]:
            out.append(chunk(state["echo"]))
            state["echo"] = ""
        if isinstance(ev, ContentDelta):
            out.append(chunk(ev.text))
        elif isinstance(ev, TokenLogprobs) and want_lp:
            out.append(chunk("", logprobs=_legacy_logprobs([ev], state["offset"])))
            state["offset"] += len(ev.token)
        elif isinstance(ev, Finish) and ev.reason != "cancelled":
            out += _closing(turn, head, chunk("", ev.reason), include_usage)
        return out
    return chunks
