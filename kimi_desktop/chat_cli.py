"""`kimi-desktop chat`: a terminal chat on any engine.

Reasoning is shown dimmed, tool calls as JSON (they are shown, not run). Ctrl+C stops the current
answer (the stream is cancelled) and returns to the prompt; /reset starts a new conversation, /exit
(or Ctrl+D) quits.

Wiring: cli.py calls `register(subparsers)` from build_parser().
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TextIO

from kimi_desktop.chat import ChatRequestError, ChatResult, ContentDelta, Finish, ReasoningDelta, Sampling
from kimi_desktop.cli_options import add_model_args, engine_options, float_in, int_at_least, resolve_model

DIM, BOLD, CYAN, RESET = "\x1b[2m", "\x1b[1m", "\x1b[36m", "\x1b[0m"
HELP = "commands: /reset (new conversation), /exit (quit); Ctrl+C stops an answer"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to cli.py's subparsers."""
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="Chat in the terminal. " + HELP + ".")
    add_model_args(p, engines=True)
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
    p.add_argument("--temperature", type=float_in(0.0), default=0.6, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0, metavar="P",
                   help="nucleus sampling probability mass (default 1: off)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, metavar="K",
                   help="sample among the K most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float_in(0.0, 1.0), default=0.0, metavar="P",
                   help="drop tokens below P times the top token's probability (default 0: off)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=1024, metavar="N",
                   help="most tokens per answer, reasoning included (default 1024)")
    p.add_argument("--seed", type=int_at_least(0), default=None, metavar="N", help="sampling seed (default: random)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the model's reasoning")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours")
    p.set_defaults(func=cmd_chat)
    return p


def cmd_chat(args) -> int:
    from kimi_desktop.engines import open_engine

    path = resolve_model(args, args.engine)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        max_tokens=args.max_tokens, seed=args.seed)
    sampling.validate()
    engine = open_engine(args.engine, path, **engine_options(args, path))
    color = sys.stdout.isatty() and not args.no_color
    try:
        print(f"kimi-desktop chat on {path}{' (demo: random weights, expect gibberish)' if args.demo else ''}")
        print(HELP)
        repl(engine, sampling, system=args.system, color=color, show_reasoning=not args.hide_reasoning)
    finally:
        engine.close()
    return 0


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def repl(engine, sampling: Sampling, system: str | None = None, color: bool = True, show_reasoning: bool = True,
         read: Callable[[str], str | None] = _read_line, out: TextIO | None = None) -> list[dict]:
    """The loop; returns the conversation. `read(prompt)` gives a line or None (end of input)."""
    out = out or sys.stdout
    c = (lambda code: code) if color else (lambda code: "")
    fresh = [{"role": "system", "content": system}] if system else []
    messages = list(fresh)
    while True:
        try:
            line = read(f"{c(BOLD)}> {c(RESET)}")
        except KeyboardInterrupt:
            out.write("\n(/exit to quit)\n")
            continue
        if line is None or line.strip() in ("/exit", "/quit"):
            out.write("\n" if line is None else "")
            return messages
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(fresh)
            out.write("(new conversation)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            stream = engine.chat(messages, sampling=sampling)
        except ChatRequestError as e:
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        result = show(stream, out, c, show_reasoning)
        msg = result.message()
        if result.finish_reason == "cancelled" and not (msg.get("content") or msg.get("tool_calls")):
            messages.pop()                 # stopped before any answer: forget the question too
        else:
            messages.append(msg)


def show(stream, out: TextIO, c, show_reasoning: bool = True) -> ChatResult:
    """Print a stream as it arrives; Ctrl+C cancels it (and keeps reading until it has ended)."""
    result = ChatResult()
    mode = None                          # what was printed last: "reasoning" | "content" | None

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    it = iter(stream)
    while True:
        try:
            ev = next(it)
        except StopIteration:
            break
        except KeyboardInterrupt:
            stream.cancel()
            continue
        try:
            result.add(ev)
            if isinstance(ev, ReasoningDelta):
                if show_reasoning:
                    if mode != "reasoning":
                        write(c(DIM))
                        mode = "reasoning"
                    write(ev.text)
            elif isinstance(ev, ContentDelta):
                if mode == "reasoning":
                    write(c(RESET) + "\n")
                mode = "content"
                write(ev.text)
            elif isinstance(ev, Finish):
                if mode == "reasoning":
                    write(c(RESET))
                if result.tool_calls:
                    write("\n" + c(CYAN))
                    for tc in result.tool_calls:
                        try:
                            args = json.loads(tc["arguments"]) if tc["arguments"] else {}
                        except ValueError:
                            args = tc["arguments"]
                        write(json.dumps({"id": tc["id"], "name": tc["name"], "arguments": args},
                                         ensure_ascii=False, indent=2) + "\n")
                    write(c(RESET) + c(DIM) + "(tool calls are shown, not run)" + c(RESET))
                u = result.usage
                tail = f"{u.completion_tokens} tokens, " if u else ""
                write(f"\n{c(DIM)}[{tail}finish: {ev.reason}]{c(RESET)}\n")
        except KeyboardInterrupt:
            stream.cancel()
    return result
