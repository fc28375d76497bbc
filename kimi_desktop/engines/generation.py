"""One request's decode, for the local engines: what runs between the logits and the stream's events.

`Generation` holds a request's state and is used in this order by LocalEngine._generate, around
runtime/generate.py's `generate_step` (prefill, then one forward pass per token):

    next_token(logits) -> Draw | None   the token: reasoning cap, else the constraint's step
                                        (forced / masked and checked draw), else a plain draw;
                                        None: the response ends before it (cancel, constraint done)
    take(draw) -> bool                  what the token does: constraint, end ids, K2 output parser,
                                        stop strings, logprobs; True: the response ends with it
    finish(usage)                       the held-back text, then Usage and Finish

Cancellation is checked after every forward pass and before the next one, so at most the token in
flight follows a cancel.
"""

from __future__ import annotations

import time

from kimi_desktop.chat import (ChatStream, ContentDelta, Finish, ReasoningDelta, Sampling, StopMatcher,
                               TokenLogprobs, ToolCallDelta, Usage)
from kimi_desktop.constrain import Constrainer, Step
from kimi_desktop.runtime.sampling import Draw, NoAllowedToken, Sampler


class Generation:
    """One request's decode state (see the module docstring). engine: the LocalEngine (tokenizer,
    end_ids, think ids, base mask and step filter, closed flag); on_prefill(seconds) is called once,
    when the prompt's logits arrive."""

    def __init__(self, engine, stream: ChatStream, ids: list[int], budget: int, sampling: Sampling,
                 constrainer: Constrainer | None, raw: bool = False, on_prefill=None):
        from kimi_desktop.runtime.k2_output import K2OutputParser

        self.engine, self.stream, self.budget, self.constrainer = engine, stream, budget, constrainer
        self.on_prefill = on_prefill
        self.sampler = Sampler(sampling, prompt_ids=ids)
        self.n_top = (sampling.top_logprobs or 0) if sampling.logprobs else None
        e = engine
        thinking = e.thinking and not raw
        opened = thinking and ids[-1] in (e.think, e.end_think)    # the prompt opened (or skipped) reasoning
        self.parser = RawText(e.tokenizer) if raw else K2OutputParser(e.tokenizer, reasoning=e.thinking)
        if opened:
            self.parser.feed([ids[-1]])
        constrained = constrainer is not None and constrainer.mode != "none"
        self.skip_reasoning = constrained and e.thinking and ids[-1] not in (e.think, e.end_think)
        self.cap = None                 # the reasoning cap where no constraint program enforces it
        if thinking and sampling.max_reasoning_tokens is not None and not constrained:
            self.cap = ReasoningCap(sampling.max_reasoning_tokens, e.think, e.end_think)
        self.one_call = not raw and not sampling.parallel_tool_calls
        self.stops = StopMatcher(sampling.stop_list())
        self.emitter = Emitter(stream, self.stops)
        self.n = 0                      # tokens generated
        self.reason: str | None = None
        self.phase: str | None = None   # the parser's phase before the token (for the cap)
        self.t0 = time.monotonic()
        self.t_first: float | None = None

    def ended(self) -> bool:
        return self.stream.cancelled or self.engine._closed

    # -- the token ---------------------------------------------------------------------------------
    def next_token(self, logits) -> Draw | None:
        """The next token from these logits (the per-step hook of generate_step), or None to end here."""
        if self.on_prefill is not None:
            self.on_prefill(time.monotonic() - self.t0)
            self.on_prefill = None
        if self.ended():
            self.reason = "cancelled"
            return None
        step = self.constrainer.step() if self.constrainer is not None else None
        if self.constrainer is not None and step is None:
            self.reason = "stop"                # the constraint program is complete
            return None
        s, n_top = self.sampler, self.n_top
        self.phase = self.parser.phase if self.cap is not None else None
        capped = self.cap.force(self.phase) if self.cap is not None else None
        if capped is not None:
            return s.forced(logits, capped, n_top)
        if step is None:
            return s.sample(logits, allowed=self.engine.base_mask, logprobs=n_top)
        if step.force is not None:
            return s.forced(logits, step.force, n_top)
        return self._constrained(logits, step)

    def _constrained(self, logits, step: Step) -> Draw:
        f = self.engine.step_filter
        try:
            return self.sampler.sample(logits, allowed=f.mask(step), accept=f.accept(step), logprobs=self.n_top)
        except NoAllowedToken:
            if step.fallback is None:
                raise
            return self.sampler.forced(logits, step.fallback, self.n_top)

    def take(self, draw: Draw) -> bool:
        """Apply the token; True when the response ends with it (no forward pass for it follows)."""
        e, t = self.engine, draw.token
        self.n += 1
        if self.cap is not None:
            self.cap.seen(t, self.phase)
        if self.t_first is None:
            self.t_first = self.stream.first_token_at = time.monotonic()
        if self.constrainer is not None:
            self.constrainer.advance(t)
        if t in e.end_ids:
            return self._end("stop")
        if self.n == 1 and self.skip_reasoning and t != e.think:
            self.parser.feed([e.end_think])     # a constrained answer without <think>: content, not reasoning
        stopped = self.emitter.emit(self.parser.feed([t]))
        if self.n_top is not None:
            self.emitter.put(TokenLogprobs(e.token_str(t), float(draw.logprob),
                                           tuple((e.token_str(i), lp) for i, lp in draw.top)))
        if stopped:
            return self._end("stop")
        if self.one_call and self.parser.tool_calls and self.parser.phase not in ("tool_call_id", "tool_arguments"):
            return self._end("stop")            # parallel_tool_calls false: the first call is complete
        if self.ended():
            return self._end("cancelled")
        if self.n >= self.budget:
            return self._end("length")
        return False

    def _end(self, reason: str) -> bool:
        self.reason = reason
        return True

    # -- the end -----------------------------------------------------------------------------------
    def finish(self, usage: Usage) -> None:
        """The parser's and the stop matcher's held-back text, then Usage and Finish."""
        emitter, reason = self.emitter, self.reason
        if reason != "cancelled" and not emitter.stopped:
            emitter.emit(self.parser.finish())
            emitter.flush()
        if reason == "stop" and self.parser.tool_calls and not emitter.stopped:
            reason = "tool_calls"
        self.stream.put(usage)
        self.stream.put(Finish(reason, self.stops.matched if emitter.stopped else None))


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
