"""What the local engines (native, llama.cpp) share: the request path and the decode loop.

A local engine owns a tokenizer (the project's runtime Tokenizer interface: special_ids, num_base,
vocab_size, eos_ids, encode, decode, token_bytes, render_chat) and a *session*: the KV cache of one
conversation, with

    session.tokens          # token ids it holds (the tokenizer's ids)
    len(session)
    session.truncate(n)     # keep the first n
    session.feed(ids)       # append; float32 logits of the last position [vocab], in the tokenizer's ids

`LocalEngine` does the rest: validate and render the request, reuse the longest common token prefix,
one generation at a time in FIFO order (`QueuedEngine`, shared with the remote engine), a worker thread
per stream that waits its turn, prefills and decodes token by token: sampler (runtime/sampling.py) -> constraint (tool_choice /
response_format, constrain.py) -> K2 output parser -> stop strings -> events. Cancellation is checked
before every forward pass, so at most the token in flight follows a cancel.

Subclasses call `_init_local(...)` from their constructor and may override `_engine_stats()`
(fields for stats()) and `_release()` (free the backend on close()).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kimi_desktop.chat import (ChatRequestError, ChatStream, ContentDelta, FifoLock, Finish,
                               ReasoningDelta, Sampling, StopMatcher, TokenLogprobs, ToolCallDelta,
                               Usage, count_history_tool_calls, validate_request)
from kimi_desktop.constrain import Constrainer, Step, ToolSpec
from kimi_desktop.runtime.sampling import NoAllowedToken, Sampler, SamplerConfig

__all__ = ["QueuedEngine", "LocalEngine", "common_prefix", "process_rss", "Emitter", "EXPERT_STATS_NONE",
           "ReasoningCap", "sampling_defaults", "read_generation_config"]

# stats() keys of the routed-expert cache, for engines that have none (the UI shows "n/a")
EXPERT_STATS_NONE = {
    "expert_cache_hits": None, "expert_cache_misses": None, "expert_cache_hit_rate": None,
    "expert_cache_bytes": None, "expert_cache_budget": None, "disk_read_mb_s": None, "disk_read_bytes": None,
}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def process_rss() -> int:
    try:
        import psutil
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:                               # pragma: no cover - psutil missing / denied
        return 0


def sampling_defaults(values: Mapping[str, Any], where: str) -> dict:
    """The Sampling defaults among a model's recommended settings (generation_config.json's names:
    temperature, top_p, top_k, min_p, repetition_penalty; do_sample false -> temperature 0, greedy,
    as transformers does; do_sample absent -> the values are used, as vLLM does). A value of the
    wrong type or range is dropped with a log line naming `where`."""
    from kimi_desktop.notices import log

    out: dict[str, Any] = {}
    for name in Sampling.DEFAULTABLE:
        v = values.get(name)
        if v is None:
            continue
        try:
            x = float(v)
            probe = Sampling(**{name: int(x) if name == "top_k" and x.is_integer() else x})
            probe.validate()
        except (ChatRequestError, TypeError, ValueError, OverflowError):
            log.warning(f"{where}: ignoring {name} = {v!r} (not a valid {name})")
            continue
        out[name] = getattr(probe, name)
    if values.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def read_generation_config(folder: str | os.PathLike) -> dict:
    """sampling_defaults() of a checkpoint folder's generation_config.json ({} when it has none)."""
    import json
    from pathlib import Path

    from kimi_desktop.notices import log

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning(f"{path}: ignoring it (not readable JSON: {e})")
        return {}
    return sampling_defaults(values, str(path)) if isinstance(values, Mapping) else {}


class ReasoningCap:
    """Sampling.max_reasoning_tokens where no constraint program runs (plain and tool_choice "none"):
    after `limit` tokens inside the think block the next token is forced to </think>; with limit 0 and
    the block not open yet, `<think></think>` is forced (how K2 templates switch thinking off).
    "Inside" is the K2 parser's view: reasoning is what comes before </think>, <think> or not."""

    def __init__(self, limit: int, think: int, end_think: int):
        self.limit, self.think, self.end_think = limit, think, end_think
        self.count = 0                  # reasoning tokens generated so far

    def force(self, phase: str) -> int | None:
        """The token to force now, given the parser's phase before it."""
        if phase not in ("start", "reasoning") or self.count < self.limit:
            return None
        return self.think if phase == "start" and self.count == 0 else self.end_think

    def seen(self, token: int, phase_before: str) -> None:
        if phase_before in ("start", "reasoning") and token not in (self.think, self.end_think):
            self.count += 1


