"""The `remote` engine: any OpenAI-compatible endpoint (Moonshot's API, a vLLM / SGLang cluster serving
K2, llama-server, ...) behind the chat API, through the official `openai` client (imported lazily).

    engine = RemoteEngine("http://gpu-box:8000/v1", api_key=None, model="moonshotai/Kimi-K2-Thinking")
    for ev in engine.chat(messages, tools=tools, sampling=Sampling(max_tokens=512)): ...

Request: `client.chat.completions.create(stream=True, stream_options={"include_usage": true}, ...)`
with the OpenAI fields of Sampling: temperature and top_p always; max_tokens, stop, seed,
presence_penalty / frequency_penalty (when non-zero), logprobs / top_logprobs, response_format when
set; tools and tool_choice when tools are given (tool_choice and response_format are enforced by the
server, not here). top_k, min_p and repetition_penalty are not OpenAI fields: when a request sets them
(non-default) they go in `extra_body` (vLLM, SGLang and llama-server read them there). Endpoints that
reject unknown fields (api.openai.com, and any engine built with extra_sampling=False) get a
ChatRequestError naming the field instead. Sampling.max_reasoning_tokens goes the same way, as vLLM's
`thinking_token_budget` (vLLM and this project's server enforce it). parallel_tool_calls false is
sent as such (an OpenAI field). `extra_body=` on the engine adds fields to every request (e.g.
chat_template_kwargs). generation_defaults() is {}: the endpoint applies its own.

Stream: each chunk's choices[0].delta is mapped to events: reasoning_content (Moonshot, DeepSeek, older
vLLM) or reasoning (newer vLLM, OpenRouter) -> ReasoningDelta; content -> ContentDelta;
tool_calls[] -> ToolCallDelta (index: position of the call in this response, by first appearance of
the server's index; id and name on the call's first delta, as the server sent them; then argument
fragments); logprobs.content[] -> TokenLogprobs; the usage chunk -> Usage (cached prompt tokens from
usage.prompt_tokens_details.cached_tokens or Moonshot's usage.cached_tokens); finish_reason -> Finish
(function_call -> tool_calls, content_filter -> stop, and stop -> tool_calls when the response made
tool calls, as the local engines report it: OpenAI and vLLM say "stop" after a forced named call).
Usage and Finish come last, as on the local engines; without a usage chunk, Usage counts
prompt_tokens 0 and one completion token per delta.
With raw_k2_output="thinking" | "instruct", content is raw K2 text (a server without a reasoning /
tool parser) and goes through the K2 output parser (feed_text).

Errors: the server's error status, an error event in the stream, a refused connection, a timeout or a
stream that ends without a finish_reason raise RemoteEngineError (RemoteConnectionError for the
network ones) from the stream's iterator, with status_code / code / param / body where the server
gave them. cancel() shuts the HTTP connection down at once (the server sees the client leave), and
the stream ends with Usage and Finish("cancelled"). One request runs at a time, in FIFO order, like
the local engines (a cluster serves many, but this engine is one user's session).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_desktop.chat import (ChatRequestError, ChatStream, ContentDelta, Finish, ReasoningDelta,
                               Sampling, TokenLogprobs, ToolCallDelta, Usage, count_history_tool_calls,
                               validate_request)

from .common import EXPERT_STATS_NONE, QueuedEngine, process_rss

__all__ = ["RemoteEngine", "RemoteEngineError", "RemoteConnectionError", "ChunkMapper", "EXTRA_SAMPLING"]

# Sampling fields that are not OpenAI's: sent in extra_body when they differ from these defaults
EXTRA_SAMPLING = (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0))
FINISH_MAP = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
              "content_filter": "stop", "eos": "stop"}
STRICT_HOSTS = ("api.openai.com",)          # endpoints that reject unknown request fields


class RemoteEngineError(RuntimeError):
    """The endpoint failed a request. status_code: the HTTP status (None for a network failure or an
    error event inside the stream); code / param / type / body: what the server's error object said."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None, body: Any = None):
        super().__init__(message)
        self.status_code, self.code, self.param, self.type, self.body = status_code, code, param, type, body


class RemoteConnectionError(RemoteEngineError):
    """The endpoint could not be reached, timed out, or the stream broke off."""


