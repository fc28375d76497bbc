"""FP8 (e4m3fn) block-scaled GEMV / GEMM (K2-Instruct / DeepSeek-V3 checkpoints).

Layout: w fp8 e4m3fn [out, in] as uint8 bits (or ml_dtypes.float8_e4m3fn); scale_inv float32
[ceil(out/b0), ceil(in/b1)]; W[r, c] = fp8(w[r, c]) * scale_inv[r // b0, c // b1] (multiplied,
despite the name). block = (b0, b1), default (128, 128).
Shape legend: out = rows, in = columns, T = tokens, b0 x b1 = scale block.

e4m3fn: sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN only at 0x7F/0xFF,
subnormals at exponent 0. FP8_E4M3_LUT is the 256-entry float32 table (tested against
ml_dtypes.float8_e4m3fn for all codes); the scalar tails use it. The references dequantize with
offload.formats' dequantize_fp8_block (the one copy of the format).

The kernels decode arithmetically (a table lookup would be a gather per element): the code's bits
are moved into an IEEE half equal to value * 2^-8 (sign-extend to 16 bits, << 7, & 0xBF80; fp8
subnormals become half subnormals) and converted to float32 (vcvtph2ps), NaN selected for 0x7F /
0xFF; the 2^8 is folded into the block scale. Exact for all 256 codes. (A float32 route, bits of
value * 2^-120 times 2^120, is also exact but turns fp8 subnormals into float32 subnormals, which
cost a microcode assist per vector on Zen 4: 8.6 vs 13 GB/s on random codes.)
- GEMV: 4 rows per step, per scale block a partial sum per row then one FMA with the block scale;
  prefetch of the next row block. Needs b1 % 16 == 0 (else the GEMM path is used).
- GEMM (T > 1): decode 4 rows x 512 columns (scaled) into an fp32 tile, shared 4x4 micro-kernel.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from kimi_desktop.offload.formats import dequantize_fp8_block
from ._common import FM, as_u8, check, out_array
from ._simd import fma, fmul, hsum, load_e4m3, load_f32, prefetch, splat_f32, store_f32, zeros_f32
from ._launch import twin
from ._tile import TILE_K, pad_tokens, row_blocks_per_task, tiled_gemm

__all__ = ["FP8_E4M3_LUT", "fp8_gemv_ref", "fp8_gemm_ref", "fp8_gemv", "fp8_gemm"]


def _e4m3fn_table() -> np.ndarray:
    t = np.empty(256, np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 7
        if e == 15 and m == 7:
            v = math.nan
        elif e == 0:
            v = m / 8.0 * 2.0 ** -6
        else:
            v = (1.0 + m / 8.0) * 2.0 ** (e - 7)
        t[b] = sign * v
    return t


FP8_E4M3_LUT = _e4m3fn_table()
_TWO8 = np.float32(256.0)   # the vector decoder yields value * 2^-8


def _block(block) -> tuple[int, int]:
    b = (block, block) if isinstance(block, (int, np.integer)) else tuple(block)
    if len(b) != 2 or not all(int(v) > 0 for v in b):
        raise ValueError(f"block: expected a positive int or (rows, cols), got {block!r}")
    return int(b[0]), int(b[1])


def fp8_gemv_ref(w, scale_inv, x, block=(128, 128)):
    return dequantize_fp8_block(w, scale_inv, _block(block)) @ x.astype(np.float32)


def fp8_gemm_ref(w, scale_inv, X, block=(128, 128)):
    return X.astype(np.float32) @ dequantize_fp8_block(w, scale_inv, _block(block)).T


# ----------------------------------------------------------------------------- decode

@njit(fastmath=FM, cache=True, inline="always")
def _dec(wf, i):
    """16 lanes: value * 2^-8 of the e4m3fn codes wf[i .. i+15] (exact; NaN for NaN codes)."""
    return load_e4m3(wf, i)


@njit(cache=True)
def _dec1(code, lut):
    return lut[np.int64(code) & 0xFF]


# ----------------------------------------------------------------------------- GEMV

@njit(fastmath=FM, cache=True)
def _rows4(wf, sf, lut, x, y, r, n, ncb, b0, b1, pnext):
    """y[r .. r+3]; b1 % 16 == 0."""
    w0 = r * n; w1 = w0 + n; w2 = w1 + n; w3 = w2 + n
    s0 = (r // b0) * ncb; s1 = ((r + 1) // b0) * ncb; s2 = ((r + 2) // b0) * ncb; s3 = ((r + 3) // b0) * ncb
    a0 = zeros_f32(); a1 = zeros_f32(); a2 = zeros_f32(); a3 = zeros_f32()
    y0 = np.float32(0.0); y1 = np.float32(0.0); y2 = np.float32(0.0); y3 = np.float32(0.0)
    pn = pnext * n
    for cb in range(ncb):
        k0 = cb * b1
        k1 = min(k0 + b1, n)
        kv = k0 + (k1 - k0) // 16 * 16
        t0 = zeros_f32(); t1 = zeros_f32(); t2 = zeros_f32(); t3 = zeros_f32()
        for k in range(k0, kv, 16):
            if (k & 63) == 0:
                prefetch(wf, w0 + pn + k); prefetch(wf, w1 + pn + k)
                prefetch(wf, w2 + pn + k); prefetch(wf, w3 + pn + k)
            xv = load_f32(x, k)
            t0 = fma(_dec(wf, w0 + k), xv, t0)
            t1 = fma(_dec(wf, w1 + k), xv, t1)
            t2 = fma(_dec(wf, w2 + k), xv, t2)
            t3 = fma(_dec(wf, w3 + k), xv, t3)
        a0 = fma(t0, splat_f32(sf[s0 + cb] * _TWO8), a0)
        a1 = fma(t1, splat_f32(sf[s1 + cb] * _TWO8), a1)
        a2 = fma(t2, splat_f32(sf[s2 + cb] * _TWO8), a2)
        a3 = fma(t3, splat_f32(sf[s3 + cb] * _TWO8), a3)
        if kv < k1:
            u0 = np.float32(0.0); u1 = np.float32(0.0); u2 = np.float32(0.0); u3 = np.float32(0.0)
            for k in range(kv, k1):
                xv = x[k]
                u0 += _dec1(wf[w0 + k], lut) * xv
                u1 += _dec1(wf[w1 + k], lut) * xv
                u2 += _dec1(wf[w2 + k], lut) * xv
                u3 += _dec1(wf[w3 + k], lut) * xv
            y0 += u0 * sf[s0 + cb]; y1 += u1 * sf[s1 + cb]; y2 += u2 * sf[s2 + cb]; y3 += u3 * sf[s3 + cb]
    y[r] = hsum(a0) + y0; y[r + 1] = hsum(a1) + y1; y[r + 2] = hsum(a2) + y2; y[r + 3] = hsum(a3) + y3


@njit(fastmath=FM, cache=True)
def _row1(wf, sf, lut, x, y, r, n, ncb, b0, b1):
    w0 = r * n
    s0 = (r // b0) * ncb
    a = zeros_f32()
    acc = np.float32(0.0)
    for cb in range(ncb):
        k0 = cb * b1
        k1 = min(k0 + b1, n)
        kv = k0 + (k1 - k0) // 16 * 16
        t = zeros_f32()
        for k in range(k0, kv, 16):
            t = fma(_dec(wf, w0 + k), load_f32(x, k), t)
        a = fma(t, splat_f32(sf[s0 + cb] * _TWO8), a)
        u = np.float32(0.0)
        for k in range(kv, k1):
            u += _dec1(wf[w0 + k], lut) * x[k]
        acc += u * sf[s0 + cb]
    y[r] = hsum(a) + acc


@twin
@njit(parallel=True, nogil=True, cache=True)
def _fp8_gemv(w, scale_inv, b0, b1, lut, x, y):
    out, n = w.shape
    ncb = scale_inv.shape[1]
    wf = w.reshape(-1)
    sf = scale_inv.reshape(-1)
    nb = out // 4
    for b in prange(nb):
        r = 4 * b
        _rows4(wf, sf, lut, x, y, r, n, ncb, b0, b1, 4 if r + 8 <= out else 0)
    for r in range(4 * nb, out):
        _row1(wf, sf, lut, x, y, r, n, ncb, b0, b1)


# ----------------------------------------------------------------------------- GEMM (tiles)

@njit(fastmath=FM, cache=True)
def _decode_tile(wt, r0, nr, ch, tile):
    """tiled_gemm's decoder: wt = (w flat, scale_inv flat, lut, in, column blocks, b0, b1)."""
    wf, sf, lut, n, ncb, b0, b1 = wt
    K = TILE_K
    k0 = ch * K
    nk = min(K, n - k0)
    vec = b1 % 16 == 0
    nv = nk // 16 * 16 if vec else 0
    for rr in range(nr):
        base = rr * K
        r = r0 + rr
        src = r * n + k0
        srow = (r // b0) * ncb
        for k in range(0, nv, 16):
            s = sf[srow + (k0 + k) // b1]
            store_f32(tile, base + k, fmul(_dec(wf, src + k), splat_f32(s * _TWO8)))
        for k in range(nv, K):
            if k < nk:
                tile[base + k] = _dec1(wf[src + k], lut) * sf[srow + (k0 + k) // b1]
            else:
                tile[base + k] = 0.0


@twin
@njit(parallel=True, nogil=True, cache=True)
def _fp8_tiles(w, scale_inv, b0, b1, lut, xp, T, Y, RB):
    """RB row blocks per task, chunk-major (tiled_gemm)."""
    out, n = w.shape
    wt = (w.reshape(-1), scale_inv.reshape(-1), lut, n, scale_inv.shape[1], b0, b1)
    tiled_gemm(_decode_tile, wt, out, (n + TILE_K - 1) // TILE_K, xp, T, Y, RB)


# ----------------------------------------------------------------------------- launchers

def _check_weights(w, scale_inv, block):
    b0, b1 = _block(block)
    w = as_u8(w, "w", 2)
    out, n = w.shape
    want = (-(-out // b0), -(-n // b1))
    scale_inv = check(scale_inv, "scale_inv", np.float32, 2)
    if scale_inv.shape != want:
        raise ValueError(f"scale_inv: expected shape {want} for w {w.shape} with block ({b0}, {b1}), "
                         f"got {scale_inv.shape}")
    return w.view(np.int8), scale_inv, b0, b1


def fp8_gemv(w, scale_inv, x, block=(128, 128), out=None):
    """y[out] = W @ x. w fp8/uint8 [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)], x float32 [in]."""
    w, scale_inv, b0, b1 = _check_weights(w, scale_inv, block)
    x = check(x, "x", np.float32, 1, (w.shape[1],))
    y = out_array(out, (w.shape[0],))
    if b1 % 16 == 0:
        _fp8_gemv.pick(w.size)(w, scale_inv, b0, b1, FP8_E4M3_LUT, x, y)
    else:
        _fp8_tiles.pick(w.size)(w, scale_inv, b0, b1, FP8_E4M3_LUT, pad_tokens(x.reshape(1, -1), TILE_K), 1, y.reshape(1, -1), 1)
    return y


def fp8_gemm(w, scale_inv, X, block=(128, 128), out=None):
    """Y[T, out] = X @ W.T. w fp8/uint8 [out, in], scale_inv float32 [ceil(out/b0), ceil(in/b1)], X float32 [T, in]."""
    w, scale_inv, b0, b1 = _check_weights(w, scale_inv, block)
    X = check(X, "X", np.float32, 2, (None, w.shape[1]))
    T = X.shape[0]
    Y = out_array(out, (T, w.shape[0]))
    if T == 1 and b1 % 16 == 0:
        _fp8_gemv.pick(w.size)(w, scale_inv, b0, b1, FP8_E4M3_LUT, X[0], Y[0])
    elif T >= 1:
        xp = pad_tokens(X, TILE_K)
        _fp8_tiles.pick(w.size * T)(w, scale_inv, b0, b1, FP8_E4M3_LUT, xp, T, Y, row_blocks_per_task(w.shape[0], xp))
    return Y
