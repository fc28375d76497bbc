"""One chat turn with tools: the model answers, calls MCP tools (each call approved by the user), reads
the results, and goes on until it answers without tool calls. Qt-free; the app runs it on its worker.

    new = run_turn(engine, messages, tools=hub.tools(), hub=hub, approve=ask, on_event=show,
                   sampling=Sampling(...), max_rounds=settings.max_tool_rounds,
                   timeout_s=settings.tool_timeout_s, cancelled=lambda: stop_flag.is_set())
    messages += new          # assistant messages (with tool_calls and reasoning_content) and tool messages

- on_event(ev) gets every event of every engine stream (ReasoningDelta, ContentDelta, ToolCallDelta,
  Usage, Finish, ...), then for each tool call a ToolResultEvent, and a TurnNote when the loop stops
  for a reason the user should read (the round limit). A new round's events follow the previous
  round's Finish("tool_calls") and ToolResultEvents.
- approve(server, tool_name, arguments: dict) -> "once" | "always" | "deny"; it may block (a dialog).
  The caller keeps "always" in Settings.mcp_always_allow (and answers "always" without asking for such
  servers); the loop also stops asking for that server for the rest of the turn. A tool no server
  offers, or arguments that are not a JSON object, are answered with an error without asking.
- max_rounds: tool rounds per turn. When the model asks for tools once more after max_rounds rounds,
  those calls are not run: each gets a tool message saying so, and a TurnNote explains it.
- cancelled() is polled (every event, and every 20 ms by a watcher while a stream or a tool call
  waits): the stream is cancelled at once (stream.cancel()), the partial assistant message is kept
  (its unfinished tool calls dropped), and tool calls not run get a "cancelled" tool message, so the
  history stays valid for the next request.
- The tool half (approvals, rounds, calls) is TurnTools, which the app's controller can use alone when
  it streams the model itself; tool_message() and fill_call_ids() build the history the same way.
- Every tool_call_id gets exactly one tool message. Exceptions from the engine (ChatRequestError when
  the tool results overflow the context, an engine error) propagate unchanged, carrying the messages
  this turn had produced so far as `exc.turn_messages`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kimi_desktop.chat import ChatResult, Sampling, count_history_tool_calls
from kimi_desktop.mcp_tools import ToolResult, parse_arguments

__all__ = ["ToolResultEvent", "TurnNote", "TurnTools", "run_turn", "tool_message", "fill_call_ids", "APPROVALS",
           "DENIED_TEXT"]

APPROVALS = ("once", "always", "deny")
DENIED_TEXT = "The user denied this tool call."
WATCH_S = 0.02


@dataclass(frozen=True)
class ToolResultEvent:
    call_id: str
    name: str
    text: str
    is_error: bool


@dataclass(frozen=True)
class TurnNote:
    """Something the user should read about the turn itself (not model output)."""
    text: str


class _Watch:
    """Polls cancelled() on a thread while the turn runs; cancels the stream in flight at once."""

    def __init__(self, cancelled: Callable[[], bool]):
        self.cancelled_fn, self.stream, self.hit = cancelled, None, threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="kimi-turn-cancel", daemon=True)
        self.thread.start()

    def _poll(self):
        while not self.done.wait(WATCH_S):
            if self.check():
                return

    def check(self) -> bool:
        if not self.hit.is_set() and self.cancelled_fn():
            self.hit.set()
            s = self.stream
            if s is not None:
                s.cancel()
        return self.hit.is_set()

    def stop(self):
        self.done.set()


def run_turn(engine, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping] | None, hub,
             approve: Callable[[str, str, dict], str], on_event: Callable[[Any], None],
             sampling: Sampling | None = None, max_rounds: int = 16, timeout_s: float = 30.0,
             cancelled: Callable[[], bool] = lambda: False) -> list[dict]:
    """Run one turn (see the module docstring); returns the messages it appended."""
    new: list[dict] = []
    watch = _Watch(cancelled)
    runner = TurnTools(hub, approve, max_rounds=max_rounds, timeout_s=timeout_s, cancelled=watch.check)
    try:
        while True:
            if watch.check():
                return new
            stream = engine.chat(list(messages) + new, tools=list(tools) if tools else None,
                                 sampling=sampling)
            watch.stream = stream
            if watch.hit.is_set():             # cancelled before the watcher saw this stream
                stream.cancel()
            result = ChatResult()
            for ev in stream:
                result.add(ev)
                on_event(ev)
                watch.check()
            watch.stream = None
            msg = result.message()
            if result.finish_reason != "tool_calls" or not result.tool_calls or watch.hit.is_set():
                msg.pop("tool_calls", None)            # a cancelled answer's half-written calls
                if msg.get("content") or msg.get("reasoning_content"):
                    new.append(msg)
                return new
            fill_call_ids(msg, list(messages) + new)
            new.append(msg)
            results, note = runner.run_calls(msg["tool_calls"])
            for tc, res in results:
                new.append(tool_message(tc["id"], res))
                on_event(ToolResultEvent(tc["id"], tc["function"]["name"], res.text, res.is_error))
            if note is not None:
                on_event(note)
                return new
    except BaseException as e:
        if not hasattr(e, "turn_messages"):
            try:
                e.turn_messages = new
            except AttributeError:
                pass
        raise
    finally:
        watch.stop()


def tool_message(call_id: str, res: ToolResult) -> dict:
    """The tool message that answers one call (errors say so to the model)."""
    return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {res.text}" if res.is_error else res.text}


def fill_call_ids(msg: dict, history: Sequence[Mapping[str, Any]]) -> None:
    """Give calls without an id (some engines) K2's own form, functions.NAME:IDX, counting the history."""
    base = count_history_tool_calls(history)
    for i, tc in enumerate(msg.get("tool_calls") or ()):
        if not tc.get("id"):
            tc["id"] = f"functions.{tc['function']['name']}:{base + i}"


