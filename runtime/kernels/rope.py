"""RoPE in DeepSeek's interleaved-pair layout (q_pe / k_pe).

For pair i, angle = pos * inv_freq[i]; c = cos(angle) * mscale, s = sin(angle) * mscale:
    out[2i]   = x[2i] * c - x[2i+1] * s
    out[2i+1] = x[2i] * s + x[2i+1] * c
Angles are computed in float64 (position as float64 times inv_freq as given, float32 or float64),
then cos/sin are rounded to float32: exact for any position. fp32_angles=True instead rounds the
angle to float32 first (float32(pos) * float32(inv_freq)), as transformers does, for bit-level
comparisons with HF at long positions. The rotation itself is float32, no FMA contraction.

Shape legend: x [T, H, d] (or [T, d]) float32, positions [T] integer, inv_freq [d/2].
`out=x` rotates in place.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import check, out_array
from ._launch import twin

__all__ = ["rope_interleaved_ref", "rope_interleaved"]


def _cos_sin_ref(positions, inv_freq, mscale, fp32_angles):
    if fp32_angles:
        ang = (positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]).astype(np.float64)
    else:
        ang = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    m = np.float32(mscale)
    return np.cos(ang).astype(np.float32) * m, np.sin(ang).astype(np.float32) * m


def rope_interleaved_ref(x, positions, inv_freq, mscale=1.0, fp32_angles=False):
    """numpy reference; returns a rotated copy."""
    c, s = _cos_sin_ref(np.asarray(positions), np.asarray(inv_freq), mscale, fp32_angles)
    if x.ndim == 3:
        c, s = c[:, None, :], s[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float32)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


@twin
@njit(parallel=True, nogil=True, cache=True)
def _rope(x, positions, inv_freq, mscale, fp32_angles, out):
    T, H, d = x.shape
    half = d // 2
    for t in prange(T):
        cs = np.empty(half, np.float32)
        sn = np.empty(half, np.float32)
        for i in range(half):
            if fp32_angles:
                a = np.float64(np.float32(positions[t]) * np.float32(inv_freq[i]))
            else:
                a = np.float64(positions[t]) * np.float64(inv_freq[i])
            cs[i] = np.float32(math.cos(a)) * mscale
            sn[i] = np.float32(math.sin(a)) * mscale
        for h in range(H):
            for i in range(half):
                x0 = x[t, h, 2 * i]
                x1 = x[t, h, 2 * i + 1]
                out[t, h, 2 * i] = x0 * cs[i] - x1 * sn[i]
                out[t, h, 2 * i + 1] = x0 * sn[i] + x1 * cs[i]


def rope_interleaved(x, positions, inv_freq, mscale=1.0, fp32_angles=False, out=None):
    """Rotated x (a new array, or `out`; out=x works in place). x float32 [T, H, d] or [T, d]."""
    x = check(x, "x", np.float32, x.ndim if isinstance(x, np.ndarray) and x.ndim in (2, 3) else 3)
    x3 = x.reshape(x.shape[0], 1, x.shape[1]) if x.ndim == 2 else x
    T, H, d = x3.shape
    if d % 2:
        raise ValueError(f"x: rope dim must be even, got {d}")
    positions = np.asarray(positions)
    if positions.shape != (T,) or positions.dtype.kind not in "iu":
        raise ValueError(f"positions: expected integer shape ({T},), got {positions.dtype} {positions.shape}")
    inv_freq = np.asarray(inv_freq)
    if inv_freq.shape != (d // 2,) or inv_freq.dtype not in (np.float32, np.float64):
        raise ValueError(f"inv_freq: expected float32/float64 shape ({d // 2},), got {inv_freq.dtype} {inv_freq.shape}")
    y = out_array(out, x.shape)
    _rope.pick(x3.size)(x3, np.ascontiguousarray(positions, np.int64), np.ascontiguousarray(inv_freq),
          np.float32(mscale), bool(fp32_angles), y.reshape(x3.shape))
    return y
