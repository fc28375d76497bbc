"""Make every kernel the model calls ready before the first request.

numba compiles (or loads from its on-disk cache) one specialization per argument type on first call,
and read-only arrays are a different type from writable ones. The first forward pass would pay
~5-15 ms per specialization plus ~0.1 s to start the thread pool (measured here: ~0.3 s of a
1.3 s 64-token prefill on the k2-slice). `warmup()` pays it at load time instead, on tiny inputs of
the exact types the model passes: float32 activations, uint16 (bf16) / int32 + uint16 (INT4) /
uint8 + float32 (FP8) weights, each writable and read-only, through every path (GEMV, small-T GEMM,
tiled GEMM, absorbed decode and chunk attention over an fp32 or bf16 latent cache, prefill
attention).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ._launch import policy
from .absorb import absorb_out, absorb_q
from .bf16 import bf16_gemm, bf16_gemv
from .fp8 import fp8_gemm, fp8_gemv
from .int4 import DIRECT_T_MAX, int4_gemm, int4_gemv
from .mla import mla_decode_absorbed
from .mla_chunk import mla_absorbed_chunk
from .mla_prefill import mla_prefill

__all__ = ["warmup", "FORMATS"]


def _both(*arrays):
    """(writable arrays, read-only copies of them)."""
    ro = []
    for a in arrays:
        b = a.copy()
        b.flags.writeable = False
        ro.append(b)
    return [tuple(arrays), tuple(ro)]


FORMATS = ("bf16", "int4", "fp8")


def warmup(formats=FORMATS) -> float:
    """Run the weight-product kernels of these weight formats and the attention kernels once on
    tiny inputs; returns the seconds it took (a first run compiles: ~10 s per format here)."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats: unknown {sorted(unknown)} (known: {', '.join(FORMATS)})")
    t0 = time.perf_counter()
    for min_work in (0, math.inf):              # each kernel's parallel and serial twin (_launch.py)
        with policy.forced(min_work):
            _run_all(formats)
    return time.perf_counter() - t0


def _run_all(formats) -> None:
    rng = np.random.default_rng(0)
    out, n = 8, 64
    x = rng.standard_normal(n).astype(np.float32)
    xs = [rng.standard_normal((T, n)).astype(np.float32) for T in (2, DIRECT_T_MAX + 1)]
    bf = rng.integers(0, 1 << 14, (out, n)).astype(np.uint16)
    packed = rng.integers(-(1 << 31), 1 << 31, (out, n // 8)).astype(np.int32)
    scale = np.full((out, n // 32), 0x3C00, np.uint16)
    fp8 = rng.integers(0, 120, (out, n)).astype(np.uint8)
    fp8_s = np.ones((1, 1), np.float32)
    for (w,) in _both(bf):                      # bf16 also backs the absorbed attention below
        bf16_gemv(w, x)
        for X in xs:
            bf16_gemm(w, X)
    for p, s in _both(packed, scale) if "int4" in formats else ():
        int4_gemv(p, s, x)
        for X in xs:
            int4_gemm(p, s, X)
    for w, s in _both(fp8, fp8_s) if "fp8" in formats else ():
        fp8_gemv(w, s, x)
        fp8_gemm(w, s, xs[0])
    # attention: H heads, R latent, P rope, C nope, V value dims (small, but the same types)
    H, R, P, C, V, N = 4, 32, 16, 16, 16, 3
    kv, pe = rng.standard_normal((N, R)).astype(np.float32), rng.standard_normal((N, P)).astype(np.float32)
    bf16 = [(a.view(np.uint32) >> 16).astype(np.uint16) for a in (kv, pe)]       # truncated: any bits do
    q, qp = rng.standard_normal((2, H, R)).astype(np.float32), rng.standard_normal((2, H, P)).astype(np.float32)
    for a, b in _both(kv, pe) + _both(*bf16):   # the latent cache: fp32 or bf16 bits, live or restored
        mla_decode_absorbed(q[0], qp[0], a, b, 0.1)
        mla_absorbed_chunk(q, qp, a, b, N - 2, 0.1)
    mla_prefill(rng.standard_normal((N, H, C + P)).astype(np.float32),
                rng.standard_normal((N, H, C + V)).astype(np.float32), pe, 0, 0.1, C)
    for (kvb,) in _both(rng.integers(0, 1 << 14, (H * (C + V), R)).astype(np.uint16)):
        absorb_q(kvb, rng.standard_normal((H, C)).astype(np.float32), C, V)
        absorb_out(kvb, rng.standard_normal((H, R)).astype(np.float32), C, V)
