"""Absorbed (latent) MLA attention for a chunk of queries over a long latent cache, causal.

    scores[t, h, n] = (q_lat[t, h] . kv[n] + q_pe[t, h] . pe[n]) * scale,   n <= start + t
    p[t, h, :]      = softmax(scores[t, h, :])          float32, max-subtracted
    o_lat[t, h]     = sum_n p[t, h, n] kv[n]

Shape legend: T queries (positions start..start+T-1), H heads, R latent rank (512), P rope dim (64),
N cache rows (N >= start + T; rows past start + T - 1 are never read);
q_lat [T, H, R], q_pe [T, H, P] float32; kv [N, R], pe [N, P] both float32 or both uint16 holding
bf16 bits (the bf16 latent cache); o_lat [T, H, R] float32. Memory: O(N x R) input plus
O(T x H x R) state: the per-head keys are never expanded.

Numba kernel: every (t, h) pair is a query row against the SAME keys, so the chunk is a
flash-attention GEMM with M = T x H rows. Rows (t-major, heads padded to a multiple of 4) go in
tasks of MB rows; each task walks the keys in blocks of CS (a bf16 block is widened once into a
float32 scratch block that stays in L2 while all MB rows use it), and per 4-row group computes
4 x 4 score tiles (mla._qk_tile), an online softmax (running max / sum, rescaled output) and
p @ kv 4 rows x 64 columns at a time (mla._pv_tile4). Blocks past a group's causal horizon are
skipped. When there are too few tasks for the threads (small T x H: decode-like), the keys are
also split into ranges, merged by log-sum-exp rescaling in float64. The split depends only on
the shapes and policy.width(), never on the load: the same bits at any moment.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import FM, check, out_array
from ._launch import policy, twin
from ._simd import fadd, fmul, fsub, hsum, load_f32, splat_f32, store_f32, zeros_f32
from .mla import _pv_rest, _pv_tile4, _qk_tile, _stage, _vexp, cache_f32, check_cache

__all__ = ["mla_absorbed_chunk_ref", "mla_absorbed_chunk", "MB", "CS"]

MB = 64     # query rows per task (a multiple of 4): 64 x 576 float32 = 147 KB of queries
CS = 128    # keys per block: 128 x 576 float32 = 295 KB, L2-resident with the task's rows and output


def mla_absorbed_chunk_ref(q_lat, q_pe, kv, pe, start, scale, dtype=np.float32):
    """numpy reference, computed in `dtype` (float32 or float64) and returned in it; a bf16 cache is
    decoded to its float values first."""
    T = q_lat.shape[0]
    n = start + T
    kv = cache_f32(kv)[:n].astype(dtype)
    pe = cache_f32(pe)[:n].astype(dtype)
    s = (np.einsum("thr,nr->htn", q_lat.astype(dtype), kv)
         + np.einsum("thp,np->htn", q_pe.astype(dtype), pe)) * dtype(scale)          # [H, T, n]
    s[:, np.arange(n)[None, :] > (start + np.arange(T))[:, None]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("htn,nr->thr", p, kv)


@njit(fastmath=FM, cache=True)
def _online_rows(S, Cs, r0, n, m, l, O, R):
    """Rows r0..r0+3 of S (n scores each) become exp(s - m_new); running (m, l) and O rows rescaled."""
    nv = n // 16 * 16
    for r in range(r0, r0 + 4):
        sb = r * Cs
        mc = m[r]
        for j in range(n):
            if S[sb + j] > mc:
                mc = S[sb + j]
        alpha = np.float32(math.exp(m[r] - mc)) if m[r] > -np.inf else np.float32(0.0)
        mv = splat_f32(mc)
        ssum = zeros_f32()
        for j in range(0, nv, 16):
            p = _vexp(fsub(load_f32(S, sb + j), mv))
            store_f32(S, sb + j, p)
            ssum = fadd(ssum, p)
        tot = np.float32(0.0)
        for j in range(nv, n):
            p = np.float32(math.exp(S[sb + j] - mc))
            S[sb + j] = p
            tot += p
        l[r] = l[r] * alpha + tot + hsum(ssum)
        m[r] = mc
        if alpha != 1.0:
            av = splat_f32(alpha)
            Rv = R // 16 * 16
            for c in range(0, Rv, 16):
                store_f32(O, r * R + c, fmul(load_f32(O, r * R + c), av))
            for c in range(Rv, R):
                O[r * R + c] *= alpha


@njit(fastmath=FM, cache=True)
def _task(Q, D, R, P, kvf, pef, g0, ng, hor, lo, hi, m, l, O, S, kvs, pes, scratch):
    """Row groups g0..g0+ng-1 (4 rows each, local rows 0..4ng-1) over keys lo..hi-1 -> (m, l, O)."""
    R64 = R // 64 * 64
    for j0 in range(lo, hi, CS):
        n = min(CS, hi - j0)
        kb, pb, b0 = _stage(kvf, pef, j0, n, R, P, kvs, pes)
        for g in range(ng):
            nv = min(n, hor[g0 + g] - j0)           # keys of this block the group's query sees
            if nv <= 0:
                continue
            r0 = 4 * g
            last = b0 + nv - 1
            for jj in range(0, nv, 4):
                t0 = b0 + jj
                _qk_tile(Q, D, 4 * (g0 + g), kb, pb, R, P, t0, min(t0 + 1, last), min(t0 + 2, last),
                         min(t0 + 3, last), scratch)
                for hh in range(4):
                    for tt in range(min(4, nv - jj)):
                        S[(r0 + hh) * CS + jj + tt] = scratch[hh * 4 + tt]
            _online_rows(S, CS, r0, nv, m, l, O, R)
            for rb in range(0, R64, 64):
                _pv_tile4(S, CS, r0, nv, b0, kb, R, O, rb)
            if R64 < R:
                _pv_rest(S, CS, r0, nv, b0, kb, R, O, R64)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _chunk(Q, D, kv, pe, hor, nsplit, per, pm, pl, pO, out):
    """pm, pl [nsplit, M], pO [nsplit, M, R]: split sp's (max, sum, unnormalized output) per row;
    with one split the normalized rows go straight to out [T, H, R] instead (pO unused)."""
    R = kv.shape[1]
    P = pe.shape[1]
    G = hor.shape[0]
    gpt = MB // 4
    ntask = (G + gpt - 1) // gpt
    kvf = kv.reshape(-1)
    pef = pe.reshape(-1)
    for it in prange(ntask * nsplit):
        task, sp = it // nsplit, it % nsplit
        g0 = task * gpt
        ng = min(gpt, G - g0)
        lo = sp * per
        hi = min(lo + per, hor[g0 + ng - 1])        # groups are t-major: the last sees the most keys
        rows = 4 * ng
        m = np.full(rows, -np.inf, np.float32)
        l = np.zeros(rows, np.float32)
        O = np.zeros(rows * R, np.float32)
        if lo < hi:
            S = np.empty(MB * CS, np.float32)
            kvs = np.empty(CS * R, np.float32)      # bf16 staging (unused for a float32 cache)
            pes = np.empty(CS * P, np.float32)
            scratch = np.zeros(16, np.float32)
            _task(Q, D, R, P, kvf, pef, g0, ng, hor, lo, hi, m, l, O, S, kvs, pes, scratch)
        if nsplit == 1:
            H, Hp = out.shape[1], (out.shape[1] + 3) // 4 * 4
            for r in range(rows):
                t, h = (4 * g0 + r) // Hp, (4 * g0 + r) % Hp
                if h < H:
                    inv = np.float32(1.0) / l[r]
                    for c in range(R):
                        out[t, h, c] = O[r * R + c] * inv
            continue
        for r in range(rows):
            pm[sp, 4 * g0 + r] = m[r]
            pl[sp, 4 * g0 + r] = l[r]
            for c in range(R):
                pO[sp, 4 * g0 + r, c] = O[r * R + c]


@njit(cache=True)
def _merge(pm, pl, pO, T, H, Hp, out):
    """out[t, h] = sum_sp e^(m_sp - M) O_sp / sum_sp e^(m_sp - M) l_sp (float64)."""
    nsplit, _, R = pO.shape
    acc = np.empty(R, np.float64)
    for t in range(T):
        for h in range(H):
            row = t * Hp + h
            M = -np.inf
            for sp in range(nsplit):
                M = max(M, np.float64(pm[sp, row]))
            den = 0.0
            acc[:] = 0.0
            for sp in range(nsplit):
                if pl[sp, row] > 0.0:
                    w = math.exp(np.float64(pm[sp, row]) - M)
                    den += pl[sp, row] * w
                    for c in range(R):
                        acc[c] += pO[sp, row, c] * w
            for c in range(R):
                out[t, h, c] = np.float32(acc[c] / den)


def _plan(G: int, keys: int) -> tuple[int, int]:
    """(nsplit, keys per split, a multiple of CS): split the keys only when the row tasks are too
    few to keep every thread busy."""
    ntask = _cdiv(G, MB // 4)
    want = 2 * policy.width()                       # not the load-dependent count: same bits
    nsplit = 1 if ntask >= want else min(_cdiv(want, ntask), _cdiv(keys, CS))
    per = _cdiv(_cdiv(keys, nsplit), CS) * CS
    return _cdiv(keys, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def mla_absorbed_chunk(q_lat, q_pe, kv, pe, start, scale, out=None):
    """o_lat [T, H, R] float32 for queries at positions start..start+T-1 (see the module doc)."""
    q_lat = check(q_lat, "q_lat", np.float32, 3)
    T, H, R = q_lat.shape
    q_pe = check(q_pe, "q_pe", np.float32, 3, (T, H, None))
    P = q_pe.shape[2]
    kv, pe = check_cache(kv, pe, R, ("kv", "pe"))
    if pe.shape[1] != P:
        raise ValueError(f"pe: expected shape ({kv.shape[0]}, {P}), got {pe.shape}")
    start = int(start)
    if start < 0 or kv.shape[0] < start + T:
        raise ValueError(f"kv: expected at least start + T = {start} + {T} rows (start >= 0), got {kv.shape[0]}")
    o = out_array(out, (T, H, R))
    if T == 0 or H == 0:
        return o
    Hp = (H + 3) // 4 * 4
    D = R + P
    Q = np.zeros((T, Hp, D), np.float32)          # rows t-major, pre-scaled, padding heads zero
    Q[:, :H, :R] = q_lat * np.float32(scale)
    Q[:, :H, R:] = q_pe * np.float32(scale)
    hor = (start + 1 + np.arange(T * Hp // 4, dtype=np.int64) * 4 // Hp).astype(np.int64)   # keys per group
    keys = start + T
    nsplit, per = _plan(len(hor), keys)
    M = T * Hp if nsplit > 1 else 0                # one split: no partials, rows go straight to o
    pm = np.empty((nsplit, M), np.float32)
    pl = np.empty((nsplit, M), np.float32)
    pO = np.empty((nsplit, M, R), np.float32)
    work = T * Hp * (start + (T + 1) / 2) * (D + R)
    _chunk.pick(work)(Q.reshape(-1), D, kv, pe, hor, nsplit, per, pm, pl, pO, o)
    if nsplit > 1:
        _merge(pm, pl, pO, T, H, Hp, o)
    return o
