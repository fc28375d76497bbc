"""MCP end to end in the window: a small stdio MCP server (tests/kimi_desktop/mcp_server.py, the mcp SDK)
is called by the scripted model's K2 tool call; the approval, the result card and the model's follow-up
answer all appear; a server that crashes mid-call gives an error card and the turn goes on."""

from __future__ import annotations

import json

import pytest
from PySide6.QtCore import Qt

from kimi_desktop.mcp_tools import McpHub, parse_mcp_config
from kimi_desktop.ui.controller import Controller
from kimi_desktop.ui.main_window import MainWindow
from kimi_desktop.ui.tool_approval import Approver
from kimi_desktop.ui.tools import ToolSession

from tests.kimi_desktop.mcp_server import stdio_config


def k2_call(name: str, args: dict, idx: int = 0) -> str:
    return (f"<think>I will use {name}.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{idx}"
            f"<|tool_call_argument_begin|>{json.dumps(args)}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


@pytest.fixture(scope="module")
def hub():
    h = McpHub(parse_mcp_config(json.dumps(stdio_config("demo", "crashy"))), connect_timeout_s=20).start()
    yield h
    h.close()


@pytest.fixture
def session(qtbot, store, scripted_engine, wrap_engine, hub):
    c = Controller(store, wrap_engine(scripted_engine), "scripted")
    w = MainWindow(c)
    qtbot.addWidget(w)
    asked = []

    def ask(parent, server, tool, args):
        asked.append((server, tool, args))
        return "once"
    tools = ToolSession(c, hub, Approver(w, None, ask=ask), max_rounds=4, timeout_s=10)
    yield c, w, tools, asked
    c.shutdown()


def run_turn(qtbot, c, script, first: str, then: str, text: str) -> None:
    """Send text; the model writes `first` (a tool call), and `then` once it has the tool's result."""
    def after_first(index, reason):
        if reason == "tool_calls":
            script(then)
    c.answerFinished.connect(after_first)
    script(first)
    assert c.send(text)
    qtbot.waitUntil(lambda: not c.busy and c.messages[-1].role == "assistant" and len(c.messages) >= 4,
                    timeout=20_000)
    c.answerFinished.disconnect(after_first)


def test_a_tool_call_is_approved_run_and_answered(qtbot, session, script, scripted_engine):
    c, w, tools, asked = session
    sent = []
    chat = scripted_engine.chat

    def spy(messages, **kw):
        sent.append((messages, kw.get("tools")))
        return chat(messages, **kw)
    c.engine.chat = spy
    run_turn(qtbot, c, script, k2_call("weather_now", {"city": "Paris"}),
             "<think></think>Sunny, says the tool.<|im_end|>", "weather in Paris?")
    assert asked == [("demo", "weather_now", {"city": "Paris"})]
    assert [m.role for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[2].content == "demo: sunny in Paris" and c.messages[2].finish == ""
    assert c.messages[3].content == "Sunny, says the tool."
    names = [t["function"]["name"] for t in sent[0][1]]
    assert "weather_now" in names and "crashy_crash" in names         # the hub's tools were offered
    assert sent[1][0][-1] == {"role": "tool", "content": "demo: sunny in Paris",
                              "tool_call_id": "functions.weather_now:0"}
    cards = [card.title.text() for mw in w.chat.widgets for card in mw.cards]
    assert cards == ["Tool call · weather_now", "Tool result · functions.weather_now:0"]
    assert w.chat.widgets[3].content.toPlainText() == "Sunny, says the tool."


def test_a_server_that_crashes_mid_call_gives_an_error_card(qtbot, session, script):
    c, w, tools, asked = session
    run_turn(qtbot, c, script, k2_call("crashy_crash", {}), "<think></think>The tool failed.<|im_end|>", "crash it")
    tool = c.messages[2]
    assert tool.role == "tool" and tool.finish == "error"
    assert tool.content.startswith("Error: ") and "crashy" in tool.content
    card = w.chat.widgets[2].cards[0]
    assert card.property("error") == "true" and card.title.text().startswith("Tool error")
    assert c.messages[3].content == "The tool failed."


def test_a_denied_call_tells_the_model_and_stop_cancels_tools(qtbot, session, script):
    c, w, tools, asked = session
    tools.approve = lambda server, tool, args: "deny"
    run_turn(qtbot, c, script, k2_call("add", {"a": 1, "b": 2}), "<think></think>Fine, no tools.<|im_end|>", "add")
    assert c.messages[2].content == "Error: The user denied this tool call." and c.messages[2].finish == "error"
    assert c.messages[3].content == "Fine, no tools."
    assert w.send_button.text() == "Send"
    qtbot.mouseClick(w.send_button, Qt.LeftButton)                   # nothing typed: nothing happens
    assert len(c.messages) == 4
