"""The `kimi-desktop` command line: one console script, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kimi_desktop import __version__


def _model_path(args) -> Path:
    if getattr(args, "demo", False):
        from kimi_desktop.demo import demo_model_path
        return demo_model_path()
    if not args.model:
        raise SystemExit("error: give --model PATH or --demo")
    return Path(args.model)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="checkpoint folder (config.json, safetensors, tokenizer)")
    src.add_argument("--demo", action="store_true", help="use the built-in tiny demo model (made on first use)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--expert-cache-gb", type=float, default=None,
                   help="RAM for a routed-expert cache read with preadv (default: none, the OS page cache)")


def cmd_generate(args) -> int:
    from kimi_desktop.runtime import load_model

    path = _model_path(args)
    budget = None if args.expert_cache_gb is None else int(args.expert_cache_gb * (1 << 30))
    model = load_model(path, expert_cache_bytes=budget)
    model.warmup()
    tok = None
    if args.prompt is not None:
        from kimi_desktop.runtime import load_tokenizer
        tok = load_tokenizer(path)
        ids = tok.encode(args.prompt)
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"error: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kimi-desktop",
                                 description="Run Kimi K2 offline on one workstation.")
    ap.add_argument("--version", action="version", version=f"kimi-desktop {__version__}")
    ap.add_argument("--demo", action="store_true", help="open the app on the built-in demo model")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate tokens from a prompt (no chat template)")
    _add_model_args(g)
    pr = g.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    pr.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("make-test-model", help="write a random checkpoint in the official K2 layouts")
    m.add_argument("out", help="output folder (must not exist or be empty)")
    m.add_argument("--preset", choices=("tiny", "k2-slice"), default="tiny")
    m.add_argument("--layout", choices=("int4", "fp8", "bf16"), default="int4")
    m.add_argument("--shards", type=int, default=2)
    m.add_argument("--n-group", type=int, default=1)
    m.add_argument("--topk-group", type=int, default=1)
    m.add_argument("--moe-layers", type=int, default=None)
    m.add_argument("--routing-skew", type=float, default=0.0,
                   help="Zipf-like expert popularity written into e_score_correction_bias")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--flavor", choices=("thinking", "instruct"), default="thinking")
    m.set_defaults(func=cmd_make_test_model)

    from kimi_desktop.chat_cli import register as register_chat
    from kimi_desktop.gguf_export import register as register_export_gguf
    from kimi_desktop.offload.prepare import register as register_prepare
    register_chat(sub)
    register_export_gguf(sub)
    register_prepare(sub)
    from kimi_desktop.bench.run import register as register_bench
    register_bench(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        from kimi_desktop.runtime.kernels import set_threads
        set_threads(args.threads)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # bad input: a clear message, never a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
