"""Command-line options shared by the subcommands, each checked where argparse reads it.

A user's mistake is one line that names the flag, and exit status 2, before anything loads: the
value checks are argparse `type=` functions, and what needs the model's folder (a prompt id past the
vocabulary, an engine whose package is missing) is checked by `resolve_model` before the model
opens. Errors found later (a broken checkpoint) raise UsageError or ValueError, which cli.main turns
into the same one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

ENGINES = ("native", "llama.cpp", "remote")


class UsageError(Exception):
    """A mistake in how the command was called: cli.main prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind, what: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def int_at_least(lo: int):
    def parse(text: str) -> int:
        v = _number(text, int, f"an integer >= {lo}")
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"          # argparse names the type in some messages
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False):
    what = (f"a number {'>' if lo_open else '>='} {lo:g}" if hi is None else
            f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")

    def parse(text: str) -> float:
        v = _number(text, float, what)
        if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    parse.__name__ = what
    return parse


def cpu_count() -> int:
    """The cores numba may use: its own NUMBA_NUM_THREADS setting, else the CPUs this process may run on."""
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(text: str) -> int:
    n, top = _number(text, int, "an integer"), cpu_count()
    if not 1 <= n <= top:
        raise argparse.ArgumentTypeError(f"expected 1..{top} (the cores this machine has), got {n}")
    return n


def token_ids(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}")
    return [int(p) for p in parts]


def add_model_args(p: argparse.ArgumentParser, engines: bool = False) -> None:
    """--model / --demo, --threads, --expert-cache-gb (and --engine, --ctx where the command has engines)."""
    src = p.add_mutually_exclusive_group()
    what = ("a checkpoint folder (config.json, *.safetensors, tokenizer); with --engine llama.cpp a "
            ".gguf file; with --engine remote the endpoint's base URL, e.g. http://127.0.0.1:8000/v1"
            if engines else "a checkpoint folder (config.json, *.safetensors, tokenizer files)")
    src.add_argument("--model", metavar="PATH", help=what)
    src.add_argument("--demo", action="store_true",
                     help="the built-in demo model (a tiny random-weight K2 checkpoint, made on first use)")
    if engines:
        p.add_argument("--engine", choices=ENGINES, default="native",
                       help="native: this project's runtime (default); llama.cpp: a GGUF file through "
                            "llama-cpp-python; remote: an OpenAI-compatible endpoint")
        p.add_argument("--ctx", type=int_at_least(2), default=None, metavar="N",
                       help="context length in tokens (default: the model's)")
    p.add_argument("--threads", type=threads, default=None, metavar="N",
                   help="compute threads (default: the cores other processes leave free, checked before "
                        "every forward pass; small matrices always run on one)")
    p.add_argument("--expert-cache-gb", type=float_in(0.0), default=None, metavar="G",
                   help="RAM in GiB for the routed-expert cache (native engine); 0: no cache, the experts "
                        "are read through the OS page cache; default: chosen from the model's size and "
                        "the memory available")
    if engines:
        p.add_argument("--kv-ram-gb", type=float_in(0.0), default=None, metavar="G",
                       help="RAM in GiB for conversations' KV caches held at once (native engine; default: "
                            "twice a 32K-token context's)")
        p.add_argument("--kv-disk-gb", type=float_in(0.0), default=None, metavar="G",
                       help="disk in GiB for conversations' KV caches saved after each turn, so a restart "
                            "continues without recomputing the prompt (native engine; default 8; 0: none)")


def resolve_model(args, engine: str = "native") -> str | Path:
    """The model to open for `engine`: a URL for remote, a path otherwise; checked before loading."""
    if getattr(args, "demo", False):
        if engine != "native":
            raise UsageError(f"--demo runs on the native engine, not --engine {engine}")
        from kimi_desktop.demo import demo_model_path
        return demo_model_path()
    if not args.model:
        raise UsageError("give --model PATH or --demo")
    if engine == "remote":
        from kimi_desktop.engines.remote import normalize_base_url
        try:
            return normalize_base_url(args.model)
        except ValueError:
            raise UsageError(f"--model: --engine remote takes the endpoint's base URL, like "
                             f"http://127.0.0.1:8000/v1, got {args.model!r}") from None
    path = Path(args.model).expanduser()
    if engine == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            raise UsageError("--engine llama.cpp needs llama-cpp-python: pip install 'kimi-desktop[llama]'")
        if not path.is_file():
            raise UsageError(f"--model: {path}: no such .gguf file")
        return path
    if not path.is_dir():
        what = "is a file; the native engine takes a checkpoint folder" if path.exists() else "no such folder"
        raise UsageError(f"--model: {path}: {what}")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model: {path}: not a checkpoint folder (no config.json)")
    return path


def check_token_ids(ids: list[int], path: Path, flag: str = "--prompt-ids") -> None:
    """Every id inside the model's vocabulary (read from config.json; no weights are opened)."""
    from kimi_desktop.runtime.config import load_config

    vocab = load_config(path).vocab_size
    bad = [i for i in ids if i >= vocab]
    if bad:
        raise UsageError(f"{flag}: token id {bad[0]} is past the vocabulary (ids 0..{vocab - 1})")


def expert_cache_choice(args, path: Path):
    """--expert-cache-gb for the model at `path` (headers only): planner.ExpertCacheChoice, or the
    flag's one-line error when the size cannot be had."""
    from kimi_desktop.planner import choose_expert_cache

    try:
        return choose_expert_cache(path, args.expert_cache_gb, ctx=getattr(args, "ctx", None))
    except ValueError as e:
        raise UsageError(f"--expert-cache-gb: {e}") from None


def engine_options(args, path) -> dict:
    """open_engine keywords from the shared options (--ctx, --expert-cache-gb, --kv-ram-gb, --kv-disk-gb,
    --threads), checked."""
    opts: dict = {"ctx": args.ctx} if args.ctx else {}
    if args.expert_cache_gb is not None and args.engine != "native":
        raise UsageError(f"--expert-cache-gb is for the native engine, not --engine {args.engine}")
    for flag in ("kv_ram_gb", "kv_disk_gb"):
        value = getattr(args, flag, None)
        if value is not None and args.engine != "native":
            raise UsageError(f"--{flag.replace('_', '-')} is for the native engine, not --engine {args.engine}")
        if value is not None:
            opts[flag] = value
    if args.engine == "native":
        opts["expert_cache"] = expert_cache_choice(args, path)
    if args.engine == "llama.cpp" and args.threads:
        opts["threads"] = args.threads
    return opts


def say(message: str) -> None:
    """One line of progress for the person at the terminal (stderr, so stdout stays the output)."""
    print(message, file=sys.stderr, flush=True)
