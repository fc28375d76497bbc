"""bf16-weight GEMV / GEMM (lm_head, attention projections, dense MLP, shared experts).

Layout: w bf16 [out, in] as uint16 bits (or ml_dtypes.bfloat16); bf16 -> f32 is (u16 << 16).
Shape legend: out = rows, in = columns, T = tokens.

- GEMV: 8 rows x 32 columns per step (two 16-lane accumulators per row), zero-extend + shift +
  FMA = 3 vector ops per 16 weights, software prefetch (to L2, prefetcht1) of the next 8-row block.
  Memory bound. Measured against 4 rows with prefetcht0: 8 row streams per thread and the L2 hint
  lift 2 threads from ~88% to ~97% of the 2-thread numba read stream (163840x7168 and rotating
  2048x7168 / 7168x8192 sets). A leftover 4-row block goes through the 8-row kernel on a
  zero-padded copy (K2's row counts are multiples of 8: never on its path); fewer rows, one at a time.
- GEMM (T > 1): decode 4 rows x 512 columns into an fp32 tile, shared 4x4 micro-kernel (_tile).
Results are exact up to float32 summation order.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import FM, as_u16, bf16_to_f32, check, out_array
from ._simd import bits2f, fadd, fma, hsum, ishl, load_f32, load_u16, prefetch_l2, store_f32, u32_as_f32, zeros_f32
from ._launch import twin
from ._tile import TILE_K, pad_tokens, row_blocks_per_task, tiled_gemm

__all__ = ["bf16_gemv_ref", "bf16_gemm_ref", "bf16_gemv", "bf16_gemm"]


def bf16_gemv_ref(w, x):
    """y[out] = W @ x, float32 numpy."""
    return bf16_to_f32(w.view(np.uint16)) @ x.astype(np.float32)


def bf16_gemm_ref(w, X):
    """Y[T, out] = X @ W.T, float32 numpy."""
    return X.astype(np.float32) @ bf16_to_f32(w.view(np.uint16)).T


@njit(fastmath=FM, cache=True, inline="always")
def _w(wf, i):
    return bits2f(ishl(load_u16(wf, i), 16))


@njit(fastmath=FM, cache=True)
def _rows8(wf, x, y, r, n, pnext):
    """y[r .. r+7]; prefetches (to L2) the block `pnext` rows further on."""
    b0 = r * n; b1 = b0 + n; b2 = b1 + n; b3 = b2 + n
    b4 = b3 + n; b5 = b4 + n; b6 = b5 + n; b7 = b6 + n
    a0 = zeros_f32(); a1 = zeros_f32(); a2 = zeros_f32(); a3 = zeros_f32()
    a4 = zeros_f32(); a5 = zeros_f32(); a6 = zeros_f32(); a7 = zeros_f32()
    c0 = zeros_f32(); c1 = zeros_f32(); c2 = zeros_f32(); c3 = zeros_f32()
    c4 = zeros_f32(); c5 = zeros_f32(); c6 = zeros_f32(); c7 = zeros_f32()
    pn = pnext * n
    nv = n // 32 * 32
    for k in range(0, nv, 32):
        prefetch_l2(wf, b0 + pn + k); prefetch_l2(wf, b1 + pn + k)
        prefetch_l2(wf, b2 + pn + k); prefetch_l2(wf, b3 + pn + k)
        prefetch_l2(wf, b4 + pn + k); prefetch_l2(wf, b5 + pn + k)
        prefetch_l2(wf, b6 + pn + k); prefetch_l2(wf, b7 + pn + k)
        xa = load_f32(x, k)
        xb = load_f32(x, k + 16)
        a0 = fma(_w(wf, b0 + k), xa, a0); c0 = fma(_w(wf, b0 + k + 16), xb, c0)
        a1 = fma(_w(wf, b1 + k), xa, a1); c1 = fma(_w(wf, b1 + k + 16), xb, c1)
        a2 = fma(_w(wf, b2 + k), xa, a2); c2 = fma(_w(wf, b2 + k + 16), xb, c2)
        a3 = fma(_w(wf, b3 + k), xa, a3); c3 = fma(_w(wf, b3 + k + 16), xb, c3)
        a4 = fma(_w(wf, b4 + k), xa, a4); c4 = fma(_w(wf, b4 + k + 16), xb, c4)
        a5 = fma(_w(wf, b5 + k), xa, a5); c5 = fma(_w(wf, b5 + k + 16), xb, c5)
        a6 = fma(_w(wf, b6 + k), xa, a6); c6 = fma(_w(wf, b6 + k + 16), xb, c6)
        a7 = fma(_w(wf, b7 + k), xa, a7); c7 = fma(_w(wf, b7 + k + 16), xb, c7)
    y0 = hsum(fadd(a0, c0)); y1 = hsum(fadd(a1, c1)); y2 = hsum(fadd(a2, c2)); y3 = hsum(fadd(a3, c3))
    y4 = hsum(fadd(a4, c4)); y5 = hsum(fadd(a5, c5)); y6 = hsum(fadd(a6, c6)); y7 = hsum(fadd(a7, c7))
    for k in range(nv, n):
        xv = x[k]
        y0 += u32_as_f32(np.uint32(wf[b0 + k]) << 16) * xv
        y1 += u32_as_f32(np.uint32(wf[b1 + k]) << 16) * xv
        y2 += u32_as_f32(np.uint32(wf[b2 + k]) << 16) * xv
        y3 += u32_as_f32(np.uint32(wf[b3 + k]) << 16) * xv
        y4 += u32_as_f32(np.uint32(wf[b4 + k]) << 16) * xv
        y5 += u32_as_f32(np.uint32(wf[b5 + k]) << 16) * xv
        y6 += u32_as_f32(np.uint32(wf[b6 + k]) << 16) * xv
        y7 += u32_as_f32(np.uint32(wf[b7 + k]) << 16) * xv
    y[r] = y0; y[r + 1] = y1; y[r + 2] = y2; y[r + 3] = y3
    y[r + 4] = y4; y[r + 5] = y5; y[r + 6] = y6; y[r + 7] = y7


@njit(fastmath=FM, cache=True)
def _row1(wf, x, xo, y, yo, r, n):
    b = r * n
    a = zeros_f32()
    nv = n // 16 * 16
    for k in range(0, nv, 16):
        a = fma(_w(wf, b + k), load_f32(x, xo + k), a)
    s = hsum(a)
    for k in range(nv, n):
        s += u32_as_f32(np.uint32(wf[b + k]) << 16) * x[xo + k]
    y[yo + r] = s


@twin
@njit(parallel=True, nogil=True, cache=True)
def _bf16_gemv(w, x, y):
    out, n = w.shape
    wf = w.reshape(-1)
    nb = out // 8
    for b in prange(nb):
        r = 8 * b
        _rows8(wf, x, y, r, n, 8 if r + 16 <= out else 0)
    r = 8 * nb
    if r + 4 <= out:            # a last 4-row block: _rows8 on a zero-padded copy (its rows' bits)
        pad = np.zeros(8 * n, np.uint16)
        pad[:4 * n] = wf[r * n:(r + 4) * n]
        y8 = np.empty(8, np.float32)
        _rows8(pad, x, y8, 0, n, 0)
        y[r:r + 4] = y8[:4]
        r += 4
    for rr in range(r, out):
        _row1(wf, x, 0, y, 0, rr, n)


@njit(fastmath=FM, cache=True)
def _decode_tile(wt, r0, nr, ch, tile):
    """tiled_gemm's decoder: wt = (w flat, in)."""
    wf, n = wt
    K = TILE_K
    k0 = ch * K
    nk = min(K, n - k0)
    nv = nk // 16 * 16
    for rr in range(nr):
        base = rr * K
        src = (r0 + rr) * n + k0
        for k in range(0, nv, 16):
            store_f32(tile, base + k, _w(wf, src + k))
        for k in range(nv, K):
            tile[base + k] = u32_as_f32(np.uint32(wf[src + k]) << 16) if k < nk else np.float32(0.0)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _bf16_tiles(w, xp, T, Y, RB):
    """RB row blocks (of 4 rows) per task, chunk-major: each activation chunk is reused from L2 by
    RB blocks before the next one is loaded (not streamed from L3 once per 4 rows)."""
    out, n = w.shape
    tiled_gemm(_decode_tile, (w.reshape(-1), n), out, (n + TILE_K - 1) // TILE_K, xp, T, Y, RB)


def bf16_gemv(w, x, out=None):
    """y[out] = W @ x. w bf16/uint16 [out, in], x float32 [in]."""
    w = as_u16(w, "w", 2)
    x = check(x, "x", np.float32, 1, (w.shape[1],))
    y = out_array(out, (w.shape[0],))
    _bf16_gemv.pick(w.size)(w, x, y)
    return y


def bf16_gemm(w, X, out=None):
    """Y[T, out] = X @ W.T. w bf16/uint16 [out, in], X float32 [T, in]."""
    w = as_u16(w, "w", 2)
    X = check(X, "X", np.float32, 2, (None, w.shape[1]))
    T = X.shape[0]
    Y = out_array(out, (T, w.shape[0]))
    if T == 1:
        _bf16_gemv.pick(w.size)(w, X[0], Y[0])
    elif T > 1:
        xp = pad_tokens(X, TILE_K)
        _bf16_tiles.pick(w.size * T)(w, xp, T, Y, row_blocks_per_task(w.shape[0], xp))
    return Y
