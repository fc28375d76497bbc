"""`kimi-desktop chat`: argument wiring and the REPL with scripted input."""

from __future__ import annotations

import argparse
import io

from kimi_desktop.chat import ChatStream, Finish, ReasoningDelta, Sampling, ToolCallDelta, Usage
from kimi_desktop.chat_cli import DIM, register, repl
from kimi_desktop.engines import open_engine


def script(*lines):
    it = iter(lines)
    return lambda prompt: next(it)


def test_register_adds_the_chat_subcommand():
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    a = ap.parse_args(["chat", "--demo", "--max-tokens", "7", "--temperature", "0"])
    assert a.command == "chat" and a.demo and a.max_tokens == 7 and callable(a.func)
    a = ap.parse_args(["chat", "--model", "/x", "--ctx", "512"])
    assert a.model == "/x" and a.ctx == 512


def test_repl_turns_reset_and_exit(tiny_int4):
    engine = open_engine("native", tiny_int4)
    out = io.StringIO()
    msgs = repl(engine, Sampling(temperature=0, max_tokens=5), read=script("Hi", "/reset", "Hello", "", "/exit"),
                out=out, color=True)
    engine.close()
    text = out.getvalue()
    assert "(new conversation)" in text and DIM in text and "finish: length" in text
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["content"] == "Hello"


def test_ctrl_c_cancels_the_answer_not_the_program(tiny_int4):
    engine = open_engine("native", tiny_int4)

    class Out(io.StringIO):
        fired = False

        def write(self, s):
            if not Out.fired and s and "\x1b" not in s and "finish" not in s:
                Out.fired = True
                raise KeyboardInterrupt
            return super().write(s)
    out = Out()
    lines = ["Hi", "/help", None]
    msgs = repl(engine, Sampling(temperature=0, max_tokens=500), read=lambda p: lines.pop(0), out=out,
                color=False)
    engine.close()
    text = out.getvalue()
    assert "finish: cancelled" in text
    assert not lines and "/reset" in text.split("finish: cancelled")[1]      # the loop went on
    assert msgs == []                    # stopped before any answer: the question is forgotten


def test_tool_calls_are_printed_as_json():
    class FakeEngine:
        def chat(self, messages, tools=None, tool_choice="auto", sampling=None):
            s = ChatStream()
            for ev in (ReasoningDelta("hmm"), ToolCallDelta(0, "functions.add:0", "add", ""),
                       ToolCallDelta(0, None, None, '{"a":1}'), Usage(3, 4, 0), Finish("tool_calls")):
                s.put(ev)
            s.close()
            return s
    out = io.StringIO()
    msgs = repl(FakeEngine(), Sampling(), read=script("add", None), out=out, color=False)
    text = out.getvalue()
    assert '"name": "add"' in text and '"a": 1' in text and "finish: tool_calls" in text
    assert msgs[-1]["tool_calls"][0]["function"]["arguments"] == '{"a":1}'
