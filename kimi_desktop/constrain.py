"""Constrained decoding for tool_choice and response_format, on K2's token format.

Two layers:

- `JsonPrefix`: an incremental JSON prefix checker over *bytes* (a small pushdown automaton). It says
  whether bytes keep the text a prefix of one valid JSON value, whether the value is complete, and
  the shortest bytes that complete it (`closing()`), so output can be closed before max_tokens runs
  out. Optional schema pieces: the top-level type(s) and, for a top-level object, its `required`
  keys (the object cannot close before they are present; `closing()` adds missing ones with a
  default value of their declared type). Inside strings any byte >= 0x80 is accepted as part of a
  UTF-8 sequence, so multi-byte tokens (and tokens that split a character) work.

- `Constrainer`: the token-level program for one response, a generator that yields a `Step` (what the
  next token may be) and receives the token chosen:
    tool_choice "none"              -> the tool-call tokens are banned, everything else free;
    "required" / a named function   -> [<think> reasoning </think>] then only
        <|tool_calls_section_begin|> (<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>
        {JSON object} <|tool_call_end|>)+ <|tool_calls_section_end|> <|im_end|>;
        named: exactly one call to NAME; required: NAME among the tools, more calls while the budget allows;
    response_format json_object / json_schema -> [reasoning] then one JSON value, then <|im_end|>;
        with tools and tool_choice "auto" the answer may instead be a tool-call section.
  Reasoning (thinking checkpoints, which have <think>/</think>) is allowed first, capped by
  max_reasoning_tokens and by the budget the rest needs; </think> is forced when it runs out.
  In every constrained stretch the budget (max_tokens) is tracked so that structures are closed with
  forced tokens before it runs out, where the budget allows at all.

The engine turns a Step into a mask over special ids and a lazy per-token check over the decoded bytes
of ordinary tokens (see runtime/sampling.py: candidates are tried in sampling order, so the drawn
token is an exact sample from the distribution restricted to tokens the check accepts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# JSON prefix automaton

# modes
VALUE, ARR_FIRST, OBJ_FIRST, OBJ_KEY, COLON, AFTER, STR, NUM, LIT, DONE = range(10)
# number sub-states; the terminal ones can end a number
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
N_TERMINAL = (N_ZERO, N_INT, N_FRAC, N_EXP)

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
TYPE_STARTS = {
    "object": frozenset(b"{"), "array": frozenset(b"["), "string": frozenset(b'"'),
    "number": frozenset(b"-0123456789"), "integer": frozenset(b"-0123456789"),
    "boolean": frozenset(b"tf"), "null": frozenset(b"n"),
}
ALL_STARTS = frozenset().union(*TYPE_STARTS.values())
DEFAULTS = {"object": b"{}", "array": b"[]", "string": b'""', "number": b"0", "integer": b"0",
            "boolean": b"false", "null": b"null"}
MAX_WS_RUN = 32            # whitespace bytes in a row outside strings (keeps a model from idling)


def _types(schema: Mapping | None) -> tuple[str, ...]:
    if not isinstance(schema, Mapping):
        return ()
    t = schema.get("type")
    if isinstance(t, str):
        t = (t,)
    if isinstance(t, (list, tuple)):
        return tuple(x for x in t if x in TYPE_STARTS)
    if "properties" in schema or "required" in schema:
        return ("object",)
    return ()


def default_value(schema: Any) -> bytes:
    """A short JSON value that fits the schema's `enum` / `const` / type, else null."""
    if isinstance(schema, Mapping):
        if "const" in schema:
            return json.dumps(schema["const"], ensure_ascii=False, separators=(",", ":")).encode()
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return json.dumps(schema["enum"][0], ensure_ascii=False, separators=(",", ":")).encode()
        ts = _types(schema)
        if ts:
            return DEFAULTS[ts[0]]
    return b"null"


