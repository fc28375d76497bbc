"""Checkpoints with real headers and no data: what the planner needs of a model too large to write.

    python -m kimi_desktop.sparse_model OUT [--preset k2-full] [--shards 62]

Writes config.json, the index and shards whose safetensors headers are exactly those of a
checkpoint in the official layout (make-test-model's tensor list), each file extended to its full
size as a sparse file (nothing but the headers is written: the full K2-Thinking config, 1T
parameters, is ~594 GB of files and ~30 MB on disk). Reading tensor data from it gives zeros.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kimi_desktop.offload.safetensors import INDEX_NAME, _check_specs, _header_bytes, _split
from kimi_desktop.testmodel import build_specs, make_config

# Kimi-K2-Thinking: 61 layers (layer 0 dense, 1..60 MoE with 384 routed experts), INT4 routed experts
SPARSE_PRESETS = {"k2-full": dict(preset="k2-slice", layout="int4", moe_layers=60),
                  "k2-slice": dict(preset="k2-slice", layout="int4", moe_layers=1)}


def write_sparse_checkpoint(folder: str | os.PathLike, cfg: dict, layout: str, shards: int = 1) -> Path:
    """config.json + index + shards with headers only (sparse files of the full size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = build_specs(cfg, layout, seed=0, routing_skew=0.0, fast_experts=True)   # make() is never called
    _check_specs(specs, folder)
    bounds = _split([s.nbytes for s in specs], shards)
    weight_map = {}
    for k in range(shards):
        part = specs[bounds[k]:bounds[k + 1]]
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header = _header_bytes(part, None)
        with open(folder / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in part))       # a hole: no data blocks
        weight_map.update((s.name, name) for s in part)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return folder


def make_sparse_model(out: str | os.PathLike, preset: str = "k2-full", shards: int = 62) -> Path:
    if preset not in SPARSE_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(SPARSE_PRESETS)}, got {preset!r}")
    kw = SPARSE_PRESETS[preset]
    cfg = make_config(kw["preset"], kw["layout"], kw["moe_layers"], 1, 1)
    return write_sparse_checkpoint(out, cfg, kw["layout"], shards)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_desktop.sparse_model", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=tuple(SPARSE_PRESETS), default="k2-full")
    ap.add_argument("--shards", type=int, default=62)
    args = ap.parse_args(argv)
    print(make_sparse_model(args.out, args.preset, args.shards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
