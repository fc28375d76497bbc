"""Incremental parser of K2's raw output: reasoning, content and tool calls as stream events.

Shape of a K2 response (reference §5):
    [<think>] reasoning </think> content
    <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
    <|tool_calls_section_end|> <|im_end|>
Behaviour follows vLLM's kimi_k2 reasoning and tool parsers: a leading <think> is optional and only
consumed at position 0; with reasoning on, everything before </think> (or before the tool section,
which ends reasoning implicitly) is reasoning, and output with no end marker is all reasoning.

Markers are recognised by token id; ordinary tokens are decoded incrementally (UTF-8 safe). The
tool-call markers (and the singular `<|tool_call_section_begin|>` spelling vLLM also accepts) are
recognised in decoded text too, so no marker text reaches content. Malformed output never raises:
what cannot be read as a tool call goes to content.
"""

from __future__ import annotations

from collections.abc import Iterable

from .events import ContentDelta, ReasoningDelta, ToolCallDelta
from .tokenizer import IncrementalDecoder, Tokenizer

THINK, END_THINK = "think", "end_think"
SECTION_BEGIN, SECTION_END = "section_begin", "section_end"
CALL_BEGIN, ARG_BEGIN, CALL_END = "call_begin", "arg_begin", "call_end"
END = "end"

TOOL_MARKERS = {
    "<|tool_calls_section_begin|>": SECTION_BEGIN,
    "<|tool_call_section_begin|>": SECTION_BEGIN,
    "<|tool_calls_section_end|>": SECTION_END,
    "<|tool_call_section_end|>": SECTION_END,
    "<|tool_call_begin|>": CALL_BEGIN,
    "<|tool_call_argument_begin|>": ARG_BEGIN,
    "<|tool_call_end|>": CALL_END,
}
# feed_text() (engines that only give text) also reads these from the text.
TEXT_ONLY_MARKERS = {"<think>": THINK, "</think>": END_THINK, "<|im_end|>": END}
ALL_MARKERS = {**TOOL_MARKERS, **TEXT_ONLY_MARKERS}

# states
START, REASONING, CONTENT, SECTION, CALL_ID, CALL_ARGS, DONE = range(7)
PHASES = ("start", "reasoning", "content", "tool_section", "tool_call_id", "tool_arguments", "done")


def tool_name(call_id: str) -> str:
    """functions.get_weather:0 -> get_weather (vLLM's rule)."""
    return call_id.split(":")[0].split(".")[-1]


