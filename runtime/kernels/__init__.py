"""Numba CPU kernels for the native engine.

Every kernel has a plain-numpy reference (`*_ref`) next to it and a launcher that checks shapes,
dtypes and contiguity and allocates the output; the model calls only the launchers:

    int4_gemv(packed, scale, x)              -> y [out]       INT4 group-32 (stored layout)
    int4_gemm(packed, scale, X)              -> Y [T, out]
    bf16_gemv(w, x) / bf16_gemm(w, X)        -> y [out] / Y [T, out]
    fp8_gemv(w, scale_inv, x, block=(128, 128)) / fp8_gemm(w, scale_inv, X, block)
    mla_decode_absorbed(q_lat, q_pe, kv_cache, pe_cache, scale) -> o_lat [H, R]   cache f32 or bf16 bits
    mla_absorbed_chunk(q_lat, q_pe, kv, pe, start, scale) -> o_lat [T, H, R]  causal chunk, same cache
    mla_prefill(q, kvb, pe, start, scale, C)  -> out [T, H, V]   causal, latent expanded by kv_b
    absorb_q(kv_b, q_nope, C, V)             -> q_lat [H, R]  W_UK into the query (bf16 kv_b)
    absorb_out(kv_b, o_lat, C, V)            -> o [H, V]      W_UV out of latent space

warmup() runs each of them once on tiny inputs, so numba's compile / cache load happens at load time,
not in the first request. Threads: set_threads(n) fixes the count; by default (set_threads(None))
each forward pass uses the cores the rest of the machine leaves free, and work too small to pay a
parallel launch runs serially (the same bits): _launch.py. Measurements: microbench.py.
"""
from __future__ import annotations

import numba

from ._launch import policy
from .absorb import absorb_out, absorb_out_ref, absorb_q, absorb_q_ref
from .bf16 import bf16_gemm, bf16_gemm_ref, bf16_gemv, bf16_gemv_ref
from .fp8 import FP8_E4M3_LUT, fp8_gemm, fp8_gemm_ref, fp8_gemv, fp8_gemv_ref
from .int4 import int4_gemm, int4_gemm_ref, int4_gemv, int4_gemv_ref
from .mla import mla_decode_absorbed, mla_decode_absorbed_ref
from .mla_chunk import mla_absorbed_chunk, mla_absorbed_chunk_ref
from .mla_prefill import mla_prefill, mla_prefill_ref
from .warmup import warmup

__all__ = [
    "set_threads", "get_threads", "policy", "warmup",
    "int4_gemv", "int4_gemm", "int4_gemv_ref", "int4_gemm_ref",
    "bf16_gemv", "bf16_gemm", "bf16_gemv_ref", "bf16_gemm_ref",
    "fp8_gemv", "fp8_gemm", "fp8_gemv_ref", "fp8_gemm_ref", "FP8_E4M3_LUT",
    "mla_decode_absorbed", "mla_decode_absorbed_ref", "mla_absorbed_chunk", "mla_absorbed_chunk_ref",
    "mla_prefill", "mla_prefill_ref", "absorb_q", "absorb_q_ref", "absorb_out", "absorb_out_ref",
]


def set_threads(n: int | None = None) -> int:
    """Threads for the numba kernels: n fixed, or None / 0: as many as there are free cores at each
    forward pass (all cores on an idle machine). Returns the number in use now."""
    top = numba.config.NUMBA_NUM_THREADS
    if n and not 1 <= int(n) <= top:
        raise ValueError(f"threads: expected 1..{top}, got {n}")
    policy.fixed_threads = int(n) if n else None
    return policy.before_forward()


def get_threads() -> int:
    return numba.get_num_threads()
