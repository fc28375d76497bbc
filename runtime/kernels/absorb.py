"""Weight absorption for MLA decode: queries into latent space through kv_b's W_UK rows, in bf16.

Legend: H heads, C = qk_nope_head_dim, V = v_head_dim, R = kv_lora_rank.
kv_b is stored [H*(C+V), R]; head h's rows h*(C+V) .. h*(C+V)+C-1 are W_UK[h] [C, R].
    q_lat[h] = q_nope[h] @ W_UK[h]                 -> [H, R]
and rows h*(C+V)+C .. h*(C+V)+C+V-1 are W_UV[h] [V, R]:
    o[h] = W_UV[h] @ o_lat[h]                      -> [H, V]
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import bf16_to_f32
from ._launch import twin


def absorb_q_ref(kv_b: np.ndarray, q_nope: np.ndarray, C: int, V: int) -> np.ndarray:
    """kv_b bf16 (uint16 view) [H*(C+V), R], q_nope f32 [H, C] -> q_lat f32 [H, R]."""
    H = q_nope.shape[0]
    w = bf16_to_f32(kv_b).reshape(H, C + V, -1)[:, :C]
    return np.einsum("hc,hcr->hr", q_nope, w).astype(np.float32)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _absorb_q(kv_b, q_nope, C, V, out):
    H, R = out.shape
    for h in prange(H):
        acc = np.zeros(R, np.float32)
        base = h * (C + V)
        for c in range(C):
            a = q_nope[h, c]
            row = kv_b[base + c]
            for r in range(R):                      # contiguous: vectorizes as an axpy
                acc[r] += a * np.uint32(np.uint32(row[r]) << 16).view(np.float32)
        out[h] = acc


def _check(kv_b, a, name: str, C: int, V: int, cols: int | None):
    """(kv_b as uint16 [H*(C+V), R], a as float32 [H, cols or R]) or a ValueError naming the argument."""
    kv_b = kv_b.view(np.uint16)
    H = a.shape[0]
    if kv_b.ndim != 2 or kv_b.shape[0] != H * (C + V) or not kv_b.flags.c_contiguous:
        raise ValueError(f"kv_b: expected C-contiguous [{H}*({C}+{V}), R], got {kv_b.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    want = (H, kv_b.shape[1] if cols is None else cols)
    if a.shape != want:
        raise ValueError(f"{name}: expected [{want[0]}, {want[1]}], got {a.shape}")
    return kv_b, a


def absorb_q(kv_b: np.ndarray, q_nope: np.ndarray, C: int, V: int) -> np.ndarray:
    kv_b, q = _check(kv_b, q_nope, "q_nope", C, V, C)
    H = q.shape[0]
    out = np.empty((H, kv_b.shape[1]), np.float32)
    _absorb_q.pick(H * C * kv_b.shape[1])(kv_b, q, C, V, out)
    return out


def absorb_out_ref(kv_b: np.ndarray, o_lat: np.ndarray, C: int, V: int) -> np.ndarray:
    """kv_b bf16 (uint16 view) [H*(C+V), R], o_lat f32 [H, R] -> o f32 [H, V]."""
    H = o_lat.shape[0]
    w = bf16_to_f32(kv_b).reshape(H, C + V, -1)[:, C:]
    return np.einsum("hvr,hr->hv", w, o_lat).astype(np.float32)


@twin
@njit(parallel=True, nogil=True, cache=True, fastmath=True)   # fastmath: lets LLVM vectorize the dot's reduction
def _absorb_out(kv_b, o_lat, C, V, out):
    H, R = o_lat.shape
    for hv in prange(H * V):
        h, v = hv // V, hv % V
        row = kv_b[h * (C + V) + C + v]
        acc = np.float32(0.0)
        for r in range(R):
            acc += o_lat[h, r] * np.uint32(np.uint32(row[r]) << 16).view(np.float32)
        out[h, v] = acc


def absorb_out(kv_b: np.ndarray, o_lat: np.ndarray, C: int, V: int) -> np.ndarray:
    kv_b, o = _check(kv_b, o_lat, "o_lat", C, V, None)
    H = o.shape[0]
    out = np.empty((H, V), np.float32)
    _absorb_out.pick(H * V * kv_b.shape[1])(kv_b, o, C, V, out)
    return out
