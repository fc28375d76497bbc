"""RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), all float32 (HF DeepseekV3RMSNorm order).

Shape legend: x [T, d] float32, w [d] float32 (bf16 / uint16 bits accepted and upcast), y [T, d].
The numba kernel sums squares with 4 x 16-lane float32 accumulators (HF sums in float32 too).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import FM, _BF16, bf16_to_f32, check, out_array
from ._launch import twin
from ._simd import fadd, fma, fmul, hsum, load_f32, splat_f32, store_f32, zeros_f32

__all__ = ["rmsnorm_ref", "rmsnorm"]


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float32)
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return w.astype(np.float32) * (x * (np.float32(1.0) / np.sqrt(var + np.float32(eps))))


@njit(fastmath=FM, cache=True)
def _rmsnorm_row(x, w, eps, y, o, d):
    a0 = zeros_f32(); a1 = zeros_f32(); a2 = zeros_f32(); a3 = zeros_f32()  # noqa: E702
    n64 = d // 64 * 64
    for i in range(0, n64, 64):
        v = load_f32(x, o + i); a0 = fma(v, v, a0)  # noqa: E702
        v = load_f32(x, o + i + 16); a1 = fma(v, v, a1)  # noqa: E702
        v = load_f32(x, o + i + 32); a2 = fma(v, v, a2)  # noqa: E702
        v = load_f32(x, o + i + 48); a3 = fma(v, v, a3)  # noqa: E702
    s = hsum(fadd(fadd(a0, a1), fadd(a2, a3)))
    for i in range(n64, d):
        s += x[o + i] * x[o + i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(d) + eps)
    rv = splat_f32(r)
    n16 = d // 16 * 16
    for i in range(0, n16, 16):
        store_f32(y, o + i, fmul(load_f32(w, i), fmul(load_f32(x, o + i), rv)))
    for i in range(n16, d):
        y[o + i] = w[i] * (x[o + i] * r)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _rmsnorm(x, w, eps, y):
    T, d = x.shape
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    for t in prange(T):
        _rmsnorm_row(xf, w, eps, yf, t * d, d)


def rmsnorm(x, w, eps, out=None):
    """y[T, d] = w * (x * rsqrt(mean(x^2, -1) + eps)). x float32 [T, d] (or [d]); w float32/bf16 [d]."""
    one = isinstance(x, np.ndarray) and x.ndim == 1
    x2 = check(x, "x", np.float32, 1 if one else 2)
    x2 = x2.reshape(1, -1) if one else x2
    d = x2.shape[1]
    if isinstance(w, np.ndarray) and (w.dtype == np.uint16 or (_BF16 is not None and w.dtype == _BF16)):
        w = bf16_to_f32(w.view(np.uint16))
    w = check(w, "w", np.float32, 1, (d,))
    y = out_array(out, x.shape)
    _rmsnorm.pick(x2.size)(x2, w, np.float32(eps), y.reshape(x2.shape))
    return y