class _MarkerScanner:
    """Splits text into plain text and marker kinds, holding back a tail that may start a marker."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str, markers: dict[str, str], final: bool = False) -> list[tuple[bool, str]]:
        buf, out = self.held + text, []
        while buf:
            hits = [(buf.find(m), m) for m in markers]
            hits = [(i, m) for i, m in hits if i >= 0]
            if hits:
                i, m = min(hits)
                if i:
                    out.append((False, buf[:i]))
                out.append((True, markers[m]))
                buf = buf[i + len(m):]
                continue
            keep = 0 if final else self._partial_tail(buf, markers)
            if len(buf) > keep:
                out.append((False, buf[:len(buf) - keep]))
            buf = buf[len(buf) - keep:]
            break
        self.held = buf
        return out

    @staticmethod
    def _partial_tail(buf: str, markers: dict[str, str]) -> int:
        longest = max(map(len, markers))
        for i in range(max(0, len(buf) - longest + 1), len(buf)):
            if buf[i] == "<" and any(m.startswith(buf[i:]) for m in markers):
                return len(buf) - i
        return 0


class K2OutputParser:
    """feed(token_ids) / finish() -> events; .reasoning, .content, .tool_calls accumulate."""

    def __init__(self, tokenizer: Tokenizer, reasoning: bool = True):
        self.tokenizer = tokenizer
        self.reasoning_enabled = reasoning
        ids = tokenizer.special_ids
        self._marker_ids = {ids[s]: k for s, k in ALL_MARKERS.items() if s in ids}
        for i in tokenizer.eos_ids:
            self._marker_ids[i] = END
        self._decoder = IncrementalDecoder(tokenizer)
        self._scanner = _MarkerScanner()
        self._text_markers = TOOL_MARKERS    # marker strings read from text (all of them in feed_text)
        self._state = START
        self._events: list = []
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.tool_calls: list[dict[str, str]] = []     # [{id, name, arguments}]
        self._call_id = ""
        self._args_started = False
        self._pending_ws = ""

    # -- public --------------------------------------------------------------------------------
    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def phase(self) -> str:
        """Where the output is now: start | reasoning | content | tool_section | tool_call_id |
        tool_arguments | done (for the chat layer's constrained decoding)."""
        return PHASES[self._state]

    @property
    def done(self) -> bool:
        """True once an end token (<|im_end|>, [EOS]) was seen or finish() was called."""
        return self._state == DONE

    def feed(self, token_ids: Iterable[int]) -> list:
        """Events for these new token ids."""
        run: list[int] = []
        num_base = self.tokenizer.num_base
        for t in token_ids:
            if self._state == DONE:
                break
            if t < num_base:
                run.append(t)
                continue
            kind = self._marker_ids.get(t)
            if kind is None:
                continue                     # other control tokens are never text
            self._text(self._decoder.feed(run) + self._decoder.flush(), final=True)
            run = []
            self._marker(kind)
        if run and self._state != DONE:
            self._text(self._decoder.feed(run))
        return self._take()

    def feed_text(self, text: str) -> list:
        """Events for raw K2 text (for engines that give text, not ids); every marker is read from text."""
        self._text_markers = ALL_MARKERS
        if self._state != DONE:
            self._text(text)
        return self._take()

    def finish(self) -> list:
        """Flush: held-back text, an unfinished tool call. Further input is ignored."""
        if self._state != DONE:
            self._text(self._decoder.flush(), final=True)
            self._close()
        return self._take()

    # -- internals -----------------------------------------------------------------------------
    def _take(self) -> list:
        out, self._events = self._events, []
        return out

    def _emit(self, ev) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(ev, (ReasoningDelta, ContentDelta)) and type(last) is type(ev):
            self._events[-1] = type(ev)(last.text + ev.text)
        elif (isinstance(ev, ToolCallDelta) and ev.id is None and isinstance(last, ToolCallDelta)
              and last.index == ev.index):
            self._events[-1] = ToolCallDelta(last.index, last.id, last.name,
                                             last.arguments_fragment + ev.arguments_fragment)
        else:
            self._events.append(ev)

    def _text(self, text: str, final: bool = False) -> None:
        if not text and not (final and self._scanner.held):
            return
        for is_marker, s in self._scanner.feed(text, self._text_markers, final=final):
            if self._state == DONE:
                break
            if is_marker:
                self._marker(s)
            else:
                self._plain(s)

    def _to_content(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._emit(ContentDelta(text))

    def _plain(self, text: str) -> None:
        st = self._state
        if st == START:
            st = self._state = REASONING if self.reasoning_enabled else CONTENT
        if st == REASONING:
            self._reasoning.append(text)
            self._emit(ReasoningDelta(text))
        elif st == CONTENT:
            self._to_content(text)
        elif st == SECTION:                  # between calls: whitespace is layout, the rest content
            if text.strip():
                self._to_content(text)
        elif st == CALL_ID:
            self._call_id += text
        elif st == CALL_ARGS:
            self._args_text(text)

    def _args_text(self, text: str) -> None:
        """Argument text, without the whitespace around the JSON (as vLLM's regex strips it)."""
        if not self._args_started:
            text = text.lstrip()
            if not text:
                return
            self._args_started = True
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = text[len(body):]
        if body:
            self.tool_calls[-1]["arguments"] += body
            self._emit(ToolCallDelta(len(self.tool_calls) - 1, None, None, body))

    def _start_call(self) -> None:
        call_id = self._call_id.strip()
        self._call_id = ""
        self._args_started, self._pending_ws = False, ""
        name = tool_name(call_id)
        self.tool_calls.append({"id": call_id, "name": name, "arguments": ""})
        self._emit(ToolCallDelta(len(self.tool_calls) - 1, call_id, name, ""))

    def _abandon_call_id(self) -> None:
        """A call header that never reached <|tool_call_argument_begin|>: its text is content."""
        text, self._call_id = self._call_id, ""
        if text.strip():
            self._to_content(text)

    def _marker(self, kind: str) -> None:
        st = self._state
        if st == CALL_ID and kind in (END, SECTION_BEGIN, CALL_BEGIN, CALL_END, SECTION_END):
            self._abandon_call_id()          # a call header cut short by another call marker or the end
        if kind == END:
            self._state = DONE
        elif kind == THINK:
            if st == START:
                self._state = REASONING if self.reasoning_enabled else CONTENT
        elif kind == END_THINK:
            if st in (START, REASONING):
                self._state = CONTENT
        elif kind == SECTION_BEGIN:
            self._state = SECTION
        elif kind == CALL_BEGIN:
            self._call_id = ""
            self._state = CALL_ID            # outside a section this opens one implicitly
        elif kind == ARG_BEGIN:
            if st == CALL_ID:
                self._start_call()
                self._state = CALL_ARGS
        elif kind == CALL_END:
            if st in (CALL_ID, CALL_ARGS):
                self._state = SECTION
        elif kind == SECTION_END:
            if st in (SECTION, CALL_ID, CALL_ARGS):
                self._state = CONTENT            # text after the section is content

    def _close(self) -> None:
        if self._state == CALL_ID:
            self._abandon_call_id()
        self._state = DONE
