"""OpenAI Chat Completions and Completions over the chat API: requests in, chat-API events out in
OpenAI's exact response and SSE chunk shapes.

Chat: reasoning goes out as `reasoning_content` (mirrored as `reasoning`, the name Ollama and vLLM
use) and is accepted back in history under either name; tool calls keep K2's own ids
(functions.NAME:IDX) and stream as OpenAI's deltas (first the id, type and name with empty
arguments, then argument fragments). A stream the engine cancelled (client gone, server stopping)
just ends: "cancelled" is never a client-visible finish_reason.

Every response carries llama-server's `timings` (streaming.Turn.timings).

n > 1: the n choices run one after another in the engine's queue (choices.Choices: seeds seed,
seed + 1, ... when a seed is given; usage counts the prompt once and sums the completions); streamed
chunks carry each choice's index, the choices' chunks follow each other in order. Sampling fields a
request leaves unset come from the model's generation_defaults() (its generation_config.json), else
the API's defaults. `reasoning_effort` (or vLLM's `thinking_token_budget`, which wins) caps the
reasoning (reasoning.py); parallel_tool_calls false allows one tool call per turn.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kimi_desktop.chat import (ContentDelta, Finish, PrefillProgress, ReasoningDelta, Sampling, TokenLogprobs,
                               ToolCallDelta, Usage)

from .choices import Choices, Indexed, seeded
from .errors import APIError, error_body
from .openai_schema import ChatCompletionRequest, CompletionRequest, OtherPart
from .reasoning import effort_budget
from .streaming import DONE, SSE_HEADERS, Turn, gather, generation_defaults, sse, start, streamed

router = APIRouter()

SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop",
                   "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"}


# -- requests -> the chat API -----------------------------------------------------------------------

def _common_checks(body) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")


def _sampling(body, defaults: dict | None, **extra) -> Sampling:
    kw = body.model_dump(include=SAMPLING_FIELDS, exclude_none=True)
    if "seed" in kw:
        kw["seed"] %= 2 ** 64                   # OpenAI's seeds are int64; numpy's are unsigned
    return Sampling.from_openai({**kw, **extra}, defaults)


def chat_request(body: ChatCompletionRequest, defaults: dict | None = None
                 ) -> tuple[list[dict], list[dict] | None, Any, Sampling]:
    """The chat API's arguments for a request; `defaults` fill the sampling fields it leaves unset."""
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
    if body.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = body.parallel_tool_calls
    budget = body.thinking_token_budget if body.thinking_token_budget is not None \
        else effort_budget(body.reasoning_effort)
    if budget is not None:
        extra["max_reasoning_tokens"] = budget
    return messages, tools, tool_choice or "auto", _sampling(body, defaults, **extra)


def completion_request(body: CompletionRequest, defaults: dict | None = None) -> tuple[str | list[int], Sampling]:
    _common_checks(body)
    if body.suffix is not None:
        raise APIError(400, "this model has no fill-in-the-middle tokens: suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of must equal n: this server returns every choice it generates", "best_of")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if body.echo and not isinstance(prompt, str):
        raise APIError(400, "echo needs a text prompt", "echo")
    extra = {} if body.logprobs is None else {"logprobs": True, "top_logprobs": body.logprobs}
    return prompt, _sampling(body, defaults, **extra)


async def _start_choices(request: Request, n: int, sampling: Sampling, begin):
    """One stream (n = 1) or a Choices group of n, each `begin(sampling_i)` queued back to back."""
    if n == 1:
        return await start(request, lambda: begin(sampling))
    return await start(request, lambda: Choices([lambda s=s: begin(s) for s in seeded(sampling, n)]))


def _fan_out(turn: Turn, per_choice, include_usage: bool, head: dict):
    """The SSE chunker of n choices: `per_choice(index, sub_turn)` -> that choice's chunker (whose
    finish chunk carries the choice's own timings); the usage chunk comes after the last choice."""
    subs = [_Sub(s) for s in turn.stream.streams]
    chunkers = [per_choice(i, sub) for i, sub in enumerate(subs)]

    def chunks(ev) -> list[dict]:
        if isinstance(ev, Indexed):
            subs[ev.index].see(ev.event)
            return chunkers[ev.index](ev.event)
        if isinstance(ev, Finish) and ev.reason != "cancelled" and include_usage:
            return [{**head, "choices": [], "usage": usage_dict(turn)}]
        return []
    return chunks


