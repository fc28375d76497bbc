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
from pathlib import Path
from typing import Callable, TextIO

from kimi_desktop.chat import ChatRequestError, ChatResult, ContentDelta, Finish, ReasoningDelta, Sampling

DIM, BOLD, CYAN, RESET = "\x1b[2m", "\x1b[1m", "\x1b[36m", "\x1b[0m"
HELP = "commands: /reset (new conversation), /exit (quit); Ctrl+C stops an answer"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to cli.py's subparsers."""
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="Chat in the terminal. " + HELP + ".")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="checkpoint folder (config.json, safetensors, tokenizer)")
    src.add_argument("--demo", action="store_true", help="use the built-in tiny demo model (random weights)")
    p.add_argument("--engine", choices=("native", "llama.cpp", "remote"), default="native")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--expert-cache-gb", type=float, default=None,
                   help="RAM for a routed-expert cache read with preadv (default: none, the OS page cache)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=1024, help="per answer")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the model's reasoning")
    p.add_argument("--no-color", action="store_true", help="no ANSI colours")
    p.set_defaults(func=cmd_chat)
    return p


def cmd_chat(args) -> int:
    from kimi_desktop.engines import open_engine

    if args.demo:
        from kimi_desktop.demo import demo_model_path
        path = demo_model_path()
    elif args.model:
        path = Path(args.model)
    else:
        raise SystemExit("error: give --model PATH or --demo")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                        max_tokens=args.max_tokens, seed=args.seed)
    sampling.validate()
    opts = {"ctx": args.ctx} if args.ctx else {}
    if args.engine == "native" and args.expert_cache_gb is not None:
        opts["expert_cache_bytes"] = int(args.expert_cache_gb * (1 << 30))
    if args.engine == "llama.cpp" and args.threads:
        opts["threads"] = args.threads
    engine = open_engine(args.engine, path, **opts)
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