def normalize_base_url(base_url: str) -> str:
    """http://host:8000 -> http://host:8000/v1 (a URL with a path is kept as given)."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    u = urllib.parse.urlsplit(base_url.strip())
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"base_url must be an http(s) URL like http://127.0.0.1:8000/v1, got {base_url!r}")
    path = u.path.rstrip("/")
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _as_dict(obj: Any) -> Any:
    """A chunk (pydantic model from the openai client, or a plain dict) as plain dicts and lists,
    extra (non-OpenAI) fields included."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Mapping):
        return {k: _as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_dict(v) for v in obj]
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump()
    return obj


class _TextOnlyVocab:
    """What K2OutputParser needs when it only ever sees text (feed_text)."""
    special_ids: dict = {}
    eos_ids: tuple = ()
    num_base = 0

    def decode_bytes(self, ids) -> bytes:
        return b""

    def drop_special(self, ids) -> list:
        return []


class ChunkMapper:
    """OpenAI stream chunks (dicts) -> the chat API's events; see the module docstring.

    feed(chunk) -> events to deliver now; finish() -> the last text events (raw K2 parsing) and
    unnamed tool calls; then .usage (Usage or None) and .finish_reason (the project's, or None if the
    server never sent one)."""

    def __init__(self, call_index_base: int = 0, raw_k2_output: str | None = None):
        if raw_k2_output not in (None, "thinking", "instruct"):
            raise ValueError(f"raw_k2_output must be None, 'thinking' or 'instruct', got {raw_k2_output!r}")
        self.call_index_base = call_index_base
        self.parser = None
        if raw_k2_output is not None:
            from kimi_desktop.runtime.k2_output import K2OutputParser
            self.parser = K2OutputParser(_TextOnlyVocab(), reasoning=raw_k2_output == "thinking")
        self._calls: dict[Any, dict] = {}            # server index -> {"id", "name", "pending", "out"}
        self.n_calls = 0
        self.usage: Usage | None = None
        self.server_finish: str | None = None
        self.n_deltas = 0

    @property
    def finish_reason(self) -> str | None:
        if self.server_finish is None:
            return None
        reason = FINISH_MAP.get(self.server_finish, "stop")
        if reason == "stop" and (self.n_calls or (self.parser is not None and self.parser.tool_calls)):
            reason = "tool_calls"           # OpenAI and vLLM say "stop" after a forced (named) call
        return reason

    def feed(self, chunk: Any) -> list:
        chunk = _as_dict(chunk)
        out: list = []
        if not isinstance(chunk, Mapping):
            return out
        usage = chunk.get("usage")
        if isinstance(usage, Mapping) and usage.get("prompt_tokens") is not None:
            details = usage.get("prompt_tokens_details") or {}
            cached = (details.get("cached_tokens") if isinstance(details, Mapping) else None) \
                or usage.get("cached_tokens") or 0
            self.usage = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                               int(cached))
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, Mapping) or (choice.get("index") or 0) != 0:
                continue                                # n = 1: only the first choice
            delta = choice.get("delta") or {}
            if isinstance(delta, Mapping):
                self._delta(delta, out)
            lp = choice.get("logprobs")
            if isinstance(lp, Mapping):
                for item in lp.get("content") or ():
                    if isinstance(item, Mapping) and item.get("token") is not None:
                        top = tuple((t.get("token", ""), float(t.get("logprob", 0.0)))
                                    for t in item.get("top_logprobs") or () if isinstance(t, Mapping))
                        out.append(TokenLogprobs(item["token"], float(item.get("logprob", 0.0)), top))
            if choice.get("finish_reason"):
                self.server_finish = str(choice["finish_reason"])
        return out

    def finish(self) -> list:
        out: list = []
        if self.parser is not None:
            out.extend(self.parser.finish())
        for st in self._calls.values():             # calls whose name never came: still delivered
            if st["out"] is None:
                self._open_call(st, st["name"] or "", out)
        return out

    # -- internals -----------------------------------------------------------------------------
    def _delta(self, delta: Mapping, out: list) -> None:
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.n_deltas += 1
            out.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.n_deltas += 1
            if self.parser is not None:
                out.extend(self.parser.feed_text(content))
            else:
                out.append(ContentDelta(content))
        calls = delta.get("tool_calls")
        if not calls and isinstance(delta.get("function_call"), Mapping):     # the legacy field
            calls = [{"index": 0, "function": delta["function_call"]}]
        for tc in calls or ():
            if isinstance(tc, Mapping):
                self.n_deltas += 1
                self._tool_call(tc, out)

    def _tool_call(self, tc: Mapping, out: list) -> None:
        key = tc.get("index")
        key = 0 if key is None else key
        fn = tc.get("function") or {}
        st = self._calls.get(key)
        if st is None:
            st = self._calls[key] = {"id": None, "name": None, "pending": "", "out": None}
        if tc.get("id") and st["id"] is None:
            st["id"] = str(tc["id"])
        if isinstance(fn, Mapping) and fn.get("name") and st["name"] is None:
            st["name"] = str(fn["name"])
        args = fn.get("arguments") if isinstance(fn, Mapping) else None
        args = args if isinstance(args, str) else ""
        if st["out"] is None:
            st["pending"] += args
            if st["name"] is not None:
                self._open_call(st, st["name"], out)
        elif args:
            out.append(ToolCallDelta(st["out"], None, None, args))

    def _open_call(self, st: dict, name: str, out: list) -> None:
        st["out"] = idx = self.n_calls
        self.n_calls += 1
        call_id = st["id"] or f"functions.{name}:{self.call_index_base + idx}"     # K2's id form
        out.append(ToolCallDelta(idx, call_id, name, ""))
        if st["pending"]:
            out.append(ToolCallDelta(idx, None, None, st["pending"]))
            st["pending"] = ""