class _Sub:
    """One choice of a group, for its own timings (Turn's, over the choice's stream and usage)."""

    tokens = Turn.tokens
    timings = Turn.timings

    def __init__(self, stream):
        self.stream, self.usage, self.ended_at = stream, None, None

    def see(self, ev) -> None:
        if isinstance(ev, Usage):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.ended_at = time.monotonic()


def _per_choice(n: int, on_event) -> tuple[list, Any]:
    """n accumulators and the gather callback that feeds them (events, or Indexed events of a group)."""
    accs = [on_event() for _ in range(n)]

    def feed(ev) -> None:
        if isinstance(ev, Indexed):
            accs[ev.index].add(ev.event)
        elif n == 1:
            accs[0].add(ev)
    return accs, feed


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

class _ChatChoice:
    """One choice's message, gathered from its events."""

    def __init__(self):
        self.reasoning, self.content, self.calls, self.logprobs = [], [], [], []
        self.finish: str | None = None

    def add(self, ev) -> None:
        if isinstance(ev, ReasoningDelta):
            self.reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            self.content.append(ev.text)
        elif isinstance(ev, ToolCallDelta):
            while len(self.calls) <= ev.index:
                self.calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
            c = self.calls[ev.index]
            c["id"] = ev.id if ev.id is not None else c["id"]
            if ev.name is not None:
                c["function"]["name"] = ev.name
            c["function"]["arguments"] += ev.arguments_fragment
        elif isinstance(ev, TokenLogprobs):
            self.logprobs.append(_logprob_entry(ev))
        elif isinstance(ev, Finish):
            self.finish = ev.reason

    def choice(self, index: int, logprobs: bool) -> dict:
        content = "".join(self.content)
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not self.calls else None}
        reasoning = "".join(self.reasoning)
        if reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        if self.calls:
            message["tool_calls"] = self.calls
        return {"index": index, "message": message,
                "logprobs": {"content": self.logprobs} if logprobs else None, "finish_reason": self.finish}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = request.app.state.kimi.engine
    messages, tools, tool_choice, sampling = chat_request(body, generation_defaults(engine))
    n = body.n or 1
    stream = await _start_choices(request, n, sampling, lambda s: engine.chat(
        messages, tools=tools, tool_choice=tool_choice, sampling=s))
    turn = Turn(request, stream, "chatcmpl", body.model)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        if n == 1:
            return _sse_response(turn, _chat_chunker(turn, usage))
        return _sse_response(turn, _fan_out(turn, lambda i, sub: _chat_chunker(sub, False, i, turn),
                                            usage, _head(turn, "chat.completion.chunk")))
    accs, feed = _per_choice(n, _ChatChoice)
    await gather(request, turn, feed)
    return JSONResponse({"id": turn.id, "object": "chat.completion", "created": turn.created, "model": turn.model,
                         "system_fingerprint": turn.fingerprint,
                         "choices": [a.choice(i, sampling.logprobs) for i, a in enumerate(accs)],
                         "usage": usage_dict(turn), "timings": turn.timings()})


def _head(turn: Turn, kind: str) -> dict:
    """What every chunk of a streamed answer repeats: its identity and object type."""
    return {"id": turn.id, "object": kind, "created": turn.created, "model": turn.model,
            "system_fingerprint": turn.fingerprint}


def _chunk(head: dict, include_usage: bool, choice: dict) -> dict:
    """One streamed chunk of one choice; with include_usage every chunk but the last has "usage": null."""
    c = {**head, "choices": [choice]}
    if include_usage:
        c["usage"] = None
    return c


