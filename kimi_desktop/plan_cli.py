"""`kimi-desktop plan MODEL`: what goes where in memory and on disk, before anything loads.

Wiring: cli.py calls `register(subparsers)` from build_parser().
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kimi_desktop.cli_options import UsageError, float_in, int_at_least


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to cli.py's subparsers."""
    p = subparsers.add_parser(
        "plan", help="show what goes where (RAM, expert cache, KV cache, disk reads) before loading",
        description="From config.json and the safetensors headers only (no tensor data is read): the "
                    "resident weights, the expert cache the native engine would choose, the KV cache, "
                    "and the expert bytes read from disk per token.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint folder")
    p.add_argument("--demo", action="store_true", help="plan the built-in tiny demo model")
    p.add_argument("--ram-gb", type=float_in(0, lo_open=True), default=None, metavar="G",
                   help="plan for a machine with this much RAM in GiB (default: what is available now)")
    p.add_argument("--ctx", type=int_at_least(2), default=None, metavar="N",
                   help="context tokens to keep KV cache for (default: the model's, at most 32768)")
    p.add_argument("--expert-cache-gb", type=float_in(0.0), default=None, metavar="G",
                   help="plan this expert cache size instead of the engine's own choice (0: the OS page cache)")
    p.add_argument("--disk-gbps", type=float_in(0, lo_open=True), default=None, metavar="G",
                   help="the disk's read speed in GB/s, for the 'disk slower than needed' check")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from kimi_desktop.planner import format_plan, plan_model

    # ValueError: cli.main prints "error: ..." and exits 2 (a user mistake)
    if args.demo == bool(args.model):
        raise ValueError("give MODEL or --demo, not both" if args.demo else "give MODEL or --demo")
    if args.demo:
        from kimi_desktop.demo import demo_model_path
        path = demo_model_path()
    else:
        path = Path(args.model)
        if not path.is_dir():
            raise ValueError(f"MODEL: {path} is not a checkpoint folder")
    ram = None if args.ram_gb is None else int(args.ram_gb * (1 << 30))
    try:
        plan = plan_model(path, ram_bytes=ram, ctx=args.ctx, requested_gb=args.expert_cache_gb,
                          disk_gbps=args.disk_gbps)
    except ValueError as e:
        if args.expert_cache_gb is None:
            raise
        raise UsageError(f"--expert-cache-gb: {e}") from None
    print(format_plan(plan))
    return 0
