"""A plain read stream in numba (all threads): the DRAM ceiling the parallel kernels can reach.

Shape legend: a float32 [n] (n a multiple of 16 * 512 for the vector body; the rest is summed too).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import FM
from ._simd import fadd, hsum, load_f32, zeros_f32


def stream_read_ref(a):
    return float(np.sum(a, dtype=np.float64))


@njit(fastmath=FM, cache=True)
def _sum_range(a, lo, hi):
    s0 = zeros_f32(); s1 = zeros_f32(); s2 = zeros_f32(); s3 = zeros_f32()
    nv = lo + (hi - lo) // 64 * 64
    for i in range(lo, nv, 64):
        s0 = fadd(s0, load_f32(a, i)); s1 = fadd(s1, load_f32(a, i + 16))
        s2 = fadd(s2, load_f32(a, i + 32)); s3 = fadd(s3, load_f32(a, i + 48))
    s = np.float64(hsum(fadd(fadd(s0, s1), fadd(s2, s3))))
    for i in range(nv, hi):
        s += a[i]
    return s


@njit(parallel=True, nogil=True, cache=True)
def _stream(a, nblk):
    n = a.shape[0]
    per = (n + nblk - 1) // nblk
    part = np.zeros(nblk, np.float64)
    for b in prange(nblk):
        part[b] = _sum_range(a, b * per, min(n, (b + 1) * per))
    return part.sum()


def stream_read(a: np.ndarray) -> float:
    """Sum of a float32 array read by all kernel threads (for bandwidth measurement)."""
    return float(_stream(np.ascontiguousarray(a, np.float32).reshape(-1), 256))
