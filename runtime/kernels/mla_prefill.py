"""MLA prefill attention (the naive form: the latent already expanded by kv_b), causal.

    scores[h, t, n] = (q_nope[t, h] . k_nope[n, h] + q_pe[t, h] . pe[n]) * scale,  n <= start + t
    out[t, h]       = softmax(scores[h, t, :]) @ v[:, h]

Shape legend: T queries (this call's tokens, at positions start..start+T-1), N keys (the cache
incl. these, N = start + T), H heads, C = qk_nope, P = qk_rope, V = v_head_dim;
q [T, H, C+P] (q_nope | rotated q_pe), kvb [N, H, C+V] (k_nope | v), pe [N, P]; out [T, H, V].

Numba kernel: one head per task. The head's queries, keys and values are copied into contiguous
blocks, then the decode kernel's tiles do the work: 4 queries x 4 keys per score tile (`_qk_tile`,
the queries standing in for its heads), exact softmax per row (max-subtracted, vector exp), and
p @ v 4 queries x 64 columns at a time (`_pv_tile4`). Key blocks past a query block's causal
horizon are skipped. No BLAS: numpy's OpenBLAS threads spin-wait after every call and, on a
machine with as many cores as numba threads, halve the speed of the numba kernels that follow
(measured: o_proj 44 -> 88 ms at T = 64 after a batched matmul).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import FM, check, out_array
from ._launch import twin
from ._simd import fadd, fmul, fsub, hsum, load_f32, splat_f32, store_f32, zeros_f32
from .mla import _pv_rest, _pv_tile4, _qk_tile, _vexp

__all__ = ["mla_prefill_ref", "mla_prefill"]


def mla_prefill_ref(q, kvb, pe, start, scale, C):
    """float32 numpy reference (the model's kernels=False path computes the same)."""
    T, H, _ = q.shape
    N = kvb.shape[0]
    s = (np.einsum("thc,nhc->htn", q[..., :C], kvb[..., :C])
         + np.einsum("thp,np->htn", q[..., C:], pe)) * np.float32(scale)        # [H, T, N]
    s[:, np.arange(N)[None, :] > (start + np.arange(T))[:, None]] = -np.inf
    s = np.exp(s - s.max(-1, keepdims=True))
    p = s / s.sum(-1, keepdims=True)
    return np.einsum("htn,nhv->thv", p, kvb[..., C:]).astype(np.float32)


@njit(fastmath=FM, cache=True)
def _softmax_rows(S, Cs, t0, T, start, nvis):
    """Rows t0..t0+3 (< T) of S: exp(s - max) / sum over keys 0..start+t, zero for keys up to nvis."""
    for t in range(t0, min(t0 + 4, T)):
        sb = t * Cs
        n = start + t + 1
        m = S[sb]
        for j in range(1, n):
            if S[sb + j] > m:
                m = S[sb + j]
        mv = splat_f32(m)
        nv = n // 16 * 16
        acc = zeros_f32()
        for j in range(0, nv, 16):
            p = _vexp(fsub(load_f32(S, sb + j), mv))
            store_f32(S, sb + j, p)
            acc = fadd(acc, p)
        tot = hsum(acc)
        for j in range(nv, n):
            p = np.float32(np.exp(S[sb + j] - m))
            S[sb + j] = p
            tot += p
        inv = np.float32(1.0) / tot
        iv = splat_f32(inv)
        for j in range(0, nv, 16):
            store_f32(S, sb + j, fmul(load_f32(S, sb + j), iv))
        for j in range(nv, n):
            S[sb + j] *= inv
        for j in range(n, nvis):
            S[sb + j] = 0.0


@twin
@njit(parallel=True, nogil=True, cache=True)
def _mla_prefill(q, kvb, pe, start, scale, C, out):
    T, H, D = q.shape
    N = kvb.shape[0]
    P = D - C
    V = kvb.shape[2] - C
    Tp = (T + 3) // 4 * 4
    Np = (N + 3) // 4 * 4
    pef = pe.reshape(-1)
    V64 = V // 64 * 64
    for h in prange(H):
        Q = np.zeros((Tp, D), np.float32)                # this head's queries, pre-scaled
        for t in range(T):
            for d in range(D):
                Q[t, d] = q[t, h, d] * scale
        K = np.empty((N, C), np.float32)
        Vh = np.empty((N, V), np.float32)
        for n in range(N):
            for d in range(C):
                K[n, d] = kvb[n, h, d]
            for d in range(V):
                Vh[n, d] = kvb[n, h, C + d]
        S = np.empty((Tp, Np), np.float32)
        O = np.zeros((Tp, V), np.float32)
        scratch = np.zeros(16, np.float32)
        Qf, Kf, Sf, Vf, Of = Q.reshape(-1), K.reshape(-1), S.reshape(-1), Vh.reshape(-1), O.reshape(-1)
        for t0 in range(0, T, 4):
            nvis = min(N, start + t0 + 4)              # keys the block's last query may see
            for j in range(0, nvis, 4):
                last = nvis - 1
                _qk_tile(Qf, D, t0, Kf, pef, C, P, j, min(j + 1, last), min(j + 2, last),
                         min(j + 3, last), scratch)
                for tt in range(4):
                    for kk in range(min(4, nvis - j)):
                        Sf[(t0 + tt) * Np + j + kk] = scratch[tt * 4 + kk]
            _softmax_rows(Sf, Np, t0, T, start, nvis)
            for rb in range(0, V64, 64):
                _pv_tile4(Sf, Np, t0, nvis, 0, Vf, V, Of, rb)
            if V64 < V:
                _pv_rest(Sf, Np, t0, nvis, 0, Vf, V, Of, V64)
        for t in range(T):
            for d in range(V):
                out[t, h, d] = O[t, d]


def mla_prefill(q, kvb, pe, start, scale, C, out=None):
    """out [T, H, V] float32. q [T, H, C+P], kvb [N, H, C+V], pe [N, P] float32, N = start + T."""
    q = check(q, "q", np.float32, 3)
    T, H, D = q.shape
    if not 0 < C < D:
        raise ValueError(f"C: expected 0 < C < {D} (q's last dim), got {C}")
    kvb = check(kvb, "kvb", np.float32, 3, (None, H, None))
    N = kvb.shape[0]
    if N != start + T:
        raise ValueError(f"kvb: expected {start + T} keys (start {start} + {T} queries), got {N}")
    if kvb.shape[2] <= C:
        raise ValueError(f"kvb: expected last dim > C = {C}, got {kvb.shape[2]}")
    pe = check(pe, "pe", np.float32, 2, (N, D - C))
    o = out_array(out, (T, H, kvb.shape[2] - C))
    if T:
        _mla_prefill.pick(H * T * N * (D + kvb.shape[2] - C) // 2)(q, kvb, pe, int(start), np.float32(scale), int(C), o)
    return o