def _chat_chunker(turn, include_usage: bool, index: int = 0, group: Turn | None = None):
    """The chunks of one choice; `turn` gives its timings, `group` (n > 1) the response's identity."""
    head = _head(group or turn, "chat.completion.chunk")
    opened = False

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return _chunk(head, include_usage, {"index": index, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish})

    def chunks(ev) -> list[dict]:
        nonlocal opened
        out = []
        if isinstance(ev, PrefillProgress) or (isinstance(ev, Finish) and ev.reason == "cancelled"):
            return out                  # progress is no part of the answer: it must not open the message
        if not opened and not isinstance(ev, Usage):
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
        elif isinstance(ev, Finish):
            out += _closing(turn, head, chunk({}, ev.reason), include_usage)
        return out
    return chunks


# -- /v1/completions ----------------------------------------------------------------------------------

class _TextChoice:
    """One completion choice, gathered from its events."""

    def __init__(self, echo: str):
        self.text, self.lps, self.echo = [echo], [], echo
        self.finish: str | None = None

    def add(self, ev) -> None:
        if isinstance(ev, ContentDelta):
            self.text.append(ev.text)
        elif isinstance(ev, TokenLogprobs):
            self.lps.append(ev)
        elif isinstance(ev, Finish):
            self.finish = ev.reason

    def choice(self, index: int, want_lp: bool) -> dict:
        return {"text": "".join(self.text), "index": index,
                "logprobs": _legacy_logprobs(self.lps, len(self.echo)) if want_lp else None,
                "finish_reason": self.finish}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine = request.app.state.kimi.engine
    prompt, sampling = completion_request(body, generation_defaults(engine))
    if not callable(getattr(engine, "complete", None)):
        raise APIError(400, "/v1/completions needs a local engine (native or llama.cpp); this server runs "
                            f"the {getattr(engine, 'kind', 'remote')} engine", None)
    n = body.n or 1
    stream = await _start_choices(request, n, sampling, lambda s: engine.complete(prompt, s))
    turn = Turn(request, stream, "cmpl", body.model)
    echo = prompt if body.echo else ""
    want_lp = body.logprobs is not None
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        if n == 1:
            return _sse_response(turn, _completion_chunker(turn, usage, echo, want_lp))
        per_choice = lambda i, sub: _completion_chunker(sub, False, echo, want_lp, i, turn)    # noqa: E731
        return _sse_response(turn, _fan_out(turn, per_choice, usage, _head(turn, "text_completion")))
    accs, feed = _per_choice(n, lambda: _TextChoice(echo))
    await gather(request, turn, feed)
    return JSONResponse({"id": turn.id, "object": "text_completion", "created": turn.created, "model": turn.model,
                         "system_fingerprint": turn.fingerprint,
                         "choices": [a.choice(i, want_lp) for i, a in enumerate(accs)],
                         "usage": usage_dict(turn), "timings": turn.timings()})


def _legacy_logprobs(lps: list[TokenLogprobs], offset: int) -> dict:
    """The Completions API's logprobs object: parallel lists and character offsets."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


def _completion_chunker(turn, include_usage: bool, echo: str, want_lp: bool, index: int = 0,
                        group: Turn | None = None):
    head = _head(group or turn, "text_completion")
    state = {"offset": len(echo), "echo": echo}

    def chunk(text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return _chunk(head, include_usage, {"text": text, "index": index, "logprobs": logprobs,
                                            "finish_reason": finish})

    def chunks(ev) -> list[dict]:
        out = []
        if isinstance(ev, (Usage, PrefillProgress)) or (isinstance(ev, Finish) and ev.reason == "cancelled"):
            return out
        if state["echo"]:
            out.append(chunk(state["echo"]))
            state["echo"] = ""
        if isinstance(ev, ContentDelta):
            out.append(chunk(ev.text))
        elif isinstance(ev, TokenLogprobs) and want_lp:
            out.append(chunk("", logprobs=_legacy_logprobs([ev], state["offset"])))
            state["offset"] += len(ev.token)
        elif isinstance(ev, Finish):
            out += _closing(turn, head, chunk("", ev.reason), include_usage)
        return out
    return chunks
