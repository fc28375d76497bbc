"""Expert-store read throughput: page cache vs O_DIRECT vs portable reads vs the expert pack.

    python -m kimi_desktop.bench.store --dir DIR [--gb 2] [--keep]

Writes a checkpoint of K2-shaped INT4 experts with random bytes into DIR (on the disk to measure),
then reads every expert once per configuration through an ExpertStore (get_many per layer) and
prints wall-clock GB/s; "cold" runs drop the files from the page cache first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from kimi_desktop.offload.experts import MODULES, PAGE, ExpertStore
from kimi_desktop.offload.prepare import prepare_checkpoint
from kimi_desktop.offload.safetensors import DTYPES, TensorSpec, write_checkpoint

HIDDEN, INTER, GROUP = 7168, 2048, 32          # Kimi K2's expert shapes, INT4 group 32

RUNS = [                                        # (name, cold, store options)
    ("pread, page cache, cold", True, dict(io_threads=8)),
    ("pread, page cache, warm", False, dict(io_threads=8)),
    ("pread, page cache, warm, 2 thr", False, dict(io_threads=2)),
    ("portable, page cache, warm", False, dict(io_threads=8, reads="portable")),
    ("O_DIRECT, 1 thread", True, dict(io_threads=1, direct_io=True)),
    ("O_DIRECT, 4 threads", True, dict(io_threads=4, direct_io=True)),
    ("O_DIRECT, 8 threads", True, dict(io_threads=8, direct_io=True)),
    ("O_DIRECT, 16 threads", True, dict(io_threads=16, direct_io=True)),
    ("none (mmap faults), cold", True, dict(policy="none")),
    ("none (mmap faults), warm", False, dict(policy="none")),
]
PACK_RUNS = [
    ("pack, O_DIRECT, 8 threads", True, dict(io_threads=8, direct_io=True)),
    ("pack, pread, cold", True, dict(io_threads=8)),
    ("pack, pread, warm", False, dict(io_threads=8)),
    ("pack, pread, warm, 2 thr", False, dict(io_threads=2)),
]


def _expert_specs(layer: int, e: int, rng) -> list[TensorSpec]:
    specs = []
    for m in MODULES:
        o, i = (HIDDEN, INTER) if m == "down_proj" else (INTER, HIDDEN)
        p = f"model.layers.{layer}.mlp.experts.{e}.{m}"
        specs += [
            TensorSpec(p + ".weight_packed", "I32", (o, i // 8),
                       lambda o=o, i=i: np.frombuffer(rng.bytes(o * i // 2), np.int32).reshape(o, i // 8)),
            TensorSpec(p + ".weight_scale", "BF16", (o, i // GROUP),
                       lambda o=o, i=i: np.full((o, i // GROUP), 0.01, DTYPES["BF16"])),
            TensorSpec(p + ".weight_shape", "I64", (2,), lambda o=o, i=i: np.array([o, i], np.int64))]
    return specs


def make_checkpoint(folder: Path, gb: float, seed: int = 0) -> Path:
    """A checkpoint of K2-shaped INT4 experts with random bytes (2 MoE layers), ~gb GB."""
    per_expert = 3 * (INTER * HIDDEN // 2 + INTER * HIDDEN // GROUP * 2)
    n = max(2, int(gb * 1e9 / per_expert) // 2 * 2)
    rng = np.random.default_rng(seed)
    specs = [s for layer in (1, 2) for e in range(n // 2) for s in _expert_specs(layer, e, rng)]
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, specs, shards=max(1, int(gb // 1)))
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP,
               "dynamic": False, "actorder": None, "block_structure": None}
    cfg = {"num_hidden_layers": 3, "hidden_size": HIDDEN, "moe_intermediate_size": INTER,
           "n_routed_experts": n // 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "quantization_config": {
               "quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed", "kv_cache_scheme": None,
               "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                             "output_activations": None, "weights": weights}},
               "ignore": []}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def drop_cache(paths) -> None:
    """Evict the files from the page cache (Linux; elsewhere the cold runs are warm)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(store) -> int:
    """Every expert once; mmap views (mode none) touch one byte per page (the faults)."""
    n_bytes = 0
    for layer in store.geom.layers:
        ids = range(store.geom.n_experts[layer])
        if store.mode == "none":
            for e in ids:
                for lin in store.get(layer, e):
                    for a in (lin.packed, lin.scale):
                        int(a.reshape(-1).view(np.uint8)[::PAGE].sum())
                    n_bytes += lin.nbytes
            continue
        for _, triple in store.get_many(layer, ids):
            n_bytes += sum(lin.nbytes for lin in triple)
            del triple
    return n_bytes


def bench_pass(folder: Path, cold: bool, **kw) -> dict:
    """Read every expert once through a store; wall-clock GB/s.

    A first, unmeasured pass faults in the slot pool (a long-running store reuses its slots);
    the measured pass then misses on every expert again (LRU over a cycle longer than the pool).
    """
    store = ExpertStore.open(folder, **kw)
    try:
        if store.mode == "slots":
            _read_all(store)
        if cold:
            drop_cache([f.path for f in store.files])
        store.reset_stats()
        t0 = time.perf_counter()
        n_bytes = _read_all(store)
        dt = time.perf_counter() - t0
        s = store.stats()
        return {"GB": round(n_bytes / 1e9, 3), "s": round(dt, 3), "GB/s": round(n_bytes / dt / 1e9, 2),
                "store_read_GB/s": round(s["read_gbps"], 2), "hits": s["hits"], "direct_io": s["direct_io"],
                "note": s["direct_io_note"] or s["pack_note"]}
    finally:
        store.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_desktop.bench.store",
                                 description="expert-store read throughput: page cache vs O_DIRECT")
    ap.add_argument("--dir", required=True, help="scratch folder on the disk to measure (created, then deleted)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    try:
        t0 = time.perf_counter()
        folder = make_checkpoint(root / "ckpt", a.gb)
        print(f"wrote fake experts in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, cold, kw in RUNS:
            print(f"{name:34s} {bench_pass(folder, cold, n_slots=16, pack='off', **kw)}", flush=True)
        t0 = time.perf_counter()
        prepare_checkpoint(folder)
        print(f"prepare (pack) in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, cold, kw in PACK_RUNS:
            print(f"{name:34s} {bench_pass(folder, cold, n_slots=16, **kw)}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
