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
per stream that waits its turn, prefills and decodes token by token (runtime/generate.py's
generate_step): sampler (runtime/sampling.py) -> constraint (tool_choice / response_format,
constrain/) -> K2 output parser -> stop strings -> events (engines/generation.py). Cancellation is
checked before every forward pass, so at most the token in flight follows a cancel.

Subclasses call `_init_local(...)` from their constructor and may override `_engine_stats()`
(fields for stats()) and `_release()` (free the backend on close()).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from kimi_desktop.chat import (ChatRequestError, ChatStream, FifoLock, Finish, PrefillProgress, Sampling, Usage,
                               count_history_tool_calls, validate_request)
from kimi_desktop.constrain import Constrainer, StepFilter, ToolSpec
from kimi_desktop.runtime.generate import generate_step, reuse_prefix
from kimi_desktop.runtime.session import PrefillCancelled

from .generation import Generation

__all__ = ["QueuedEngine", "LocalEngine", "process_rss", "EXPERT_STATS_NONE", "sampling_defaults",
           "read_generation_config"]

# stats() keys of the routed-expert cache, for engines that have none (the UI shows "n/a")
EXPERT_STATS_NONE = {
    "expert_cache_hits": None, "expert_cache_misses": None, "expert_cache_hit_rate": None,
    "expert_cache_bytes": None, "expert_cache_budget": None, "disk_read_mb_s": None, "disk_read_bytes": None,
}


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
                    allowed: np.ndarray | None = None, pool=None) -> None:
        """tokenizer / session as in the module docstring; ctx: context tokens; vocab: length of the
        logits session.feed returns; end_ids: ids that end a response besides the tokenizer's
        eos_ids, <|im_end|> and [EOS]; allowed: bool [vocab] of ids that may ever be sampled
        (default: the ids the tokenizer can decode); pool: a kv_pool.SessionPool that chooses each
        request's session (then `session` is its first one), or None: one session for every request."""
        self.tokenizer = tok = tokenizer
        self.session, self.pool = session, pool
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
        self.base_mask = None                           # bool [vocab]: the ids that may ever be drawn
        if allowed is not None:
            self.base_mask = np.asarray(allowed, dtype=bool)
            if self.base_mask.shape != (self.vocab,):
                raise ValueError(f"allowed mask has shape {self.base_mask.shape}, expected ({self.vocab},)")
        elif tok.vocab_size < self.vocab:               # ids the tokenizer cannot decode: never sampled
            self.base_mask = np.zeros(self.vocab, dtype=bool)
            self.base_mask[:tok.vocab_size] = True
        self.step_filter = StepFilter(tok, self.vocab, self.base_mask)
        self._token_str: dict[int, str] = {}
        self._stats: dict[str, Any] = {
            "decode_tok_s": 0.0, "prefill_tok_s": 0.0, "ttft_s": None,
            "last_prompt_tokens": 0, "last_prefill_tokens": 0, "last_cached_tokens": 0,
            "last_completion_tokens": 0, "prefill_tokens_total": 0, "completion_tokens_total": 0,
            "requests": 0, "prefill_done": 0, "prefill_total": 0,
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
            if self.pool is not None:
                self.pool.reset()
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

    def token_str(self, t: int) -> str:
        """A token's text on its own (logprobs), cached."""
        s = self._token_str.get(t)
        if s is None:
            s = self._token_str[t] = self.tokenizer.decode([t])
        return s

    def _generate(self, stream: ChatStream, ids: list[int], budget: int, sampling: Sampling,
                  constrainer: Constrainer | None, raw: bool = False) -> None:
        """One request, on its worker: prefill what the session lacks of the prompt (in chunks, with
        PrefillProgress events when there is more than one, stopping between chunks on a cancel), then
        one token per forward pass (gen.next_token chooses it, gen.take applies it) until the response
        ends, then finish. runtime/generate.py runs the passes; engines/generation.py is the rest."""
        if self.pool is not None:
            self.session, reuse = self.pool.acquire(ids)
        else:
            reuse = reuse_prefix(self.session, ids)
        gen = Generation(self, stream, ids, budget, sampling, constrainer, raw,
                         on_prefill=lambda secs: self._record_prefill(len(ids), reuse, secs))
        todo = len(ids) - reuse
        chunked = todo > (getattr(self.session, "chunk", None) or todo)
        try:
            steps = generate_step(self.session, ids[reuse:], gen.sampler, gen.next_token,
                                  progress=(lambda done, total: self._prefill_progress(stream, done, total))
                                  if chunked else None, cancelled=gen.ended)
            for draw in steps:
                if gen.take(draw):
                    break
        except PrefillCancelled:
            self._prefill_progress(None, 0, 0)
            stream.put(Usage(len(ids), 0, reuse))
            stream.put(Finish("cancelled"))
            return
        self._record_decode(gen, time.monotonic())
        gen.finish(Usage(len(ids), gen.n, reuse))
        if self.pool is not None and gen.reason != "cancelled":
            self.pool.finished(self.session)

    def _prefill_progress(self, stream: ChatStream | None, done: int, total: int) -> None:
        with self._state_lock:
            self._stats["prefill_done"], self._stats["prefill_total"] = (done, total) if done < total else (0, 0)
        if stream is not None:
            stream.put(PrefillProgress(done, total))

    def _record_prefill(self, n_prompt: int, reuse: int, secs: float) -> None:
        n_prefill = n_prompt - reuse
        with self._state_lock:
            st = self._stats
            st["requests"] += 1
            st["last_prompt_tokens"] = n_prompt
            st["last_prefill_tokens"] = n_prefill
            st["last_cached_tokens"] = reuse
            st["prefill_tokens_total"] += n_prefill
            st["prefill_tok_s"] = n_prefill / max(secs, 1e-9)

    def _record_decode(self, gen: Generation, t_end: float) -> None:
        n = gen.n
        with self._state_lock:
            st = self._stats
            st["last_completion_tokens"] = n
            st["completion_tokens_total"] += n
            if gen.t_first is not None:
                st["ttft_s"] = gen.t_first - gen.t0
                if n > 1:
                    st["decode_tok_s"] = (n - 1) / max(t_end - gen.t_first, 1e-9)
