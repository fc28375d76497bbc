"""An incremental JSON prefix checker over bytes (a small pushdown automaton) for constrained decoding.

`JsonPrefix` says whether bytes keep the text a prefix of one valid JSON value, whether the value is
complete, and the shortest bytes that complete it (`closing()`), so output can be closed before
max_tokens runs out. Optional schema pieces: the top-level type(s) and, for a top-level object, its
`required` keys (the object cannot close before they are present; `closing()` adds missing ones with a
default value of their declared type). Inside strings any byte >= 0x80 is accepted as part of a UTF-8
sequence, so multi-byte tokens (and tokens that split a character) work.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import Mapping, Sequence

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

    feed(b) -> bool (commits only if valid; `copy().feed(b)` tests without committing), complete (a
    full value was read: the text may end here), done (the value is closed; only whitespace may
    follow), closing() -> the shortest bytes after which `complete` holds.
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
    def copy(self) -> JsonPrefix:
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
