"""run_turn end to end: a scripted model (a session at the engine's interface whose script changes with
each request) writes K2 tool calls; the MCP test server runs them over stdio; the results go back and
the model's next answer appears. Approval once / always / deny, the round limit, crashes, cancel."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kimi_desktop.chat import ContentDelta, Finish, ReasoningDelta, ToolCallDelta
from kimi_desktop.engines.native import NativeEngine
from kimi_desktop.mcp_tools import McpHub, parse_mcp_config
from kimi_desktop.tool_loop import DENIED_TEXT, ToolResultEvent, TurnNote, run_turn

from .mcp_server import stdio_config
from .server.helpers import ScriptedSession

ASK = [{"role": "user", "content": "Weather in Oslo?"}]
ANSWER = "<think>The tool says sunny.</think>It is sunny in Oslo.<|im_end|>"


def say(text: str) -> str:
    """A final answer (after a short reasoning block: the template may open one)."""
    return f"<think>ok</think>{text}<|im_end|>"


def call(name: str, args: dict, idx: int = 0) -> str:
    """K2's tool-call section for one call."""
    return (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>"
            f"{json.dumps(args)}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


class TurnScripts(ScriptedSession):
    """Request k (counted by the truncate that starts each request) writes scripts[k] (the last one
    repeats); `prompts` keeps each request's prompt tokens, as the model saw them."""

    def __init__(self, vocab: int, tokenizer):
        super().__init__(vocab)
        self.tok, self.scripts, self.requests, self.prompts = tokenizer, [], 0, []

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.script = self.tok.encode(self.scripts[min(self.requests, len(self.scripts) - 1)])
        self.requests += 1
        self.prompts.append(None)

    def feed(self, ids, all_logits=False, progress=None, cancelled=None):
        out = super().feed(ids, all_logits)
        if self.prompts and self.prompts[-1] is None:
            self.prompts[-1] = self.tok.decode(self.tokens, skip_special=False)
        return out


@pytest.fixture(scope="module")
def hub():
    h = McpHub(parse_mcp_config(json.dumps(stdio_config("tooltest", "crashy"))), connect_timeout_s=15).start()
    yield h
    h.close()


@pytest.fixture(scope="module")
def engine(tiny_int4):
    e = NativeEngine(tiny_int4)
    e.session, e.pool = TurnScripts(e.vocab, e.tokenizer), None
    yield e
    e.close()


@pytest.fixture
def model(engine):
    """model(*scripts, delay=0.0): what the scripted model writes for each request of the next turn."""
    sess = engine.session

    def set_scripts(*scripts: str, delay: float = 0.0) -> TurnScripts:
        sess.scripts, sess.requests, sess.prompts, sess.delay = list(scripts), 0, [], delay
        return sess
    yield set_scripts
    sess.delay = 0.0


class Recorder:
    def __init__(self, answers=("once",)):
        self.answers, self.asked, self.events = list(answers), [], []

    def approve(self, server, tool, args):
        self.asked.append((server, tool, args))
        return self.answers[min(len(self.asked), len(self.answers)) - 1]

    def on_event(self, ev):
        self.events.append(ev)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def text(self, kind=ContentDelta):
        return "".join(e.text for e in self.of(kind))


def turn(engine, hub, rec, **kw):
    return run_turn(engine, ASK, tools=hub.tools(), hub=hub, approve=rec.approve, on_event=rec.on_event, **kw)


def test_tool_call_runs_and_the_answer_after_it_appears(engine, hub, model):
    sess = model(call("weather_now", {"city": "Oslo"}), ANSWER)
    rec = Recorder(["once"])
    new = turn(engine, hub, rec)
    assert rec.asked == [("tooltest", "weather_now", {"city": "Oslo"})]
    assert rec.of(ToolResultEvent) == [ToolResultEvent("functions.weather_now:0", "weather_now",
                                                       "tooltest: sunny in Oslo", False)]
    assert [f.reason for f in rec.of(Finish)] == ["tool_calls", "stop"]
    assert rec.text() == "It is sunny in Oslo." and rec.text(ReasoningDelta) == "The tool says sunny."
    # the result event comes between the two answers
    kinds = [type(e) for e in rec.events]
    assert kinds.index(ToolResultEvent) < kinds.index(ContentDelta)
    assert any(isinstance(e, ToolCallDelta) and e.name == "weather_now" for e in rec.events)
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"]
    tc = new[0]["tool_calls"][0]
    assert tc["id"] == "functions.weather_now:0" and json.loads(tc["function"]["arguments"]) == {"city": "Oslo"}
    assert new[1] == {"role": "tool", "tool_call_id": "functions.weather_now:0",
                      "content": "tooltest: sunny in Oslo"}
    assert new[2]["content"] == "It is sunny in Oslo." and new[2]["reasoning_content"] == "The tool says sunny."
    assert sess.requests == 2
    assert "tooltest: sunny in Oslo" in sess.prompts[1] and "tooltest: sunny" not in sess.prompts[0]


def test_deny_does_not_run_the_tool(engine, hub, model):
    model(call("crash", {}), say("Fine, I will not."))
    rec = Recorder(["deny"])
    new = turn(engine, hub, rec)
    assert rec.asked == [("tooltest", "crash", {})]
    (res,) = rec.of(ToolResultEvent)
    assert res.is_error and res.text == DENIED_TEXT
    assert DENIED_TEXT in new[1]["content"] and new[2]["content"] == "Fine, I will not."
    assert hub.status()["tooltest"].state == "connected"          # crash was not called


def test_always_asks_once_per_server(engine, hub, model):
    sess = model(call("add", {"a": 1, "b": 2}), call("add", {"a": 3, "b": 4}, 1), say("Done."))
    rec = Recorder(["always"])
    new = turn(engine, hub, rec)
    assert len(rec.asked) == 1 and sess.requests == 3
    assert [r.text for r in rec.of(ToolResultEvent)] == ["3", "7"]
    assert [m.get("tool_call_id") for m in new if m["role"] == "tool"] == ["functions.add:0", "functions.add:1"]


def test_round_limit_stops_with_a_note(engine, hub, model):
    sess = model(call("add", {"a": 1, "b": 1}), call("add", {"a": 2, "b": 2}, 1))      # it never stops
    rec = Recorder(["once"])
    new = turn(engine, hub, rec, max_rounds=1)
    assert sess.requests == 2 and len(rec.asked) == 1
    results = rec.of(ToolResultEvent)
    assert results[0].text == "2" and results[1].is_error and "not run" in results[1].text
    (note,) = rec.of(TurnNote)
    assert "1 tool round" in note.text and "not run" in note.text
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant", "tool"]     # every call answered


def test_crashing_server_is_an_error_card_and_the_turn_goes_on(engine, hub, model):
    model(call("crashy_crash", {}), say("The tool broke."))
    rec = Recorder(["once"])
    new = turn(engine, hub, rec)
    (res,) = rec.of(ToolResultEvent)
    assert res.is_error and "'crashy' stopped while running 'crash'" in res.text
    assert new[1]["content"].startswith("Error: ") and new[2]["content"] == "The tool broke."


def test_unknown_tool_is_answered_without_asking(engine, hub, model):
    model(call("launch_rockets", {}), say("Sorry."))
    rec = Recorder()
    new = turn(engine, hub, rec)
    assert rec.asked == [] and "launch_rockets" in rec.of(ToolResultEvent)[0].text
    assert new[-1]["content"] == "Sorry."


def test_cancel_while_streaming_stops_at_once(engine, hub, model):
    sess = model("<think>" + "thinking " * 200 + "</think>done<|im_end|>", delay=0.02)
    rec = Recorder()
    stop = threading.Event()

    def on_event(ev):
        rec.on_event(ev)
        if len(rec.of(ReasoningDelta)) == 3:
            stop.set()
    t0 = time.monotonic()
    new = run_turn(engine, ASK, tools=hub.tools(), hub=hub, approve=rec.approve, on_event=on_event,
                   cancelled=stop.is_set)
    assert time.monotonic() - t0 < 5 and sess.requests == 1
    assert rec.of(Finish)[-1].reason == "cancelled"
    assert len(rec.of(ReasoningDelta)) <= 4                        # at most the token in flight
    (partial,) = new                                              # the half answer is kept
    assert partial["reasoning_content"] == rec.text(ReasoningDelta)
    assert ("thinking " * 200).startswith(partial["reasoning_content"]) and "tool_calls" not in partial


def test_cancel_during_a_tool_call(engine, hub, model):
    sess = model(call("nap", {"seconds": 2}), say("never"))
    rec = Recorder(["once"])
    t0 = time.monotonic()
    new = turn(engine, hub, rec, cancelled=lambda: bool(rec.asked) and time.monotonic() - t0 > 0.3)
    assert time.monotonic() - t0 < 1.5 and sess.requests == 1           # before the 2 s nap ends
    (res,) = rec.of(ToolResultEvent)
    assert res.is_error and "cancelled" in res.text
    assert [m["role"] for m in new] == ["assistant", "tool"]


def test_turn_tools_alone(hub):
    """The tool half the app's controller can drive itself: rounds, "always", the limit, every call answered."""
    from kimi_desktop.tool_loop import TurnTools, fill_call_ids, tool_message
    asked = []
    tools = TurnTools(hub, lambda s, t, a: asked.append(t) or "always", max_rounds=1)
    msg = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1'}},
        {"type": "function", "function": {"name": "weather_now", "arguments": {"city": "Rome"}}}]}
    fill_call_ids(msg, [{"role": "assistant", "tool_calls": [{"id": "x"}]}])
    assert [tc["id"] for tc in msg["tool_calls"]] == ["functions.add:1", "functions.add:2", "functions.weather_now:3"]
    results, note = tools.run_calls(msg["tool_calls"])
    assert note is None and asked == ["add"]                      # bad JSON is not asked about; "always" holds
    assert [r.text for _, r in results][0::2] == ["3", "tooltest: sunny in Rome"]
    assert results[1][1].is_error and "not valid JSON" in results[1][1].text
    assert tool_message("functions.add:2", results[1][1])["content"].startswith("Error: tool 'add' was not run")
    results, note = tools.run_calls(msg["tool_calls"][:1])
    assert note is not None and results[0][1].is_error and "not run" in results[0][1].text
