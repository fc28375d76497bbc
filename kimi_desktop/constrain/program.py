"""The token-level constraint program for one response (tool_choice, response_format) on K2's format.

`Constrainer` is a generator that yields a `Step` (what the next token may be) and receives the token
chosen; `StepFilter` turns a Step into what the sampler takes: a mask over the vocabulary and a lazy
per-token test over the decoded bytes of ordinary tokens. See the package docstring for the programs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Generator, Mapping, Sequence

import numpy as np

from .json_prefix import JsonPrefix, default_value


@dataclass(frozen=True)
class Step:
    """What the next token may be.

    force: this token and nothing else. Otherwise: ordinary tokens are allowed when `text` (and
    `check(token_bytes)` if given); special tokens: those in `specials`, or, when specials is None,
    every special id not in `ban`.
    """
    force: int | None = None
    text: bool = True
    specials: frozenset[int] | None = frozenset()
    ban: frozenset[int] = frozenset()
    check: Callable[[bytes], bool] | None = None
    fallback: int | None = None         # taken when no token passes (budget bounds are conservative)


class StepFilter:
    """A Step as the sampler's inputs, for one vocabulary: `mask(step)`, bool [vocab] (ordinary ids
    when step.text, the special ids the step allows, and only ids in `base`), and `accept(step)`, the
    lazy per-token test of step.check over token bytes (None: the mask says it all). A forced step
    is the caller's: the token is taken, not drawn.

    tokenizer: needs num_base, vocab_size, token_bytes(id); vocab: the logits' length (may exceed
    the tokenizer's ids); base: bool [vocab] of the ids that may ever be drawn (None: all).
    """

    def __init__(self, tokenizer, vocab: int, base: np.ndarray | None = None):
        self.tok, self.vocab, self.base = tokenizer, int(vocab), base
        self.num_base = tokenizer.num_base
        self._masks: dict[Any, np.ndarray] = {}
        self._bytes: dict[int, bytes] = {}

    def mask(self, step: Step) -> np.ndarray:
        key = (step.text, step.specials, step.ban)
        m = self._masks.get(key)
        if m is None:
            m = np.zeros(self.vocab, dtype=bool)
            if step.text:
                m[:self.num_base] = True
            top = min(self.vocab, self.tok.vocab_size)
            if step.specials is None:
                m[self.num_base:top] = True
                for t in step.ban:
                    m[t] = False
            else:
                for t in step.specials:
                    if t < self.vocab:
                        m[t] = True
            if self.base is not None:
                m &= self.base
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = m
        return m

    def accept(self, step: Step) -> Callable[[int], bool] | None:
        check, nb = step.check, self.num_base
        if check is None:
            return None
        return lambda t: t >= nb or check(self.token_bytes(t))

    def token_bytes(self, t: int) -> bytes:
        b = self._bytes.get(t)
        if b is None:
            b = self._bytes[t] = self.tok.token_bytes(t)
        return b


class ConstraintError(RuntimeError):
    """The program and the tokens disagree (a bug), or a forced token is missing from the vocabulary."""


TOOL_TOKENS = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>")

Program = Generator[Step, int, Any]


@dataclass
class ToolSpec:
    name: str
    parameters: Mapping | None = None


class Constrainer:
    """The constraint for one response; drive with `step()` / `advance(token)`.

    tokenizer: needs special_ids, num_base, token_bytes(id), encode(text).
    mode: "none" (ban tool tokens), "tools" (required / named: `tools` lists the callable ones and
    `multiple` allows several calls), "json" (`schema`, with `tools` optionally offered too:
    tool_choice auto).
    budget: tokens this response may still produce in all (max_tokens); `generated` counts them.
    """

    def __init__(self, tokenizer, mode: str, *, tools: Sequence[ToolSpec] = (), multiple: bool = False,
                 schema: Mapping | None = None, top_type: str | None = None, call_index: int = 0,
                 budget: int = 1 << 30, max_reasoning_tokens: int | None = None,
                 prompt_tail: int | None = None):
        if mode not in ("none", "tools", "json"):
            raise ValueError(f"mode must be none, tools or json, got {mode!r}")
        if mode == "tools" and not tools:
            raise ValueError("mode 'tools' needs at least one tool")
        self.tok = tokenizer
        sp = tokenizer.special_ids
        self.num_base = tokenizer.num_base
        self.mode = mode
        self.tools = list(tools)
        self.multiple = multiple
        self.schema, self.top_type = schema, top_type
        self.call_index = call_index
        self.budget = budget
        self.generated = 0
        self.max_reasoning = max_reasoning_tokens if max_reasoning_tokens is not None else max(1, budget // 2)
        self.reasoning_tokens = 0
        self.think = sp.get("<think>")
        self.end_think = sp.get("</think>")
        self.thinking = self.think is not None and self.end_think is not None
        self.im_end = sp.get("<|im_end|>")
        if self.im_end is None:
            raise ConstraintError("the vocabulary has no <|im_end|>")
        self.tool_ids = frozenset(sp[t] for t in TOOL_TOKENS if t in sp)
        need_tool_tokens = mode == "tools" or (mode == "json" and self.tools)
        if need_tool_tokens and len(self.tool_ids) != len(TOOL_TOKENS):
            raise ConstraintError("the vocabulary lacks K2's tool-call tokens")
        self.sec_begin = sp.get("<|tool_calls_section_begin|>")
        self.sec_end = sp.get("<|tool_calls_section_end|>")
        self.call_begin = sp.get("<|tool_call_begin|>")
        self.arg_begin = sp.get("<|tool_call_argument_begin|>")
        self.call_end = sp.get("<|tool_call_end|>")
        self._bytes_cache: dict[int, bytes] = {}
        self._enc_cache: dict[bytes, list[int]] = {}
        self.finished = False
        start_reasoning = self.thinking and prompt_tail == self.think
        after_reasoning = not self.thinking or prompt_tail == self.end_think
        self._gen = self._program(start_reasoning, after_reasoning)
        self._step = self._gen.send(None)

    # -- driving -----------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.budget - self.generated

    def step(self) -> Step | None:
        """The current step; None once the program has finished (the response is complete)."""
        return self._step

    def advance(self, token: int) -> None:
        self.generated += 1
        if self._step is None:
            return
        try:
            self._step = self._gen.send(int(token))
        except StopIteration:
            self._step = None
            self.finished = True

    # -- helpers -----------------------------------------------------------------------------------
    def token_bytes(self, t: int) -> bytes:
        b = self._bytes_cache.get(t)
        if b is None:
            b = self._bytes_cache[t] = self.tok.token_bytes(t)
        return b

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ordinary token ids whose bytes concatenate to `data` (any valid split will do)."""
        ids = self._enc_cache.get(data)
        if ids is not None:
            return ids
        try:
            text = data.decode("utf-8")
            ids = self.tok.encode(text) if "<|" not in text and "<think>" not in text \
                and "</think>" not in text else None
        except UnicodeDecodeError:
            ids = None
        if ids is None or any(i >= self.num_base for i in ids) or \
                b"".join(self.token_bytes(i) for i in ids) != data:
            ranks = getattr(self.tok, "ranks", None)
            if ranks is None:
                raise ConstraintError(f"cannot encode {data!r} as ordinary tokens")
            ids = [ranks[bytes([x])] for x in data]
        self._enc_cache[data] = ids
        return ids

    def _force(self, *tokens: int) -> Program:
        for t in tokens:
            got = yield Step(force=t)
            if got != t:
                raise ConstraintError(f"forced token {t} but got {got}")

    # -- budget estimates (upper bounds, in tokens) -------------------------------------------------
    def _call_cost(self, tool: ToolSpec, idx: int) -> int:
        """Tokens of the shortest call (forced text is written with the tokenizer's own encoding)."""
        name = len(self.encode_bytes(f"functions.{tool.name}:{idx}".encode()))
        args = len(self.encode_bytes(JsonPrefix(tool.parameters, top_type="object").closing()))
        return 1 + name + 1 + args + 1

    def _tools_cost(self, idx: int) -> int:
        return 1 + max(self._call_cost(t, idx) for t in self.tools) + 1 + 1

    def _json_cost(self) -> int:
        return len(self.encode_bytes(JsonPrefix(self.schema, self.top_type).closing())) + 1

    def _body_cost(self) -> int:
        if self.mode == "tools":
            return self._tools_cost(self.call_index)
        if self.mode == "json":
            return self._json_cost()
        return 1

    # -- programs ----------------------------------------------------------------------------------
    def _program(self, start_reasoning: bool, after_reasoning: bool) -> Program:
        if self.mode == "none":
            free = Step(text=True, specials=None, ban=self.tool_ids)
            while True:
                yield free
        if start_reasoning:
            yield from self._reasoning()
            yield from self._body()
            return
        if after_reasoning:
            yield from self._body()
            return
        # a thinking model may open <think> first, or start the answer directly
        body = self._body()
        first = next(body)
        if self.remaining <= self._body_cost() + 2:        # no room to think: answer directly
            step = first
            try:
                while True:
                    t = yield step
                    step = body.send(t)
            except StopIteration:
                return
        if first.force is not None:
            merged = Step(text=False, specials=frozenset({first.force, self.think}))
        else:
            merged = Step(text=first.text, specials=(first.specials or frozenset()) | {self.think},
                          check=first.check)
        t = yield merged
        if t == self.think:
            body.close()
            yield from self._reasoning()
            yield from self._body()
            return
        try:
            step = body.send(t)
            while True:
                t = yield step
                step = body.send(t)
        except StopIteration:
            return

    def _reasoning(self) -> Program:
        reserve = self._body_cost()
        free = Step(text=True, specials=frozenset({self.end_think}))
        while True:
            if self.reasoning_tokens >= self.max_reasoning or self.remaining <= reserve + 1:
                yield from self._force(self.end_think)
                return
            t = yield free
            if t == self.end_think:
                return
            self.reasoning_tokens += 1

    def _body(self) -> Program:
        if self.mode == "tools":
            yield from self._force(self.sec_begin)
            yield from self._tool_section()
            return
        # json (optionally: or a tool-call section, chosen by the first token)
        checker = JsonPrefix(self.schema, self.top_type)
        offer = frozenset({self.sec_begin}) if self.tools and self.remaining > self._tools_cost(self.call_index) \
            else frozenset()
        end = yield from self._json(checker, 1, self.im_end, offer)
        if end == self.sec_begin:
            yield from self._tool_section()
            return
        if end is None:
            yield from self._force(self.im_end)

    def _tool_section(self) -> Program:
        idx = self.call_index
        opened = False                     # <|tool_call_begin|> already taken
        while True:
            if not opened:
                yield from self._force(self.call_begin)
            options = {f"functions.{t.name}:{idx}".encode(): t for t in self.tools}
            after = 1 + max(len(self.encode_bytes(JsonPrefix(t.parameters, top_type="object").closing()))
                            for t in self.tools) + 3
            chosen = yield from self._choice(list(options), after)
            tool = options[chosen]
            yield from self._force(self.arg_begin)
            checker = JsonPrefix(tool.parameters, top_type="object")
            end = yield from self._json(checker, 3, self.call_end)
            if end is None:
                yield from self._force(self.call_end)
            idx += 1
            if self.multiple and self.remaining > self._tools_cost(idx) + 2:
                t = yield Step(text=False, specials=frozenset({self.call_begin, self.sec_end}))
                if t == self.call_begin:
                    opened = True
                    continue
                break
            yield from self._force(self.sec_end)
            break
        yield from self._force(self.im_end)

    def _choice(self, options: list[bytes], tail: int = 0) -> Program:
        cur = b""
        while True:
            live = [o for o in options if o.startswith(cur)]
            if cur in live:
                return cur
            need = max(len(self.encode_bytes(o[len(cur):])) for o in live) + tail
            if len(live) == 1 or self.remaining <= need + 1:
                live = live[:1]
                yield from self._force(*self.encode_bytes(live[0][len(cur):]))
                return live[0]

            def check(b: bytes, cur=cur, live=live) -> bool:
                c = cur + b
                return bool(b) and any(o.startswith(c) for o in live)
            t = yield Step(text=True, check=check,
                           fallback=self.encode_bytes(live[0][len(cur):])[0])
            cur += self.token_bytes(t)

    def _fits(self, closing: bytes, left: int) -> bool:
        """Can `closing` be written in `left` tokens? (bytes >= tokens, so try the cheap test first)"""
        return len(closing) <= left or len(self.encode_bytes(closing)) <= left

    def _json_check(self, checker: JsonPrefix, closing: bytes, tail: int) -> Callable[[bytes], bool]:
        """A valid JSON continuation after which the budget still closes the value: either by its own
        shortest closing, or by the rest of the current closing (when the token starts it)."""
        base = len(closing)
        bonus = 16 + sum(len(default_value(checker.props.get(k))) + len(json.dumps(k).encode()) + 2
                         for k in checker.required)
        bonus += max((len(default_value(p)) for p in checker.props.values()), default=0)

        def check(b: bytes) -> bool:
            if not b:
                return False
            c = checker.copy()
            if not c._run(b):
                return False
            left = self.remaining - 1 - tail
            if base + 8 * len(b) + bonus <= left:          # cheap bound: cannot run out
                return True
            if self._fits(c.closing(), left):
                return True
            return closing.startswith(b) and self._fits(closing[len(b):], left)
        return check

    def _json(self, checker: JsonPrefix, tail: int, end_token: int,
              first_specials: frozenset[int] = frozenset()) -> Program:
        """Steps until the JSON value is done. Returns the special token that ended it (end_token, or
        one of first_specials taken as the very first token), or None (the caller adds end_token)."""
        plan: bytes | None = None          # a closing already committed to
        first = True
        while not checker.done:
            closing = plan if plan is not None else checker.closing()
            ids = self.encode_bytes(closing) if closing else []
            if plan is not None or self.remaining <= len(ids) + tail:
                for t in ids:
                    got = yield Step(force=t)
                    if got != t or not checker.feed(self.token_bytes(t)):
                        raise ConstraintError("forced closing token rejected")
                return None
            specials = frozenset({end_token}) if checker.complete else frozenset()
            if first:
                specials |= first_specials
            t = yield Step(text=True, specials=specials, check=self._json_check(checker, closing, tail),
                           fallback=ids[0] if ids else end_token)
            if t == end_token or (first and t in first_specials):
                return t
            first = False
            b = self.token_bytes(t)
            if not checker.feed(b):
                raise ConstraintError(f"token {t} is not a valid JSON continuation")
            if not self._fits(checker.closing(), self.remaining - tail) and closing.startswith(b):
                plan = closing[len(b):]
        return None
