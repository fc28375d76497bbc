"""INT4 group-32 GEMV / GEMM on the stored compressed-tensors pack-quantized layout.

Layout (as stored, never converted): packed int32 [out, W = in/8], nibble j of word k is column 8k+j
(lowest nibble first), u in 0..15, q = u - 8; scale bf16 [out, G = in/32] (uint16 bits);
W[r, c] = q[r, c] * scale[r, c // 32].

Shape legend: out = rows (output features), in = columns (input features) = 8 W, W = int32 words per
row, G = groups per row, T = tokens.

Kernels (numba, explicit 16-lane SIMD from _simd):
- GEMV (T = 1): 4 rows per step; 16 words (128 columns, 4 groups) per vector. Nibble j is isolated
  with one AND (mask 0xF << 4j) and converted with one int->float; the 2^(4j) factor is folded into
  a pre-scaled, permuted copy of x (xs[j, w] = x[8w+j] * 2^-4j, exact) and the -8 offset into a
  per-word correction c[w] = 8 * sum_j x[8w+j] (t = sum_j u_j x_j - c). ~3.7 vector ops per 16
  weights; software prefetch of the next row block (hardware prefetch does not keep up with 3.5 KB
  row streams), to L2 only (prefetcht1): measured +15% at 2048x7168 and +30% at 7168x2048 over
  prefetcht0 (likely: an L1 fill evicts lines still in use). Exact up to float
  summation order (the u/-8 split rounds like a reassociation).
- GEMM, T <= DIRECT_T_MAX: the GEMV loop on each row block, two tokens at a time sharing one nibble
  decode (weights read from DRAM once).
- GEMM, larger T: decode 4 rows x 64 words into an fp32 tile (exact q * s), multiply with all tokens
  by the shared 4x4 register micro-kernel (_tile.mk4x4). Pure fp32, same exact W values.

Activations with |x| < ~1e-30 lose precision in the GEMV pre-scaling (x * 2^-24 underflows); they
contribute nothing measurable next to O(1e-3..1e3) activations.

No repacked layout: with the AND-mask trick every nibble position costs the same (and + cvt + fma),
so no nibble order saves an op; the stored layout runs at the vector-ALU limit (~15 GB/s per core)
and, with prefetch, at 95% of the one-thread DRAM figure with 2 threads at 2048x7168 (microbench).
Repacked layouts tried while prototyping (lanes over groups, rows interleaved by 4, f32 scales)
were slower or equal; f32 scales add 11% bytes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kimi_desktop.offload.formats import dequantize_int4
from ._common import FM, as_i32, as_u16, check, out_array
from ._simd import (fma, fmul, fsub, hsum, i2f, iand, ilshr, load_bf16_rep4, load_f32, load_i32,
                    prefetch_l2, splat_f32, splat_i32, store_f32, u32_as_f32, zeros_f32)
from ._launch import twin
from ._tile import TILE_K, row_blocks_per_task, tiled_gemm

GROUP = 32
DIRECT_T_MAX = 6      # GEMM: up to this many tokens, GEMV loop (2 tokens per pass); above, fp32 tiles
                      # (measured at K2 expert shapes: T = 4, 5, 6 take 0.92, 1.19, 1.40 ms vs 1.07, 1.61, 1.65)
TILE_W = TILE_K // 8  # GEMM tile: words per tile row (512 columns)

__all__ = ["int4_gemv_ref", "int4_gemm_ref", "int4_gemv", "int4_gemm"]


# ----------------------------------------------------------------------------- numpy references
# (W from offload.formats' dequantize_int4: the one copy of the unpacking)

def int4_gemv_ref(packed, scale, x):
    """y[out] = W @ x in float32 (numpy)."""
    return dequantize_int4(packed, scale, x.shape[0], GROUP) @ x.astype(np.float32)


def int4_gemm_ref(packed, scale, X):
    """Y[T, out] = X @ W.T in float32 (numpy)."""
    return X.astype(np.float32) @ dequantize_int4(packed, scale, X.shape[1], GROUP).T


# ----------------------------------------------------------------------------- activation prep

@njit(cache=True)
def _prep_gemv_x(X, W):
    """X [T, in] -> xs [T, 8, W] (xs[t, j, w] = x[8w+j] * 2^-4j for j < 7, x[8w+7] for j = 7),
    c [T, W] = 8 * sum_j x[8w+j] (float64 sum, rounded once), xf [T, 8W] (x zero-padded)."""
    T, n = X.shape
    xs = np.empty((T, 8, W), np.float32)
    c = np.empty((T, W), np.float32)
    xf = np.zeros((T, 8 * W), np.float32)
    xf[:, :n] = X
    for t in range(T):
        for w in range(W):
            s = 0.0
            f = 1.0
            for j in range(8):
                v = xf[t, 8 * w + j]
                s += v
                xs[t, j, w] = v * (f if j < 7 else 1.0)
                f *= 0.0625
            c[t, w] = 8.0 * s
    return xs, c, xf


@njit(cache=True)
def _prep_tile_x(X, W, CW, Tp):
    """X [T, in] -> xp [Tp, nch, 8, CW] flat per token: xp[t, ch, j, ww] = x[t, 8(ch*CW + ww) + j]."""
    T, n = X.shape
    nch = (W + CW - 1) // CW
    xp = np.zeros((Tp, nch * 8 * CW), np.float32)
    for t in range(T):
        for ch in range(nch):
            for ww in range(CW):
                w = ch * CW + ww
                for j in range(8):
                    col = 8 * w + j
                    if col < n:
                        xp[t, ch * 8 * CW + j * CW + ww] = X[t, col]
    return xp


# ----------------------------------------------------------------------------- GEMV core

@njit(fastmath=FM, cache=True, inline="always")
def _word_dot(v, xs, xo, c, co, W):
    """16 lanes of sum_j q_j x_j for the 16 words in v (xs/c flat, token offsets xo/co)."""
    t = fsub(zeros_f32(), load_f32(c, co))
    t = fma(i2f(iand(v, splat_i32(0xF))), load_f32(xs, xo), t)
    t = fma(i2f(iand(v, splat_i32(0xF0))), load_f32(xs, xo + W), t)
    t = fma(i2f(iand(v, splat_i32(0xF00))), load_f32(xs, xo + 2 * W), t)
    t = fma(i2f(iand(v, splat_i32(0xF000))), load_f32(xs, xo + 3 * W), t)
    t = fma(i2f(iand(v, splat_i32(0xF0000))), load_f32(xs, xo + 4 * W), t)
    t = fma(i2f(iand(v, splat_i32(0xF00000))), load_f32(xs, xo + 5 * W), t)
    t = fma(i2f(iand(v, splat_i32(0xF000000))), load_f32(xs, xo + 6 * W), t)
    t = fma(i2f(ilshr(v, 28)), load_f32(xs, xo + 7 * W), t)
    return t


@njit(fastmath=FM, cache=True)
def _tail_word(pf, sf, xf, xfo, r, w, W, G):
    """Scalar dot of one word (8 columns) of row r with x, scaled (for W % 16 tails)."""
    v = np.int64(pf[r * W + w]) & 0xFFFFFFFF
    s = np.float32(0.0)
    for j in range(8):
        s += np.float32(((v >> (4 * j)) & 15) - 8) * xf[xfo + 8 * w + j]
    return s * u32_as_f32(np.uint32(sf[r * G + (w >> 2)]) << 16)


@njit(fastmath=FM, cache=True, inline="always")
def _tail_rows4(pf, sf, xf, xfo, r, Wv, W, G, y0, y1, y2, y3, y, yo):
    """y[yo + r + i] = y_i + the scalar dots of words Wv .. W-1 (the W % 16 tail) of rows r + i."""
    for w in range(Wv, W):
        y0 += _tail_word(pf, sf, xf, xfo, r, w, W, G)
        y1 += _tail_word(pf, sf, xf, xfo, r + 1, w, W, G)
        y2 += _tail_word(pf, sf, xf, xfo, r + 2, w, W, G)
        y3 += _tail_word(pf, sf, xf, xfo, r + 3, w, W, G)
    y[yo + r] = y0; y[yo + r + 1] = y1; y[yo + r + 2] = y2; y[yo + r + 3] = y3


@njit(cache=True, inline="always")
def _prefetch_rows4(pf, sf, r, W, G, w):
    """Prefetch (to L2) word w of the packed rows r .. r+3 and their scales."""
    b = r * W
    s = r * G
    prefetch_l2(pf, b + w); prefetch_l2(pf, b + W + w); prefetch_l2(pf, b + 2 * W + w); prefetch_l2(pf, b + 3 * W + w)
    g = w >> 2
    prefetch_l2(sf, s + g); prefetch_l2(sf, s + G + g); prefetch_l2(sf, s + 2 * G + g); prefetch_l2(sf, s + 3 * G + g)


@njit(fastmath=FM, cache=True)
def _gemv_rows4(pf, sf, xs, xo, c, co, xf, xfo, y, yo, r, W, G, pnext):
    """y[yo + r .. r+3] = 4 rows starting at r; prefetches the block `pnext` rows further on."""
    a0 = zeros_f32(); a1 = zeros_f32(); a2 = zeros_f32(); a3 = zeros_f32()
    b0 = r * W; b1 = b0 + W; b2 = b1 + W; b3 = b2 + W
    s0 = r * G; s1 = s0 + G; s2 = s1 + G; s3 = s2 + G
    Wv = W // 16 * 16
    for w in range(0, Wv, 16):
        _prefetch_rows4(pf, sf, r + pnext, W, G, w)
        g = w >> 2
        a0 = fma(_word_dot(load_i32(pf, b0 + w), xs, xo + w, c, co + w, W), load_bf16_rep4(sf, s0 + g), a0)
        a1 = fma(_word_dot(load_i32(pf, b1 + w), xs, xo + w, c, co + w, W), load_bf16_rep4(sf, s1 + g), a1)
        a2 = fma(_word_dot(load_i32(pf, b2 + w), xs, xo + w, c, co + w, W), load_bf16_rep4(sf, s2 + g), a2)
        a3 = fma(_word_dot(load_i32(pf, b3 + w), xs, xo + w, c, co + w, W), load_bf16_rep4(sf, s3 + g), a3)
    _tail_rows4(pf, sf, xf, xfo, r, Wv, W, G, hsum(a0), hsum(a1), hsum(a2), hsum(a3), y, yo)


@njit(fastmath=FM, cache=True, inline="always")
def _word_dot2(v, xs, xa, xb, c, ca, cb, W):
    """_word_dot for two tokens (offsets a, b) sharing one nibble decode."""
    ta = fsub(zeros_f32(), load_f32(c, ca))
    tb = fsub(zeros_f32(), load_f32(c, cb))
    q = i2f(iand(v, splat_i32(0xF)))
    ta = fma(q, load_f32(xs, xa), ta); tb = fma(q, load_f32(xs, xb), tb)
    q = i2f(iand(v, splat_i32(0xF0)))
    ta = fma(q, load_f32(xs, xa + W), ta); tb = fma(q, load_f32(xs, xb + W), tb)
    q = i2f(iand(v, splat_i32(0xF00)))
    ta = fma(q, load_f32(xs, xa + 2 * W), ta); tb = fma(q, load_f32(xs, xb + 2 * W), tb)
    q = i2f(iand(v, splat_i32(0xF000)))
    ta = fma(q, load_f32(xs, xa + 3 * W), ta); tb = fma(q, load_f32(xs, xb + 3 * W), tb)
    q = i2f(iand(v, splat_i32(0xF0000)))
    ta = fma(q, load_f32(xs, xa + 4 * W), ta); tb = fma(q, load_f32(xs, xb + 4 * W), tb)
    q = i2f(iand(v, splat_i32(0xF00000)))
    ta = fma(q, load_f32(xs, xa + 5 * W), ta); tb = fma(q, load_f32(xs, xb + 5 * W), tb)
    q = i2f(iand(v, splat_i32(0xF000000)))
    ta = fma(q, load_f32(xs, xa + 6 * W), ta); tb = fma(q, load_f32(xs, xb + 6 * W), tb)
    q = i2f(ilshr(v, 28))
    ta = fma(q, load_f32(xs, xa + 7 * W), ta); tb = fma(q, load_f32(xs, xb + 7 * W), tb)
    return ta, tb


@njit(fastmath=FM, cache=True)
def _gemv_rows4_t2(pf, sf, xs, xa, xb, c, ca, cb, xf, fa, fb, y, ya, yb, r, W, G, pnext):
    """_gemv_rows4 for two tokens at once (a, b): one decode, two FMA chains."""
    a0 = zeros_f32(); a1 = zeros_f32(); a2 = zeros_f32(); a3 = zeros_f32()
    b0_ = zeros_f32(); b1_ = zeros_f32(); b2_ = zeros_f32(); b3_ = zeros_f32()
    b0 = r * W; b1 = b0 + W; b2 = b1 + W; b3 = b2 + W
    s0 = r * G; s1 = s0 + G; s2 = s1 + G; s3 = s2 + G
    Wv = W // 16 * 16
    for w in range(0, Wv, 16):
        _prefetch_rows4(pf, sf, r + pnext, W, G, w)
        g = w >> 2
        sc = load_bf16_rep4(sf, s0 + g)
        ta, tb = _word_dot2(load_i32(pf, b0 + w), xs, xa + w, xb + w, c, ca + w, cb + w, W)
        a0 = fma(ta, sc, a0); b0_ = fma(tb, sc, b0_)
        sc = load_bf16_rep4(sf, s1 + g)
        ta, tb = _word_dot2(load_i32(pf, b1 + w), xs, xa + w, xb + w, c, ca + w, cb + w, W)
        a1 = fma(ta, sc, a1); b1_ = fma(tb, sc, b1_)
        sc = load_bf16_rep4(sf, s2 + g)
        ta, tb = _word_dot2(load_i32(pf, b2 + w), xs, xa + w, xb + w, c, ca + w, cb + w, W)
        a2 = fma(ta, sc, a2); b2_ = fma(tb, sc, b2_)
        sc = load_bf16_rep4(sf, s3 + g)
        ta, tb = _word_dot2(load_i32(pf, b3 + w), xs, xa + w, xb + w, c, ca + w, cb + w, W)
        a3 = fma(ta, sc, a3); b3_ = fma(tb, sc, b3_)
    _tail_rows4(pf, sf, xf, fa, r, Wv, W, G, hsum(a0), hsum(a1), hsum(a2), hsum(a3), y, ya)
    _tail_rows4(pf, sf, xf, fb, r, Wv, W, G, hsum(b0_), hsum(b1_), hsum(b2_), hsum(b3_), y, yb)


@njit(fastmath=FM, cache=True)
def _gemv_row1(pf, sf, xs, xo, c, co, xf, xfo, y, yo, r, W, G):
    a = zeros_f32()
    Wv = W // 16 * 16
    for w in range(0, Wv, 16):
        a = fma(_word_dot(load_i32(pf, r * W + w), xs, xo + w, c, co + w, W),
                load_bf16_rep4(sf, r * G + (w >> 2)), a)
    acc = hsum(a)
    for w in range(Wv, W):
        acc += _tail_word(pf, sf, xf, xfo, r, w, W, G)
    y[yo + r] = acc


@twin
@njit(parallel=True, nogil=True, cache=True)
def _int4_direct(packed, scale, xs, c, xf, Y):
    """Y[T, out] for small T: per row block, the GEMV loop once per token."""
    out, W = packed.shape
    G = scale.shape[1]
    T = xs.shape[0]
    pf = packed.reshape(-1)
    sf = scale.reshape(-1)
    xsf = xs.reshape(-1)
    cf = c.reshape(-1)
    xff = xf.reshape(-1)
    yf = Y.reshape(-1)
    nb = out // 4
    for b in prange(nb):
        r = 4 * b
        pnext = 4 if r + 8 <= out else 0
        for t in range(0, T - 1, 2):
            _gemv_rows4_t2(pf, sf, xsf, t * 8 * W, (t + 1) * 8 * W, cf, t * W, (t + 1) * W,
                           xff, t * 8 * W, (t + 1) * 8 * W, yf, t * out, (t + 1) * out, r, W, G,
                           pnext if t == 0 else 0)
        if T % 2:
            t = T - 1
            _gemv_rows4(pf, sf, xsf, t * 8 * W, cf, t * W, xff, t * 8 * W, yf, t * out, r, W, G,
                        pnext if t == 0 else 0)
    for r in range(4 * nb, out):
        for t in range(T):
            _gemv_row1(pf, sf, xsf, t * 8 * W, cf, t * W, xff, t * 8 * W, yf, t * out, r, W, G)


# ----------------------------------------------------------------------------- GEMM (tiles)

@njit(fastmath=FM, cache=True)
def _decode_tile(wt, r0, nr, ch, tile):
    """tiled_gemm's decoder, wt = (packed flat, scale flat, W, G): tile[rr, j, ww] = q * s for rows
    r0 + rr (rr < nr), words ch * TILE_W + ww (0 past W)."""
    pf, sf, W, G = wt
    CW = TILE_W
    K = 8 * CW
    w0 = ch * CW
    nw = min(CW, W - w0)
    nv = nw // 16 * 16
    for rr in range(nr):
        base = rr * K
        r = r0 + rr
        for ww in range(0, nv, 16):
            v = load_i32(pf, r * W + w0 + ww)
            s = load_bf16_rep4(sf, r * G + ((w0 + ww) >> 2))
            m8s = fmul(s, splat_f32(-8.0))
            for j in range(8):          # (u - 8) * s as one fma, u * s - 8 s: exact (<= 12 bits)
                u = i2f(iand(ilshr(v, 4 * j), splat_i32(15)))
                store_f32(tile, base + j * CW + ww, fma(u, s, m8s))
        for ww in range(nv, CW):
            if ww < nw:
                w = w0 + ww
                v = np.int64(pf[r * W + w]) & 0xFFFFFFFF
                s = u32_as_f32(np.uint32(sf[r * G + (w >> 2)]) << 16)
                for j in range(8):
                    tile[base + j * CW + ww] = np.float32(((v >> (4 * j)) & 15) - 8) * s
            else:
                for j in range(8):
                    tile[base + j * CW + ww] = 0.0


@twin
@njit(parallel=True, nogil=True, cache=True)
def _int4_tiles(packed, scale, xp, T, Y, RB):
    """RB row blocks per task, chunk-major (tiled_gemm)."""
    out, W = packed.shape
    wt = (packed.reshape(-1), scale.reshape(-1), W, scale.shape[1])
    tiled_gemm(_decode_tile, wt, out, (W + TILE_W - 1) // TILE_W, xp, T, Y, RB)


# ----------------------------------------------------------------------------- launchers

def _check_weights(packed, scale):
    packed = as_i32(packed, "packed", 2)
    out, W = packed.shape
    G = (W + 3) // 4
    scale = as_u16(scale, "scale", 2)
    if scale.shape[0] != out or scale.shape[1] < G:
        raise ValueError(f"scale: expected shape ({out}, {G}) for packed {packed.shape} with group {GROUP}, "
                         f"got {scale.shape} (only group size {GROUP} is supported)")
    return packed, scale


def _check_in(n, W, name):
    if not (8 * (W - 1) < n <= 8 * W):
        raise ValueError(f"{name}: {n} input features do not match packed words per row {W} "
                         f"(expected {8 * W - 7}..{8 * W})")


def int4_gemv(packed, scale, x, out=None):
    """y[out] = W @ x. packed int32 [out, W], scale bf16/uint16 [out, G], x float32 [in]."""
    packed, scale = _check_weights(packed, scale)
    x = check(x, "x", np.float32, 1)
    _check_in(x.shape[0], packed.shape[1], "x")
    y = out_array(out, (packed.shape[0],))
    xs, c, xf = _prep_gemv_x(x.reshape(1, -1), packed.shape[1])
    _int4_direct.pick(packed.size * 8)(packed, scale, xs, c, xf, y.reshape(1, -1))
    return y


def int4_gemm(packed, scale, X, out=None):
    """Y[T, out] = X @ W.T. packed int32 [out, W], scale bf16/uint16 [out, G], X float32 [T, in]."""
    packed, scale = _check_weights(packed, scale)
    X = check(X, "X", np.float32, 2)
    _check_in(X.shape[1], packed.shape[1], "X")
    T = X.shape[0]
    Y = out_array(out, (T, packed.shape[0]))
    if T == 0:
        return Y
    if T <= DIRECT_T_MAX:
        xs, c, xf = _prep_gemv_x(X, packed.shape[1])
        _int4_direct.pick(packed.size * 8 * T)(packed, scale, xs, c, xf, Y)
    else:
        xp = _prep_tile_x(X, packed.shape[1], TILE_W, (T + 3) // 4 * 4)
        _int4_tiles.pick(packed.size * 8 * T)(packed, scale, xp, T, Y, row_blocks_per_task(packed.shape[0], xp))
    return Y