class JsonPrefix:
    """Incremental JSON prefix checker over bytes.

    feed(b) -> bool (commits only if valid), accepts(b) -> bool (no commit), complete (a full value
    was read: the text may end here), done (the value is closed; only whitespace may follow),
    closing() -> the shortest bytes after which `complete` holds.
    """

    __slots__ = ("stack", "mode", "sub", "esc", "lit", "ws", "is_key", "key", "seen", "last_key",
                 "top_types", "integer", "required", "props")

    def __init__(self, schema: Mapping | None = None, top_type: str | Sequence[str] | None = None):
        self.stack: list[int] = []          # b"{"[0] / b"["[0] per open container
        self.mode = VALUE
        self.sub = 0                        # number sub-state
        self.esc = 0                        # string: 0 plain, 1 after '\', 2..5 hex digits left + 1, -k utf8 left
        self.lit = b""                      # literal bytes still expected
        self.ws = 0
        self.is_key = False
        self.key = bytearray()              # bytes of the depth-1 key being read
        self.seen: set[str] = set()         # depth-1 keys seen
        self.last_key: str | None = None
        if top_type is not None:
            types = (top_type,) if isinstance(top_type, str) else tuple(top_type)
        else:
            types = _types(schema)
        self.top_types = types
        self.integer = types == ("integer",)
        obj = "object" in types
        self.required = tuple(k for k in (schema or {}).get("required", ()) if isinstance(k, str)) if obj else ()
        props = (schema or {}).get("properties") if obj else None
        self.props = props if isinstance(props, Mapping) else {}

    # -- state -----------------------------------------------------------------------------------
    def copy(self) -> "JsonPrefix":
        c = object.__new__(JsonPrefix)
        for k in JsonPrefix.__slots__:
            setattr(c, k, getattr(self, k))
        c.stack = list(self.stack)
        c.key = bytearray(self.key)
        c.seen = set(self.seen)
        return c

    @property
    def complete(self) -> bool:
        return self.mode == DONE or (self.mode == NUM and not self.stack and self.sub in N_TERMINAL)

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def accepts(self, data: bytes) -> bool:
        return self.copy()._run(data)

    def feed(self, data: bytes) -> bool:
        c = self.copy()
        if not c._run(data):
            return False
        for k in JsonPrefix.__slots__:
            setattr(self, k, getattr(c, k))
        return True

    def missing(self) -> list[str]:
        return [k for k in self.required if k not in self.seen]

    # -- the automaton ---------------------------------------------------------------------------
    def _run(self, data: bytes) -> bool:
        step = self._byte
        for b in data:
            if not step(b):
                return False
        return True

    def _value_end(self) -> None:
        self.mode = AFTER if self.stack else DONE
        self.ws = 0

    def _start_value(self, b: int) -> bool:
        if not self.stack and self.top_types and b not in frozenset().union(
                *(TYPE_STARTS[t] for t in self.top_types)):
            return False
        if b == 0x7B:                                  # {
            self.stack.append(b)
            self.mode = OBJ_FIRST
        elif b == 0x5B:                                # [
            self.stack.append(b)
            self.mode = ARR_FIRST
        elif b == 0x22:                                # "
            self.mode, self.esc, self.is_key = STR, 0, False
        elif b == 0x2D:
            self.mode, self.sub = NUM, N_SIGN
        elif b == 0x30:
            self.mode, self.sub = NUM, N_ZERO
        elif b in DIGITS:
            self.mode, self.sub = NUM, N_INT
        elif b in LITERALS:
            self.mode, self.lit = LIT, LITERALS[b]
        else:
            return False
        self.ws = 0
        return True

    def _ws(self, b: int) -> bool:
        if b in WS and self.ws < MAX_WS_RUN:
            self.ws += 1
            return True
        return False

    def _start_key(self) -> None:
        self.mode, self.esc, self.is_key = STR, 0, True
        self.key.clear()
        self.ws = 0

    def _close_obj_ok(self) -> bool:
        return len(self.stack) != 1 or not self.missing()

    def _byte(self, b: int) -> bool:
        m = self.mode
        if m == STR:
            return self._str_byte(b)
        if m == NUM:
            return self._num_byte(b)
        if m == LIT:
            if b != self.lit[0]:
                return False
            self.lit = self.lit[1:]
            if not self.lit:
                self._value_end()
            return True
        if m == VALUE:                                 # no whitespace before the top-level value
            return (bool(self.stack) and self._ws(b)) or self._start_value(b)
        if m == ARR_FIRST:
            if b == 0x5D:
                self.stack.pop()
                self._value_end()
                return True
            return self._ws(b) or self._start_value(b)
        if m == OBJ_FIRST:
            if b == 0x7D:
                if not self._close_obj_ok():
                    return False
                self.stack.pop()
                self._value_end()
                return True
            if b == 0x22:
                self._start_key()
                return True
            return self._ws(b)
        if m == OBJ_KEY:
            if b == 0x22:
                self._start_key()
                return True
            return self._ws(b)
        if m == COLON:
            if b == 0x3A:
                self.mode, self.ws = VALUE, 0
                return True
            return self._ws(b)
        if m == AFTER:
            top = self.stack[-1]
            if b == 0x2C:
                self.mode, self.ws = (OBJ_KEY if top == 0x7B else VALUE), 0
                return True
            if (b == 0x7D and top == 0x7B and self._close_obj_ok()) or (b == 0x5D and top == 0x5B):
                self.stack.pop()
                self._value_end()
                return True
            return self._ws(b)
        if m == DONE:
            return self._ws(b)
        return False

    def _str_byte(self, b: int) -> bool:
        e = self.esc
        if e < 0:                                      # inside a UTF-8 sequence
            if 0x80 <= b <= 0xBF:
                self.esc += 1
                self._key_byte(b)
                return True
            return False
        if e == 1:
            if b not in ESCAPES:
                return False
            self.esc = 5 if b == 0x75 else 0           # \u: 4 hex digits (esc 5..2)
            self._key_byte(b)
            return True
        if e >= 2:
            if b not in HEX:
                return False
            self.esc = e - 1 if e > 2 else 0
            self._key_byte(b)
            return True
        if b == 0x22:
            if self.is_key:
                if len(self.stack) == 1:
                    try:
                        k = json.loads(b'"' + bytes(self.key) + b'"')
                    except ValueError:
                        k = None
                    if isinstance(k, str):
                        self.seen.add(k)
                        self.last_key = k
                self.mode, self.ws = COLON, 0
            else:
                self._value_end()
            return True
        if b == 0x5C:
            self.esc = 1
            self._key_byte(b)
            return True
        if b < 0x20:
            return False
        if b >= 0x80:
            if 0xC2 <= b <= 0xDF:
                self.esc = -1
            elif 0xE0 <= b <= 0xEF:
                self.esc = -2
            elif 0xF0 <= b <= 0xF4:
                self.esc = -3
            else:
                return False
        self._key_byte(b)
        return True

    def _key_byte(self, b: int) -> None:
        if self.is_key and len(self.stack) == 1:
            self.key.append(b)

    def _num_byte(self, b: int) -> bool:
        s = self.sub
        top_int = self.integer and not self.stack
        if b in DIGITS:
            if s == N_SIGN:
                self.sub = N_ZERO if b == 0x30 else N_INT
            elif s == N_ZERO:
                return False                           # no leading zeros
            elif s in (N_INT, N_FRAC, N_EXP):
                pass
            elif s == N_DOT:
                self.sub = N_FRAC
            elif s in (N_E, N_ESIGN):
                self.sub = N_EXP
            return True
        if b == 0x2E and s in (N_ZERO, N_INT) and not top_int:
            self.sub = N_DOT
            return True
        if b in (0x65, 0x45) and s in (N_ZERO, N_INT, N_FRAC) and not top_int:
            self.sub = N_E
            return True
        if b in (0x2B, 0x2D) and s == N_E:
            self.sub = N_ESIGN
            return True
        if s not in N_TERMINAL:
            return False
        self._value_end()                              # the number ended; this byte follows it
        return self._byte(b)

    # -- completion ------------------------------------------------------------------------------
    def closing(self) -> bytes:
        """Shortest bytes after which the value is complete (missing required keys included)."""
        st, out = self.copy(), bytearray()

        def put(bs: bytes) -> None:
            ok = st._run(bs)
            assert ok, (bytes(out), bs)
            out.extend(bs)

        for _ in range(10_000):
            if st.complete:
                break
            m = st.mode
            if m == STR:
                if st.esc == 1:
                    put(b"n")
                elif st.esc >= 2:
                    put(b"0" * (st.esc - 1))
                elif st.esc < 0:
                    put(b"\x80" * -st.esc)
                else:
                    put(b'"')
            elif m == NUM and st.sub not in N_TERMINAL:
                put(b"0")
            elif m == LIT:
                put(st.lit)
            elif m == VALUE:
                if not st.stack:
                    put(DEFAULTS[st.top_types[0]][:1] if st.top_types else b"{")
                elif len(st.stack) == 1 and st.stack[0] == 0x7B and st.last_key in st.props:
                    put(default_value(st.props[st.last_key]))
                else:
                    put(b"null")
            elif m == ARR_FIRST:
                put(b"]")
            elif m in (OBJ_FIRST, OBJ_KEY):
                miss = st.missing() if len(st.stack) == 1 else []
                if m == OBJ_FIRST and not miss:
                    put(b"}")
                else:
                    k = miss[0] if miss else ""
                    put(json.dumps(k, ensure_ascii=False).encode())
            elif m == COLON:
                put(b":")
            else:                                      # AFTER, or a number that can end here
                top = st.stack[-1]
                if top == 0x5B:
                    put(b"]")
                elif len(st.stack) == 1 and st.missing():
                    put(b",")
                else:
                    put(b"}")
        return bytes(out)


# ---------------------------------------------------------------------------------------------
# Token-level program

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

    def allows(self, step: Step, token: int) -> bool:
        """Full check of one token against a step (used for tests and forced-token sanity)."""
        if step.force is not None:
            return token == step.force
        if token >= self.num_base:
            return (token not in step.ban) if step.specials is None else token in step.specials
        return step.text and (step.check is None or step.check(self.token_bytes(token)))

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