class QueuedEngine:
    """One generation at a time in FIFO order; each stream is served by a worker thread that waits
    its turn (a cancelled waiter leaves the queue). Subclasses call `_init_queue()`, start requests
    with `_start(stream, run, prompt_tokens)` and may override `_on_error(e)`."""

    thread_name = "kimi-gen"

    def _init_queue(self) -> None:
        self.lock = FifoLock()
        self._streams: set[ChatStream] = set()
        self._threads: set[threading.Thread] = set()
        self._state_lock = threading.Lock()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine is closed")

    def _start(self, stream: ChatStream, run, prompt_tokens: int) -> ChatStream:
        """Queue `run(stream)`; prompt_tokens is what Usage reports if the request is cancelled while waiting."""
        stream.prompt_tokens = prompt_tokens
        ticket = self.lock.enqueue()
        th = threading.Thread(target=self._serve, name=self.thread_name, daemon=True,
                              args=(stream, ticket, run, prompt_tokens))
        with self._state_lock:
            self._streams.add(stream)
            self._threads.add(th)
        th.start()
        return stream

    def _serve(self, stream: ChatStream, ticket, run, prompt_tokens: int) -> None:
        try:
            if not self.lock.acquire(ticket, cancelled=lambda: stream.cancelled or self._closed):
                stream.put(Usage(prompt_tokens, 0, 0))
                stream.put(Finish("cancelled"))
                stream.close()
                return
            try:
                stream.mark_started()
                run(stream)
                stream.close()                  # before the next request can start (finished_at order)
            finally:
                self.lock.release(ticket)
        except BaseException as e:      # never leave a reader hanging
            self._on_error(e)
            stream.close(error=e)
        finally:
            with self._state_lock:
                self._streams.discard(stream)
                self._threads.discard(threading.current_thread())

    def _on_error(self, e: BaseException) -> None:
        pass

    def waiting(self) -> int:
        return self.lock.waiting()

    def _stop_workers(self, timeout: float) -> bool:
        """Cancel every stream and wait for the workers; True when all of them have ended."""
        self._closed = True
        with self._state_lock:
            streams, threads = list(self._streams), list(self._threads)
        for s in streams:
            s.cancel()
        self.lock.wake()
        for th in threads:
            th.join(timeout)
        return not any(th.is_alive() for th in threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalEngine(QueuedEngine):
    """Base of the engines that sample locally over logits (see the module docstring)."""

    kind = "local"

    def _init_local(self, tokenizer, session, ctx: int, vocab: int, end_ids: Iterable[int] = (),
                    allowed: np.ndarray | None = None) -> None:
        """tokenizer / session as in the module docstring; ctx: context tokens; vocab: length of the
        logits session.feed returns; end_ids: ids that end a response besides the tokenizer's
        eos_ids, <|im_end|> and [EOS]; allowed: bool [vocab] of ids that may ever be sampled
        (default: the ids the tokenizer can decode)."""
        self.tokenizer = tok = tokenizer
        self.session = session
        self.ctx = int(ctx)
        self.vocab = int(vocab)
        sp = tok.special_ids
        self.num_base = tok.num_base
        self.end_ids = frozenset(int(i) for i in end_ids) | frozenset(tok.eos_ids) | \
            frozenset(sp[s] for s in ("<|im_end|>", "[EOS]") if s in sp)
        self.think = sp.get("<think>")
        self.end_think = sp.get("</think>")
        self.thinking = self.think is not None and self.end_think is not None
        self._init_queue()
        self._masks: dict[Any, np.ndarray] = {}
        self._base_mask = None
        if allowed is not None:
            self._base_mask = np.asarray(allowed, dtype=bool)
            if self._base_mask.shape != (self.vocab,):
                raise ValueError(f"allowed mask has shape {self._base_mask.shape}, expected ({self.vocab},)")
        elif tok.vocab_size < self.vocab:               # ids the tokenizer cannot decode: never sampled
            self._base_mask = np.zeros(self.vocab, dtype=bool)
            self._base_mask[:tok.vocab_size] = True
        self._token_str: dict[int, str] = {}
        self._stats: dict[str, Any] = {
            "decode_tok_s": 0.0, "prefill_tok_s": 0.0, "ttft_s": None,
            "last_prompt_tokens": 0, "last_prefill_tokens": 0, "last_cached_tokens": 0,
            "last_completion_tokens": 0, "prefill_tokens_total": 0, "completion_tokens_total": 0,
            "requests": 0,
        }

    # -- the API -----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
             tool_choice: str | Mapping[str, Any] = "auto", sampling: Sampling | None = None) -> ChatStream:
        self._check_open()
        sampling, norm_tools, (choice, name), (fmt, schema) = validate_request(
            messages, tools, tool_choice, sampling)
        ids = self._chat_prompt(messages, None if (choice == "none" or not tools) else list(tools))
        budget = self._budget(ids, sampling, "messages")
        constrainer = self._constrainer(choice, name, fmt, schema, norm_tools, messages, budget,
                                        sampling, ids[-1])
        return self._start(ChatStream(on_cancel=self.lock.wake),
                           lambda stream: self._generate(stream, ids, budget, sampling, constrainer), len(ids))

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]],
                      tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """What chat(messages, tools) would cost in prompt tokens (the server's count_tokens);
        ChatRequestError for a conversation chat() would refuse. Runs now, not queued."""
        validate_request(messages, tools, "auto", None)
        return len(self._chat_prompt(messages, list(tools) if tools else None))

    def _chat_prompt(self, messages, tools: list | None) -> list[int]:
        """The conversation rendered by the chat template (with the generation prompt) and encoded."""
        try:
            text = self.tokenizer.render_chat(list(messages), tools=tools, add_generation_prompt=True)
        except ChatRequestError:
            raise
        except Exception as e:          # a conversation the template cannot render is a bad request
            raise ChatRequestError(f"messages: cannot render the conversation: {e}", "messages") from None
        ids = self._encode_prompt(text)
        if not ids:
            raise ChatRequestError("messages: the conversation renders to no tokens", "messages")
        return ids

    def complete(self, prompt: str | Sequence[int], sampling: Sampling | None = None) -> ChatStream:
        """A raw completion, no chat template (the server's /v1/completions): the prompt text (special-token
        strings become their ids) or token ids as given; the output is ContentDelta text with special
        tokens spelled out (no reasoning or tool-call parsing). Queued like chat()."""
        self._check_open()
        sampling = sampling if sampling is not None else Sampling()
        sampling.validate()
        if sampling.response_format is not None:
            raise ChatRequestError("response_format is for chat requests", "response_format")
        if isinstance(prompt, str):
            ids = self._encode_prompt(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
            if bad:
                raise ChatRequestError(f"prompt: token id {bad[0]} is outside the vocabulary "
                                       f"(0..{self.tokenizer.vocab_size - 1})", "prompt")
        if not ids:
            raise ChatRequestError("prompt: the prompt is empty", "prompt")
        budget = self._budget(ids, sampling, "prompt")
        return self._start(ChatStream(on_cancel=self.lock.wake),
                           lambda stream: self._generate(stream, ids, budget, sampling, None, raw=True), len(ids))

    def generation_defaults(self) -> dict:
        """The model's recommended sampling settings, read at load (Sampling field names; {} if none):
        the server fills a request's unset fields from them."""
        return dict(getattr(self, "_generation_defaults", None) or {})

    def _budget(self, ids: list[int], sampling: Sampling, field: str) -> int:
        """Tokens this request may generate: what the context leaves, at most max_tokens; a prompt
        that fills the context is refused, never truncated."""
        if len(ids) >= self.ctx:
            raise ChatRequestError(f"{field}: the prompt is {len(ids)} tokens but the context holds "
                                   f"{self.ctx} (nothing left to generate)", field)
        budget = self.ctx - len(ids)
        return budget if sampling.max_tokens is None else min(budget, sampling.max_tokens)

    def _encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def stats(self) -> dict:
        with self._state_lock:
            s = dict(self._stats)
        s.update({
            "engine": self.kind, "model": str(getattr(self, "path", "")),
            "context_used": len(self.session), "context_size": self.ctx,
            "resident_bytes": process_rss(), "waiting": self.lock.waiting(), "busy": self.lock.busy(),
        })
        s.update(self._engine_stats())
        return s

    def _engine_stats(self) -> dict:
        return dict(EXPERT_STATS_NONE)

    def reset(self) -> None:
        """Forget the cached conversation (the next request prefills from scratch)."""
        t = self.lock.enqueue()
        self.lock.acquire(t)
        try:
            self.session.truncate(0)
        finally:
            self.lock.release(t)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every stream, wait for the workers, release the backend."""
        if self._stop_workers(timeout):
            self._release()

    def _release(self) -> None:
        pass

    # -- building a request ------------------------------------------------------------------------
    def _constrainer(self, choice, name, fmt, schema, tools, messages, budget, sampling, prompt_tail):
        specs = [ToolSpec(t["name"], t["parameters"]) for t in tools]
        common = dict(budget=budget, max_reasoning_tokens=sampling.max_reasoning_tokens,
                      prompt_tail=prompt_tail, call_index=count_history_tool_calls(messages))
        tok = self.tokenizer
        try:
            if choice in ("required", "named"):
                chosen = [s for s in specs if s.name == name] if choice == "named" else specs
                return Constrainer(tok, "tools", tools=chosen,
                                   multiple=choice == "required" and sampling.parallel_tool_calls, **common)
            if fmt in ("json_object", "json_schema"):
                top = "object" if fmt == "json_object" and not (schema and schema.get("type")) else None
                offered = specs if choice == "auto" else []
                return Constrainer(tok, "json", tools=offered, multiple=sampling.parallel_tool_calls, schema=schema,
                                   top_type=top, **common)
            if choice == "none":
                return Constrainer(tok, "none", **common)
        except Exception as e:          # e.g. a vocabulary without the tool tokens
            raise ChatRequestError(f"tool_choice / response_format cannot be enforced with this model: {e}",
                                   "tool_choice" if choice != "auto" else "response_format") from None
        return None

    # -- the worker ----------------------------------------------------------------------------------
    def _on_error(self, e: BaseException) -> None:
        try:
            self.session.truncate(0)            # the cache may be half-written
        except Exception:
            pass

    def _mask(self, step: Step) -> np.ndarray:
        key = (step.text, step.specials, step.ban)
        m = self._masks.get(key)
        if m is None:
            m = np.zeros(self.vocab, dtype=bool)
            if step.text:
                m[:self.num_base] = True
            top = min(self.vocab, self.tokenizer.vocab_size)
            if step.specials is None:
                m[self.num_base:top] = True
                for t in step.ban:
                    m[t] = False
            else:
                for t in step.specials:
                    if t < self.vocab:
                        m[t] = True
            if self._base_mask is not None:
                m &= self._base_mask
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = m
        return m

    def _tok_str(self, t: int) -> str:
        s = self._token_str.get(t)
        if s is None:
            s = self._token_str[t] = self.tokenizer.decode([t])
        return s

    def _generate(self, stream: ChatStream, ids: list[int], budget: int, sampling: Sampling,
                  constrainer: Constrainer | None, raw: bool = False) -> None:
        from kimi_desktop.runtime.k2_output import K2OutputParser

        sess = self.session
        tok = self.tokenizer
        reuse = min(common_prefix(sess.tokens, ids), len(ids) - 1)
        sess.truncate(reuse)
        t0 = time.monotonic()
        logits = sess.feed(ids[reuse:])
        t1 = time.monotonic()
        n_prefill = len(ids) - reuse
        with self._state_lock:
            st = self._stats
            st["requests"] += 1
            st["last_prompt_tokens"] = len(ids)
            st["last_prefill_tokens"] = n_prefill
            st["last_cached_tokens"] = reuse
            st["prefill_tokens_total"] += n_prefill
            st["prefill_tok_s"] = n_prefill / max(t1 - t0, 1e-9)

        sampler = Sampler(SamplerConfig(
            temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p),
            min_p=float(sampling.min_p), presence_penalty=float(sampling.presence_penalty),
            frequency_penalty=float(sampling.frequency_penalty),
            repetition_penalty=float(sampling.repetition_penalty), seed=sampling.seed), prompt_ids=ids)
        n_top = (sampling.top_logprobs or 0) if sampling.logprobs else None
        parser = RawText(tok) if raw else K2OutputParser(tok, reasoning=self.thinking)
        if not raw and self.thinking and ids[-1] in (self.think, self.end_think):
            parser.feed([ids[-1]])          # the prompt opened (or skipped) the reasoning block
        skip_reasoning = (self.thinking and constrainer is not None and constrainer.mode != "none"
                          and ids[-1] not in (self.think, self.end_think))
        cap = None                          # the reasoning cap where no constraint program enforces it
        if (not raw and self.thinking and sampling.max_reasoning_tokens is not None
                and (constrainer is None or constrainer.mode == "none")):
            cap = ReasoningCap(sampling.max_reasoning_tokens, self.think, self.end_think)
        one_call = not raw and not sampling.parallel_tool_calls
        stops = StopMatcher(sampling.stop_list())
        emitter = Emitter(stream, stops)
        check_cache: dict[int, bytes] = {}

        def token_bytes(t: int) -> bytes:
            b = check_cache.get(t)
            if b is None:
                b = check_cache[t] = tok.token_bytes(t)
            return b

        n = 0
        reason = None
        t_first = None
        while True:
            if stream.cancelled or self._closed:
                reason = "cancelled"
                break
            if n >= budget:
                reason = "length"
                break
            step = constrainer.step() if constrainer is not None else None
            if constrainer is not None and step is None:
                reason = "stop"
                break
            # choose the token
            phase = parser.phase if cap is not None else None
            capped = cap.force(phase) if cap is not None else None
            if capped is not None:
                draw = sampler.forced(logits, capped, n_top)
            elif step is None:
                draw = sampler.sample(logits, allowed=self._base_mask, logprobs=n_top)
            elif step.force is not None:
                draw = sampler.forced(logits, step.force, n_top)
            else:
                check = step.check
                accept = None
                if check is not None:
                    nb = self.num_base
                    accept = lambda t, check=check: t >= nb or check(token_bytes(t))   # noqa: E731
                try:
                    draw = sampler.sample(logits, allowed=self._mask(step), accept=accept, logprobs=n_top)
                except NoAllowedToken:
                    if step.fallback is None:
                        raise
                    draw = sampler.forced(logits, step.fallback, n_top)
            t = draw.token
            n += 1
            if cap is not None:
                cap.seen(t, phase)
            if t_first is None:
                t_first = time.monotonic()
                stream.first_token_at = t_first
            if constrainer is not None:
                constrainer.advance(t)
            if t in self.end_ids:
                reason = "stop"
                break
            if n == 1 and skip_reasoning and t != self.think:
                parser.feed([self.end_think])   # a constrained answer without <think>: content, not reasoning
            stopped = emitter.emit(parser.feed([t]))
            if n_top is not None:
                emitter.put(TokenLogprobs(self._tok_str(t), float(draw.logprob),
                                          tuple((self._tok_str(i), lp) for i, lp in draw.top)))
            if stopped:
                reason = "stop"
                break
            if one_call and parser.tool_calls and parser.phase not in ("tool_call_id", "tool_arguments"):
                reason = "stop"             # parallel_tool_calls false: the first call is complete
                break
            if n >= budget or stream.cancelled or self._closed:
                continue                    # decided at the top of the loop, without a forward pass
            logits = sess.feed([t])

        t_end = time.monotonic()
        if reason != "cancelled" and not emitter.stopped:
            emitter.emit(parser.finish())
            emitter.flush()
        if reason == "stop" and parser.tool_calls and not emitter.stopped:
            reason = "tool_calls"
        usage = Usage(len(ids), n, reuse)
        with self._state_lock:
            st = self._stats
            st["last_completion_tokens"] = n
            st["completion_tokens_total"] += n
            if t_first is not None:
                st["ttft_s"] = t_first - t0
                if n > 1:
                    st["decode_tok_s"] = (n - 1) / max(t_end - t_first, 1e-9)
        stream.put(usage)
        stream.put(Finish(reason, stops.matched if emitter.stopped else None))


class RawText:
    """The K2 parser's interface for raw completions: all output is content, special tokens as text."""

    tool_calls: tuple = ()

    def __init__(self, tokenizer):
        from kimi_desktop.runtime.tokenizer import IncrementalDecoder
        self._decoder = IncrementalDecoder(tokenizer)

    def feed(self, ids) -> list:
        text = self._decoder.feed(ids)
        return [ContentDelta(text)] if text else []

    def finish(self) -> list:
        text = self._decoder.flush()
        return [ContentDelta(text)] if text else []


class Emitter:
    """Parser events -> stream, with stop strings applied to reasoning and content text (each run of
    one kind separately; tool-call arguments are never cut)."""

    def __init__(self, stream: ChatStream, stops: StopMatcher):
        self.stream, self.stops = stream, stops
        self.kind = None
        self.stopped = False

    def put(self, ev) -> None:
        self.stream.put(ev)

    def flush(self) -> None:
        held = self.stops.flush()
        if held and self.kind is not None:
            self.stream.put(self.kind(held))

    def emit(self, events) -> bool:
        for ev in events:
            if self.stopped:
                return True
            if isinstance(ev, (ReasoningDelta, ContentDelta)):
                if type(ev) is not self.kind:
                    self.flush()
                    self.kind = type(ev)
                safe, matched = self.stops.feed(ev.text)
                if safe:
                    self.stream.put(self.kind(safe))
                if matched:
                    self.stopped = True
                    return True
            else:
                if isinstance(ev, ToolCallDelta):
                    self.flush()
                self.stream.put(ev)
        return self.stopped