class _Call:
    """The HTTP side of one running request, for cancel() from another thread."""

    def __init__(self):
        self.response = None            # the openai Stream, once the server answered
        self.lock = threading.Lock()
        self.shut = False

    def set(self, response) -> None:
        with self.lock:
            self.response = response

    def shutdown(self) -> None:
        """Tear the connection down now: a reader blocked in recv() returns at once."""
        with self.lock:
            resp, self.shut = self.response, True
        if resp is None:
            return
        http = getattr(resp, "response", None)          # the httpx response under the openai Stream
        try:
            ns = (getattr(http, "extensions", None) or {}).get("network_stream")
            sock = ns.get_extra_info("socket") if ns is not None else None
            if sock is not None and getattr(http, "http_version", "HTTP/1.1") == "HTTP/1.1":
                sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            pass
        try:
            resp.close()
        except Exception:
            pass


class RemoteEngine(QueuedEngine):
    """The chat API on an OpenAI-compatible endpoint (see the module docstring).

    base_url: the API root (http://host:8000 gets /v1 appended). api_key: default $OPENAI_API_KEY,
    else a placeholder (local servers need none). model: default the first id of GET /models.
    timeout: seconds to connect (at most 15) and between two chunks of the stream.
    max_retries: the openai client's retries of a failed request (before any event was delivered).
    extra_sampling: whether the endpoint takes top_k / min_p / repetition_penalty (default: yes,
    except api.openai.com). extra_body: fields added to every request. raw_k2_output: see above.
    client: an openai.OpenAI to use instead of building one.
    """

    kind = "remote"
    thread_name = "kimi-remote-gen"

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0, *, max_retries: int = 2, extra_sampling: bool | None = None,
                 extra_body: Mapping[str, Any] | None = None, include_usage: bool = True,
                 raw_k2_output: str | None = None, client=None):
        self.base_url = normalize_base_url(base_url)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if raw_k2_output not in (None, "thinking", "instruct"):
            raise ValueError(f"raw_k2_output must be None, 'thinking' or 'instruct', got {raw_k2_output!r}")
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        self.extra_sampling = (host not in STRICT_HOSTS) if extra_sampling is None else bool(extra_sampling)
        self.extra_body = dict(extra_body or {})
        self.include_usage = include_usage
        self.raw_k2_output = raw_k2_output
        self.model = model
        self.timeout = float(timeout)
        if client is None:
            try:
                import openai
            except ImportError as e:            # pragma: no cover - openai is a dependency
                raise RuntimeError("the remote engine needs the openai package (pip install openai)") from e
            key = api_key or os.environ.get("OPENAI_API_KEY") or "no-key"
            client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=max_retries,
                                   timeout=openai.Timeout(self.timeout, connect=min(self.timeout, 15.0)))
        self.client = client
        self._init_queue()
        self._stats: dict[str, Any] = {
            "decode_tok_s": 0.0, "prefill_tok_s": None, "ttft_s": None,
            "last_prompt_tokens": 0, "last_prefill_tokens": 0, "last_cached_tokens": 0,
            "last_completion_tokens": 0, "prefill_tokens_total": 0, "completion_tokens_total": 0,
            "requests": 0, "errors": 0, "last_error": None,
        }

    # -- the API -----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] = "auto", sampling: Sampling | None = None) -> ChatStream:
        self._check_open()
        sampling, _norm, _choice, _fmt = validate_request(messages, tools, tool_choice, sampling)
        kwargs = self.request_kwargs(messages, tools, tool_choice, sampling)
        mapper = ChunkMapper(count_history_tool_calls(messages), self.raw_k2_output)
        call = _Call()

        def on_cancel():
            self.lock.wake()
            call.shutdown()

        return self._start(ChatStream(on_cancel=on_cancel),
                           lambda stream: self._run(stream, call, kwargs, mapper), 0)

    def request_kwargs(self, messages, tools, tool_choice, sampling: Sampling) -> dict:
        """The keyword arguments for client.chat.completions.create (without model and stream)."""
        s = sampling
        kw: dict[str, Any] = {"messages": [dict(m) for m in messages],
                              "temperature": float(s.temperature), "top_p": float(s.top_p)}
        if s.max_tokens is not None:
            kw["max_tokens"] = int(s.max_tokens)
        if s.stop is not None:
            kw["stop"] = s.stop_list()
        if s.seed is not None:
            kw["seed"] = int(s.seed)
        if s.presence_penalty:
            kw["presence_penalty"] = float(s.presence_penalty)
        if s.frequency_penalty:
            kw["frequency_penalty"] = float(s.frequency_penalty)
        if s.logprobs:
            kw["logprobs"] = True
            if s.top_logprobs:
                kw["top_logprobs"] = int(s.top_logprobs)
        if s.response_format is not None:
            kw["response_format"] = dict(s.response_format)
        if tools:
            kw["tools"] = [dict(t) for t in tools]
            kw["tool_choice"] = tool_choice if tool_choice is not None else "auto"
            if not s.parallel_tool_calls:
                kw["parallel_tool_calls"] = False
        if self.include_usage:
            kw["stream_options"] = {"include_usage": True}
        extra = dict(self.extra_body)
        for name, default in EXTRA_SAMPLING:
            v = getattr(s, name)
            if v != default:
                if not self.extra_sampling:
                    raise ChatRequestError(f"{name} is not supported by the endpoint {self.base_url}", name)
                extra[name] = v
        if s.max_reasoning_tokens is not None:
            if not self.extra_sampling:
                raise ChatRequestError(f"max_reasoning_tokens (a reasoning budget) cannot be enforced by the "
                                       f"endpoint {self.base_url}: it takes no thinking_token_budget",
                                       "max_reasoning_tokens")
            extra["thinking_token_budget"] = int(s.max_reasoning_tokens)
        if extra:
            kw["extra_body"] = extra
        return kw

    def generation_defaults(self) -> dict:
        """{}: the endpoint fills unset sampling fields with its own defaults."""
        return {}

    def stats(self) -> dict:
        with self._state_lock:
            s = dict(self._stats)
        s.update({
            "engine": self.kind, "model": self.model, "base_url": self.base_url,
            "context_used": s["last_prompt_tokens"] + s["last_completion_tokens"], "context_size": None,
            "resident_bytes": process_rss(), "waiting": self.lock.waiting(), "busy": self.lock.busy(),
        })
        s.update(EXPERT_STATS_NONE)
        return s

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every stream, wait for the workers, close the client."""
        self._stop_workers(timeout)
        try:
            self.client.close()
        except Exception:
            pass

    # -- internals ---------------------------------------------------------------------------------
    def _model_name(self) -> str:
        if self.model is None:
            try:
                page = self.client.models.list()
                ids = [m.id for m in getattr(page, "data", None) or page]
            except Exception as e:
                raise _map_error(e, self.base_url, "listing the models") from e
            if not ids:
                raise RemoteEngineError(f"{self.base_url}: the server lists no models; pass model=")
            self.model = ids[0]
        return self.model

    def _on_error(self, e: BaseException) -> None:
        with self._state_lock:
            self._stats["errors"] += 1
            self._stats["last_error"] = str(e)

    def _run(self, stream: ChatStream, call: _Call, kwargs: dict, mapper: ChunkMapper) -> None:
        t0 = time.monotonic()
        t_first = None
        model = self._model_name()
        resp = None
        cancelled = lambda: stream.cancelled or self._closed     # noqa: E731
        try:
            if not cancelled():
                resp = self.client.chat.completions.create(model=model, stream=True, **kwargs)
                call.set(resp)
                if call.shut or cancelled():
                    call.shutdown()
                else:
                    for chunk in resp:
                        if cancelled():
                            break
                        for ev in mapper.feed(chunk):
                            if t_first is None and isinstance(ev, (ReasoningDelta, ContentDelta, ToolCallDelta)):
                                t_first = time.monotonic()
                                stream.first_token_at = t_first
                            stream.put(ev)
        except Exception as e:
            if not cancelled():                 # a torn-down connection after cancel() is expected
                raise _map_error(e, self.base_url) from e
        finally:
            if resp is not None:
                try:
                    resp.close()
                except Exception:
                    pass
        t_end = time.monotonic()
        if cancelled():
            reason = "cancelled"
        else:
            for ev in mapper.finish():
                stream.put(ev)
            reason = mapper.finish_reason
            if reason is None:
                raise RemoteConnectionError(f"{self.base_url}: the stream ended without a finish_reason "
                                            f"(the connection broke off?)")
        usage = mapper.usage or Usage(0, mapper.n_deltas, 0)
        with self._state_lock:
            st = self._stats
            st["requests"] += 1
            st["last_prompt_tokens"] = usage.prompt_tokens
            st["last_cached_tokens"] = usage.cached_prompt_tokens
            st["last_prefill_tokens"] = usage.prompt_tokens - usage.cached_prompt_tokens
            st["last_completion_tokens"] = usage.completion_tokens
            st["prefill_tokens_total"] += usage.prompt_tokens - usage.cached_prompt_tokens
            st["completion_tokens_total"] += usage.completion_tokens
            if t_first is not None:
                st["ttft_s"] = t_first - t0
                if usage.completion_tokens > 1 and t_end > t_first:
                    st["decode_tok_s"] = (usage.completion_tokens - 1) / (t_end - t_first)
        stream.put(usage)
        stream.put(Finish(reason))


def _map_error(e: BaseException, base_url: str, doing: str = "") -> RemoteEngineError:
    """An exception from the openai client (or under it) as a RemoteEngineError."""
    if isinstance(e, RemoteEngineError):
        return e
    where = f"{base_url}" + (f" ({doing})" if doing else "")
    try:
        import openai
    except ImportError:                         # pragma: no cover
        openai = None
    if openai is not None:
        if isinstance(e, openai.APIStatusError):
            body = getattr(e, "body", None)
            msg = getattr(e, "message", None) or str(e)
            if isinstance(body, Mapping) and isinstance(body.get("message"), str):
                msg = body["message"]
            return RemoteEngineError(f"{where}: the server answered {e.status_code}: {msg}",
                                     status_code=e.status_code, code=getattr(e, "code", None),
                                     param=getattr(e, "param", None), type=getattr(e, "type", None), body=body)
        if isinstance(e, openai.APIConnectionError):            # includes APITimeoutError
            cause = e.__cause__ or e.__context__
            detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
            return RemoteConnectionError(f"{where}: {getattr(e, 'message', None) or e}{detail}")
        if isinstance(e, openai.APIError):                      # an error event inside the stream
            body = getattr(e, "body", None)
            return RemoteEngineError(f"{where}: the server reported an error: {getattr(e, 'message', e)}",
                                     code=getattr(e, "code", None), param=getattr(e, "param", None),
                                     type=getattr(e, "type", None), body=body)
    if isinstance(e, (OSError, TimeoutError)):
        return RemoteConnectionError(f"{where}: {type(e).__name__}: {e}")
    return RemoteEngineError(f"{where}: {type(e).__name__}: {e}")