class TurnTools:
    """The tool half of a turn, for run_turn and for callers that stream the model themselves (the
    app's controller): one instance per turn remembers "always" answers and counts rounds.

        tools = TurnTools(hub, approve, max_rounds=16, timeout_s=30, cancelled=flag.is_set)
        results, note = tools.run_calls(assistant_msg["tool_calls"])   # [(call, ToolResult)], TurnNote | None

    run_calls blocks (approval dialogs, the tools themselves): call it off the UI thread. Past
    max_rounds it runs nothing and answers every call with "not run" plus a TurnNote; the caller
    then stops the turn. Every call gets exactly one result, in order."""

    def __init__(self, hub, approve: Callable[[str, str, dict], str], *, max_rounds: int = 16,
                 timeout_s: float = 30.0, cancelled: Callable[[], bool] = lambda: False):
        self.hub, self.approve, self.max_rounds, self.timeout_s = hub, approve, max_rounds, timeout_s
        self.cancelled = cancelled
        self.rounds = 0
        self.allowed: set[str] = set()             # servers answered "always" this turn

    def run_calls(self, tool_calls: Sequence[Mapping[str, Any]]) -> tuple[list, TurnNote | None]:
        if self.rounds >= self.max_rounds:
            n = self.max_rounds
            res = ToolResult(f"not run: the limit of {n} tool rounds per turn was reached", True)
            return [(tc, res) for tc in tool_calls], TurnNote(
                f"Stopped: the model asked for tools again after {n} tool round{'s' if n != 1 else ''} "
                f"this turn (the limit in the settings); those calls were not run.")
        self.rounds += 1
        out = []
        for tc in tool_calls:
            if self.cancelled():
                out.append((tc, ToolResult("not run: the turn was cancelled", True)))
            else:
                out.append((tc, self._run(tc)))
        return out, None

    def _run(self, tc: Mapping[str, Any]) -> ToolResult:
        name = tc["function"]["name"]
        server = self.hub.server_of(name) if self.hub is not None else None
        if server is None:
            return ToolResult(f"there is no tool named {name!r}", True)
        try:
            args = parse_arguments(tc["function"].get("arguments"))
        except ValueError as e:
            return ToolResult(f"tool {name!r} was not run: {e}", True)
        if server not in self.allowed:
            answer = self.approve(server, name, args)
            if answer not in APPROVALS:
                raise ValueError(f"approve() must return one of {', '.join(APPROVALS)}, got {answer!r}")
            if answer == "deny":
                return ToolResult(DENIED_TEXT, True)
            if answer == "always":
                self.allowed.add(server)
            if self.cancelled():
                return ToolResult("not run: the turn was cancelled", True)
        return self.hub.call(name, args, self.timeout_s, cancelled=self.cancelled)
