"""Shared GEMM micro-kernel for the dequantize-a-tile GEMMs (int4 / bf16 / fp8 with T > 1 tokens).

A format-specific decoder writes a tile of 4 weight rows x K values (float32, exact W values) into a
small L1-resident buffer; `mk4x4` then multiplies it with the matching chunk of every token's
(permuted, zero-padded) activations, 4 tokens x 4 rows at a time, 16 register accumulators.
Accumulators persist across chunks in `acc`, hsum'ed once at the end. `tiled_gemm`, the one driver
(inlined into each format's parallel kernel), gives each parallel task RB row blocks and walks them
chunk-major (row_blocks_per_task), so that large activations are read from L2, not L3, by every block.

Shape legend: K = values per tile row (multiple of 16), Tp = tokens padded to a multiple of 4,
xp = activations flat [Tp * xstride] with this chunk at offset xoff, acc = flat [Tp * 4 * 16].
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._common import FM
from ._simd import fadd, fma, hsum, load_f32, store_f32, zeros_f32

TILE_K = 512  # values per tile row: 4 rows x 512 x 4 B = 8 KB (L1)


@njit(fastmath=FM, cache=True)
def _acc_add(acc, i, v):
    store_f32(acc, i, fadd(load_f32(acc, i), v))


@njit(fastmath=FM, cache=True)
def mk4x4(tile, K, xp, xstride, xoff, Tp, acc):
    K2, K3 = 2 * K, 3 * K
    for t in range(0, Tp, 4):
        c00 = zeros_f32(); c01 = zeros_f32(); c02 = zeros_f32(); c03 = zeros_f32()
        c10 = zeros_f32(); c11 = zeros_f32(); c12 = zeros_f32(); c13 = zeros_f32()
        c20 = zeros_f32(); c21 = zeros_f32(); c22 = zeros_f32(); c23 = zeros_f32()
        c30 = zeros_f32(); c31 = zeros_f32(); c32 = zeros_f32(); c33 = zeros_f32()
        b0 = t * xstride + xoff
        b1 = b0 + xstride
        b2 = b1 + xstride
        b3 = b2 + xstride
        for k in range(0, K, 16):
            w0 = load_f32(tile, k)
            w1 = load_f32(tile, K + k)
            w2 = load_f32(tile, K2 + k)
            w3 = load_f32(tile, K3 + k)
            x = load_f32(xp, b0 + k)
            c00 = fma(w0, x, c00); c01 = fma(w1, x, c01); c02 = fma(w2, x, c02); c03 = fma(w3, x, c03)
            x = load_f32(xp, b1 + k)
            c10 = fma(w0, x, c10); c11 = fma(w1, x, c11); c12 = fma(w2, x, c12); c13 = fma(w3, x, c13)
            x = load_f32(xp, b2 + k)
            c20 = fma(w0, x, c20); c21 = fma(w1, x, c21); c22 = fma(w2, x, c22); c23 = fma(w3, x, c23)
            x = load_f32(xp, b3 + k)
            c30 = fma(w0, x, c30); c31 = fma(w1, x, c31); c32 = fma(w2, x, c32); c33 = fma(w3, x, c33)
        a = t * 64
        _acc_add(acc, a, c00); _acc_add(acc, a + 16, c01); _acc_add(acc, a + 32, c02); _acc_add(acc, a + 48, c03)
        a += 64
        _acc_add(acc, a, c10); _acc_add(acc, a + 16, c11); _acc_add(acc, a + 32, c12); _acc_add(acc, a + 48, c13)
        a += 64
        _acc_add(acc, a, c20); _acc_add(acc, a + 16, c21); _acc_add(acc, a + 32, c22); _acc_add(acc, a + 48, c23)
        a += 64
        _acc_add(acc, a, c30); _acc_add(acc, a + 16, c31); _acc_add(acc, a + 32, c32); _acc_add(acc, a + 48, c33)


@njit(fastmath=FM, cache=True)
def acc_to_out(acc, T, r0, nr, Y):
    """Y[t, r0 + rr] = sum of the 16 lanes of acc for (t, rr), rr < nr."""
    for t in range(T):
        for rr in range(nr):
            Y[t, r0 + rr] = hsum(load_f32(acc, (t * 4 + rr) * 16))


@njit(fastmath=FM, cache=True)
def blocks_to_out(acc, S, T, b0, nj, out, Y):
    """acc_to_out for the nj row blocks b0.. of one task (accumulators S floats apart)."""
    for j in range(nj):
        r0 = 4 * (b0 + j)
        acc_to_out(acc[j * S:(j + 1) * S], T, r0, min(4, out - r0), Y)


@njit(inline="always")
def tiled_gemm(decode, wt, out, nch, xp, T, Y, RB):
    """Y[T, out] from TILE_K-column chunks: `decode(wt, r0, nr, ch, tile)` writes the nr <= 4 rows
    r0 .. of chunk ch as float32 into tile [4 * TILE_K] (zeros past the matrix's edge); wt holds the
    format's weights. Inlined (at numba IR level, so the prange stays the caller's parallel loop)."""
    Tp, Kp = xp.shape
    xpf = xp.reshape(-1)
    nb = (out + 3) // 4
    S = Tp * 64
    for g in prange((nb + RB - 1) // RB):
        tile = np.empty(4 * TILE_K, np.float32)
        acc = np.zeros(RB * S, np.float32)
        b0 = g * RB
        nj = min(RB, nb - b0)
        for ch in range(nch):
            for j in range(nj):
                r0 = 4 * (b0 + j)
                nr = min(4, out - r0)
                if nr < 4:                  # the matrix's last rows: the tile's others are zeros
                    tile[nr * TILE_K:] = 0.0
                decode(wt, r0, nr, ch, tile)
                mk4x4(tile, TILE_K, xpf, Kp, ch * TILE_K, Tp, acc[j * S:(j + 1) * S])
        blocks_to_out(acc, S, T, b0, nj, out, Y)


def pad_tokens(X: np.ndarray, K: int) -> np.ndarray:
    """X [T, n] -> zero-padded float32 [ceil4(T), ceil(n / K) * K] (natural column order)."""
    T, n = X.shape
    xp = np.zeros(((T + 3) // 4 * 4, (n + K - 1) // K * K), np.float32)
    xp[:T, :n] = X
    return xp


def row_blocks_per_task(out: int, xp: np.ndarray, most: int = 16) -> int:
    """Row blocks (4 rows each) per parallel task, chunk-major. When the activations outgrow L2
    (T=64 x 7168: 1.8 MB), `most` blocks share each activation chunk while it is in L2 (their
    accumulators fit beside it): bf16 64x7168x1536 159 -> 174 GFLOP/s, 576 rows 134 -> 175. While
    they fit, one block per task (INT4 at T=16: 162 vs 143 GFLOP/s with 16). At least ~8 tasks per
    thread, for balance."""
    if xp.nbytes <= 512 << 10:
        return 1
    return max(1, min(most, (out + 3) // 4 // (8 * numba.get_num_threads())))
