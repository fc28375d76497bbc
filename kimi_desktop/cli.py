"""The `kimi-desktop` command line: one console script, a subcommand per job."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from kimi_desktop import __version__
from kimi_desktop.cli_options import (Parser, UsageError, add_model_args, check_token_ids, expert_cache_choice,
                                      float_in, int_at_least, resolve_model, token_ids)
from kimi_desktop.notices import show_on_stderr


def cmd_generate(args) -> int:
    from kimi_desktop.notices import log, warm_up
    from kimi_desktop.runtime import load_model

    path = resolve_model(args)
    if args.prompt_ids is not None:
        check_token_ids(args.prompt_ids, path)
    cache = expert_cache_choice(args, path)
    log.info(cache.line())
    model = load_model(path, expert_cache_bytes=cache.budget_bytes, direct_io=cache.direct_io)
    warm_up(model)
    tok = None
    if args.prompt is not None:
        from kimi_desktop.runtime import load_tokenizer
        tok = load_tokenizer(path)
        ids = tok.encode(args.prompt)
    else:
        ids = args.prompt_ids
    out = []
    for t in model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed):
        out.append(t)
        if tok is None:
            print(t, end=" ", flush=True)
    if tok is None:
        print()
    else:
        print(tok.decode(out))
    return 0


def cmd_make_test_model(args) -> int:
    from kimi_desktop.testmodel import make_test_model

    out = make_test_model(args.out, preset=args.preset, layout=args.layout, shards=args.shards,
                          n_group=args.n_group, topk_group=args.topk_group, moe_layers=args.moe_layers,
                          routing_skew=args.routing_skew, seed=args.seed, flavor=args.flavor)
    print(out)
    return 0


def cmd_cache_clear(args) -> int:
    from kimi_desktop.kv_store import clear_kv_cache, default_kv_dir

    folder = args.kv_dir or default_kv_dir()
    freed = clear_kv_cache(folder)
    print(f"freed {freed} bytes ({freed / 2**20:.1f} MiB) of saved conversation KV cache in {folder}")
    return 0


def register_cache(sub) -> None:
    """`cache clear`: the saved conversation KV files (kv_store.py)."""
    c = sub.add_parser("cache", help="manage the saved conversation KV cache",
                       description="The latent KV cache of finished turns, kept on disk so a restart continues "
                                   "a conversation without recomputing its prompt.")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cc = csub.add_parser("clear", help="delete every saved KV file", description="Delete every saved KV file.")
    cc.add_argument("--kv-dir", default=None, metavar="DIR", help="the KV folder (default: the user cache's)")
    cc.set_defaults(func=cmd_cache_clear)


APP_MISSING = "the desktop app needs {what}: pip install 'kimi-desktop[app]'"


def open_app(demo: bool) -> int:
    """The desktop window (ui/ is imported only here: the rest of the CLI works without Qt)."""
    for module, what in (("PySide6.QtWidgets", "PySide6"), ("markdown_it", "markdown-it-py"),
                         ("pygments", "Pygments"), ("mcp", "the mcp SDK")):
        try:
            found = importlib.util.find_spec(module) is not None     # without importing it (startup time)
        except (ImportError, ValueError):
            found = False
        if not found:
            print(f"error: {APP_MISSING.format(what=what)}", file=sys.stderr)
            return 2
    show_on_stderr()
    from kimi_desktop.ui.app import run
    return run(demo=demo)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="kimi-desktop", description="Run Kimi K2 offline on one workstation.",
                epilog="Without a command, kimi-desktop opens the desktop app.")
    ap.add_argument("--version", action="version", version=f"kimi-desktop {__version__}")
    ap.add_argument("--demo", action="store_true", help="open the app on the built-in demo model")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate tokens from a prompt (no chat template)",
                       description="Generate from a raw prompt, without the chat template: prints the new "
                                   "token ids (--prompt-ids) or the decoded text (--prompt).")
    add_model_args(g)
    pr = g.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    pr.add_argument("--prompt-ids", type=token_ids, metavar="IDS",
                    help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=16, metavar="N",
                   help="stop after N new tokens (or at the model's end token); default 16")
    g.add_argument("--temperature", type=float_in(0.0), default=0.0, metavar="T",
                   help="sampling temperature; 0 (the default) is greedy")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this probability mass; default 1")
    g.add_argument("--seed", type=int_at_least(0), default=None, metavar="N", help="sampling seed (default: random)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("make-test-model", help="write a random checkpoint in the official K2 layouts",
                       description="Write a complete checkpoint folder with random weights in an official "
                                   "K2 layout (config, safetensors shards + index, tokenizer, chat template).")
    m.add_argument("out", help="output folder (must not exist or be empty)")
    m.add_argument("--preset", choices=("tiny", "k2-slice"), default="tiny",
                   help="tiny: a few MB for tests; k2-slice: Kimi K2's exact dimensions, few layers (~15 GB)")
    m.add_argument("--layout", choices=("int4", "fp8", "bf16"), default="int4",
                   help="int4: K2-Thinking's INT4 routed experts; fp8: K2-Instruct's FP8 blocks; bf16: plain")
    m.add_argument("--shards", type=int_at_least(1), default=2, metavar="N", help="safetensors files (default 2)")
    m.add_argument("--n-group", type=int_at_least(1), default=1, metavar="G",
                   help="router expert groups (K2: 1)")
    m.add_argument("--topk-group", type=int_at_least(1), default=1, metavar="K",
                   help="groups each token may route to (K2: 1)")
    m.add_argument("--moe-layers", type=int_at_least(0), default=None, metavar="N",
                   help="MoE layers after the dense one (default: the preset's)")
    m.add_argument("--routing-skew", type=float_in(0.0), default=0.0, metavar="S",
                   help="Zipf-like expert popularity written into e_score_correction_bias (default 0)")
    m.add_argument("--seed", type=int_at_least(0), default=0, metavar="N", help="weights seed (default 0)")
    m.add_argument("--flavor", choices=("thinking", "instruct"), default="thinking",
                   help="chat template and end tokens of K2-Thinking or K2-Instruct")
    m.set_defaults(func=cmd_make_test_model)

    register_cache(sub)
    from kimi_desktop.chat_cli import register as register_chat
    from kimi_desktop.gguf_export import register as register_export_gguf
    from kimi_desktop.offload.prepare import register as register_prepare
    register_chat(sub)
    register_export_gguf(sub)
    register_prepare(sub)
    from kimi_desktop.bench.run import register as register_bench
    register_bench(sub)
    from kimi_desktop.plan_cli import register as register_plan
    register_plan(sub)
    from kimi_desktop.serve_cli import register as register_serve
    register_serve(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        return open_app(args.demo)
    show_on_stderr()
    try:
        if getattr(args, "threads", None):
            from kimi_desktop.runtime.kernels import set_threads
            set_threads(args.threads)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        # a user's mistake (bad flag value, broken or missing model): one clear line, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory (a smaller --expert-cache-gb or --ctx leaves more)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
