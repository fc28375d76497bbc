"""MLA decode attention in the absorbed (latent) form, one query token over the latent cache.

    scores[h, t] = (q_lat[h] . kv[t] + q_pe[h] . pe[t]) * scale
    p[h, :]      = softmax(scores[h, :])            float32, max-subtracted
    o_lat[h]     = sum_t p[h, t] kv[t]

Shape legend: H heads (64), R latent rank (512), P rope dim (64), N cached tokens;
q_lat [H, R], q_pe [H, P], kv_cache [N, R], pe_cache [N, P] (float32, or uint16 holding bf16 bits: the
bf16 latent cache; C-contiguous; a prefix slice cache[:N] of a bigger buffer is fine), o_lat [H, R].

Numba kernel: flash-decoding. N is split into one contiguous range per thread, each range into
chunks of CHUNK tokens. Per chunk: scores for 4 heads x 4 tokens at a time (16 register
accumulators along the 576-long dot, one 16-way transpose-reduce `hsum16`), an online softmax
(running max / sum per head, vector exp: Cephes polynomial, ~1 ulp), then p @ kv for 4 heads x 64
columns at a time. Per-thread partial results are merged with the usual log-sum-exp rescaling.
`scale` is folded into the query (rounding differs from the reference at the 1e-7 level).
A bf16 cache is widened one chunk at a time into a float32 scratch block (`_stage`: u16 << 16,
exact) that the same tiles then read; a float32 cache is read in place.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._common import _BF16, FM, as_u16, bf16_to_f32, check, out_array
from ._launch import policy, twin
from ._simd import (bits2f, f2i, fadd, fma, fmax, fmin, fmul, fsub, hsum, hsum16, iadd, ishl, load_f32, load_u16,
                    splat_f32, splat_i32, store_f32, u32_as_f32, zeros_f32)

__all__ = ["mla_decode_absorbed_ref", "mla_decode_absorbed", "CHUNK", "cache_f32", "check_cache"]

CHUNK = 128


def mla_decode_absorbed_ref(q_lat, q_pe, kv_cache, pe_cache, scale):
    """numpy float32 reference (a bf16 cache is decoded to its float32 values first)."""
    kv_cache, pe_cache = cache_f32(kv_cache), cache_f32(pe_cache)
    s = (q_lat @ kv_cache.T + q_pe @ pe_cache.T) * np.float32(scale)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return (p @ kv_cache).astype(np.float32)


def cache_f32(a: np.ndarray) -> np.ndarray:
    """A latent-cache array as float32 values: bf16 bits (uint16) decoded exactly, float32 as is."""
    return bf16_to_f32(a) if a.dtype == np.uint16 else a


def check_cache(kv, pe, R, names=("kv_cache", "pe_cache")):
    """(kv [N, R], pe [N, *]) both float32 or both uint16 bf16 bits (ml_dtypes.bfloat16 accepted)."""
    if isinstance(kv, np.ndarray) and (kv.dtype == np.uint16 or kv.dtype == _BF16):
        kv = as_u16(kv, names[0], 2, (None, R))
    else:
        kv = check(kv, names[0], np.float32, 2, (None, R))
    N = kv.shape[0]
    if kv.dtype == np.uint16:
        pe = as_u16(pe, names[1], 2, (N, None))
    else:
        pe = check(pe, names[1], np.float32, 2, (N, None))
    return kv, pe


# ----------------------------------------------------------------------------- pieces

@njit(fastmath=FM, cache=True, inline="always")
def _vexp(x):
    """exp of 16 float32 lanes (Cephes expf: round(x log2 e), 2-term ln2 reduction, degree-6 poly)."""
    x = fmin(fmax(x, splat_f32(-87.33654)), splat_f32(88.72283))
    n = fsub(fma(x, splat_f32(1.44269504088896341), splat_f32(12582912.0)), splat_f32(12582912.0))
    r = fma(n, splat_f32(-0.693359375), x)
    r = fma(n, splat_f32(2.12194440e-4), r)
    p = splat_f32(1.9875691500e-4)
    p = fma(p, r, splat_f32(1.3981999507e-3))
    p = fma(p, r, splat_f32(8.3334519073e-3))
    p = fma(p, r, splat_f32(4.1665795894e-2))
    p = fma(p, r, splat_f32(1.6666665459e-1))
    p = fma(p, r, splat_f32(5.0000001201e-1))
    p = fadd(fma(fmul(p, r), r, r), splat_f32(1.0))
    return fmul(p, bits2f(ishl(iadd(f2i(n), splat_i32(127)), 23)))


@njit(fastmath=FM, cache=True)
def _widen(src, off, n, dst):
    """dst[:n] = float32(bf16 src.flat[off : off+n]) (exact: the bits shifted into the high half)."""
    nv = n // 16 * 16
    for i in range(0, nv, 16):
        store_f32(dst, i, bits2f(ishl(load_u16(src, off + i), 16)))
    for i in range(nv, n):
        dst[i] = u32_as_f32(np.uint32(src[off + i]) << 16)


def _stage(kvf, pef, j0, n, R, P, kvs, pes):
    """(kv, pe, base): where keys j0..j0+n-1 are read as float32 rows base..base+n-1 (numba only)."""
    raise NotImplementedError


@overload(_stage, jit_options={"fastmath": FM})
def _stage_impl(kvf, pef, j0, n, R, P, kvs, pes):
    if kvf.dtype == types.float32:
        def stage_f32(kvf, pef, j0, n, R, P, kvs, pes):   # read in place
            return kvf, pef, j0
        return stage_f32

    def stage_bf16(kvf, pef, j0, n, R, P, kvs, pes):      # widen the chunk into the scratch rows 0..n-1
        _widen(kvf, j0 * R, n * R, kvs)
        _widen(pef, j0 * P, n * P, pes)
        return kvs, pes, 0
    return stage_bf16


@njit(fastmath=FM, cache=True)
def _qk_tile(Q, D, h0, kvf, pef, R, P, t0, t1, t2, t3, scratch):
    """scratch[hh*4 + tt] = Q[h0+hh] . [kv|pe][t_tt] for hh, tt in 0..3."""
    c00 = zeros_f32(); c01 = zeros_f32(); c02 = zeros_f32(); c03 = zeros_f32()
    c10 = zeros_f32(); c11 = zeros_f32(); c12 = zeros_f32(); c13 = zeros_f32()
    c20 = zeros_f32(); c21 = zeros_f32(); c22 = zeros_f32(); c23 = zeros_f32()
    c30 = zeros_f32(); c31 = zeros_f32(); c32 = zeros_f32(); c33 = zeros_f32()
    for part in range(2):               # the latent part (kv, R wide), then the rope part (pe, P wide)
        src, L, qo = (kvf, R, 0) if part == 0 else (pef, P, R)
        q0 = h0 * D + qo; q1 = q0 + D; q2 = q1 + D; q3 = q2 + D
        k0 = t0 * L; k1 = t1 * L; k2 = t2 * L; k3 = t3 * L
        for d in range(0, L // 16 * 16, 16):
            a = load_f32(src, k0 + d); b = load_f32(src, k1 + d); c = load_f32(src, k2 + d); e = load_f32(src, k3 + d)
            q = load_f32(Q, q0 + d)
            c00 = fma(q, a, c00); c01 = fma(q, b, c01); c02 = fma(q, c, c02); c03 = fma(q, e, c03)
            q = load_f32(Q, q1 + d)
            c10 = fma(q, a, c10); c11 = fma(q, b, c11); c12 = fma(q, c, c12); c13 = fma(q, e, c13)
            q = load_f32(Q, q2 + d)
            c20 = fma(q, a, c20); c21 = fma(q, b, c21); c22 = fma(q, c, c22); c23 = fma(q, e, c23)
            q = load_f32(Q, q3 + d)
            c30 = fma(q, a, c30); c31 = fma(q, b, c31); c32 = fma(q, c, c32); c33 = fma(q, e, c33)
    store_f32(scratch, 0, hsum16(c00, c01, c02, c03, c10, c11, c12, c13,
                                 c20, c21, c22, c23, c30, c31, c32, c33))
    Rv, Pv = R // 16 * 16, P // 16 * 16
    if Rv < R or Pv < P:   # scalar tails of the dot products
        for hh in range(4):
            qb = (h0 + hh) * D
            for tt in range(4):
                t = (t0, t1, t2, t3)[tt]
                s = np.float32(0.0)
                for d in range(Rv, R):
                    s += Q[qb + d] * kvf[t * R + d]
                for d in range(Pv, P):
                    s += Q[qb + R + d] * pef[t * P + d]
                scratch[hh * 4 + tt] += s


@njit(fastmath=FM, cache=True)
def _pv_tile4(Pm, Cs, h0, n, j0, kvf, R, O, rb):
    """O[h0+hh, rb : rb+64] += sum_j Pm[h0+hh, j] kv[j0+j, rb : rb+64], hh in 0..3."""
    o0 = h0 * R + rb; o1 = o0 + R; o2 = o1 + R; o3 = o2 + R
    a00 = load_f32(O, o0); a01 = load_f32(O, o0 + 16); a02 = load_f32(O, o0 + 32); a03 = load_f32(O, o0 + 48)
    a10 = load_f32(O, o1); a11 = load_f32(O, o1 + 16); a12 = load_f32(O, o1 + 32); a13 = load_f32(O, o1 + 48)
    a20 = load_f32(O, o2); a21 = load_f32(O, o2 + 16); a22 = load_f32(O, o2 + 32); a23 = load_f32(O, o2 + 48)
    a30 = load_f32(O, o3); a31 = load_f32(O, o3 + 16); a32 = load_f32(O, o3 + 32); a33 = load_f32(O, o3 + 48)
    p0 = h0 * Cs; p1 = p0 + Cs; p2 = p1 + Cs; p3 = p2 + Cs
    for j in range(n):
        kb = (j0 + j) * R + rb
        v0 = load_f32(kvf, kb); v1 = load_f32(kvf, kb + 16); v2 = load_f32(kvf, kb + 32); v3 = load_f32(kvf, kb + 48)
        p = splat_f32(Pm[p0 + j])
        a00 = fma(p, v0, a00); a01 = fma(p, v1, a01); a02 = fma(p, v2, a02); a03 = fma(p, v3, a03)
        p = splat_f32(Pm[p1 + j])
        a10 = fma(p, v0, a10); a11 = fma(p, v1, a11); a12 = fma(p, v2, a12); a13 = fma(p, v3, a13)
        p = splat_f32(Pm[p2 + j])
        a20 = fma(p, v0, a20); a21 = fma(p, v1, a21); a22 = fma(p, v2, a22); a23 = fma(p, v3, a23)
        p = splat_f32(Pm[p3 + j])
        a30 = fma(p, v0, a30); a31 = fma(p, v1, a31); a32 = fma(p, v2, a32); a33 = fma(p, v3, a33)
    store_f32(O, o0, a00); store_f32(O, o0 + 16, a01); store_f32(O, o0 + 32, a02); store_f32(O, o0 + 48, a03)
    store_f32(O, o1, a10); store_f32(O, o1 + 16, a11); store_f32(O, o1 + 32, a12); store_f32(O, o1 + 48, a13)
    store_f32(O, o2, a20); store_f32(O, o2 + 16, a21); store_f32(O, o2 + 32, a22); store_f32(O, o2 + 48, a23)
    store_f32(O, o3, a30); store_f32(O, o3 + 16, a31); store_f32(O, o3 + 32, a32); store_f32(O, o3 + 48, a33)


@njit(fastmath=FM, cache=True)
def _pv_rest(Pm, Cs, h0, n, j0, kvf, R, O, rstart):
    """Columns rstart..R-1 (fewer than 64): 16-wide vectors, then scalars."""
    r = rstart
    while r + 16 <= R:
        for hh in range(4):
            a = load_f32(O, (h0 + hh) * R + r)
            for j in range(n):
                a = fma(splat_f32(Pm[(h0 + hh) * Cs + j]), load_f32(kvf, (j0 + j) * R + r), a)
            store_f32(O, (h0 + hh) * R + r, a)
        r += 16
    for c in range(r, R):
        for hh in range(4):
            s = O[(h0 + hh) * R + c]
            for j in range(n):
                s += Pm[(h0 + hh) * Cs + j] * kvf[(j0 + j) * R + c]
            O[(h0 + hh) * R + c] = s


@njit(fastmath=FM, cache=True)
def _partition(Q, Hp, D, kvf, pef, R, P, lo, hi, m, l, O, S, scratch, kvs, pes):
    """Online-softmax attention of all Hp heads over tokens lo..hi-1 -> running (m, l, O)."""
    Cs = S.shape[0] // Hp
    for j0 in range(lo, hi, Cs):
        n = min(Cs, hi - j0)
        kb, pb, b0 = _stage(kvf, pef, j0, n, R, P, kvs, pes)
        # scores
        for h0 in range(0, Hp, 4):
            for jj in range(0, n, 4):
                t0 = b0 + jj
                t1 = min(t0 + 1, b0 + n - 1)
                t2 = min(t0 + 2, b0 + n - 1)
                t3 = min(t0 + 3, b0 + n - 1)
                _qk_tile(Q, D, h0, kb, pb, R, P, t0, t1, t2, t3, scratch)
                for hh in range(4):
                    for tt in range(min(4, n - jj)):
                        S[(h0 + hh) * Cs + jj + tt] = scratch[hh * 4 + tt]
        # online softmax per head; S becomes p
        nv = n // 16 * 16
        for h in range(Hp):
            sb = h * Cs
            mc = m[h]
            for j in range(n):
                if S[sb + j] > mc:
                    mc = S[sb + j]
            alpha = np.float32(math.exp(m[h] - mc)) if m[h] > -np.inf else np.float32(0.0)
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
            tot += hsum(ssum)
            l[h] = l[h] * alpha + tot
            m[h] = mc
            if alpha != 1.0:
                av = splat_f32(alpha)
                Rv = R // 16 * 16
                for c in range(0, Rv, 16):
                    store_f32(O, h * R + c, fmul(load_f32(O, h * R + c), av))
                for c in range(Rv, R):
                    O[h * R + c] *= alpha
        # p @ kv
        R64 = R // 64 * 64
        for h0 in range(0, Hp, 4):
            for rb in range(0, R64, 64):
                _pv_tile4(S, Cs, h0, n, b0, kb, R, O, rb)
            if R64 < R:
                _pv_rest(S, Cs, h0, n, b0, kb, R, O, R64)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _mla(Q, Hp, kv, pe, nparts, pm, pl, pO):
    N, R = kv.shape
    P = pe.shape[1]
    D = R + P
    kvf = kv.reshape(-1)
    pef = pe.reshape(-1)
    per = (N + nparts - 1) // nparts
    for ip in prange(nparts):
        lo = ip * per
        hi = min(N, lo + per)
        S = np.empty(Hp * CHUNK, np.float32)
        scratch = np.zeros(16, np.float32)
        kvs = np.empty(CHUNK * R, np.float32)     # bf16 staging (unused for a float32 cache)
        pes = np.empty(CHUNK * P, np.float32)
        m = pm[ip]
        l = pl[ip]
        O = pO[ip].reshape(-1)
        for h in range(Hp):
            m[h] = -np.inf
            l[h] = 0.0
        O[:] = 0.0
        if lo < hi:
            _partition(Q, Hp, D, kvf, pef, R, P, lo, hi, m, l, O, S, scratch, kvs, pes)


@njit(cache=True)
def _merge(pm, pl, pO, H, out):
    nparts = pm.shape[0]
    R = out.shape[1]
    for h in range(H):
        M = -np.inf
        for ip in range(nparts):
            if pm[ip, h] > M:
                M = pm[ip, h]
        den = 0.0
        acc = np.zeros(R, np.float64)
        for ip in range(nparts):
            if pl[ip, h] > 0.0:
                w = math.exp(np.float64(pm[ip, h]) - M)
                den += pl[ip, h] * w
                for c in range(R):
                    acc[c] += pO[ip, h, c] * w
        for c in range(R):
            out[h, c] = np.float32(acc[c] / den)


def mla_decode_absorbed(q_lat, q_pe, kv_cache, pe_cache, scale, out=None):
    """o_lat [H, R] float32. q_lat [H, R], q_pe [H, P] float32; kv_cache [N, R], pe_cache [N, P] both
    float32 or both uint16 (bf16 bits)."""
    q_lat = check(q_lat, "q_lat", np.float32, 2)
    H, R = q_lat.shape
    q_pe = check(q_pe, "q_pe", np.float32, 2, (H, None))
    P = q_pe.shape[1]
    kv_cache, pe_cache = check_cache(kv_cache, pe_cache, R)
    N = kv_cache.shape[0]
    if pe_cache.shape[1] != P:
        raise ValueError(f"pe_cache: expected shape ({N}, {P}), got {pe_cache.shape}")
    if N == 0:
        raise ValueError("kv_cache: empty (N = 0): nothing to attend to")
    o = out_array(out, (H, R))
    Hp = (H + 3) // 4 * 4
    Q = np.zeros((Hp, R + P), np.float32)
    Q[:H, :R] = q_lat * np.float32(scale)
    Q[:H, R:] = q_pe * np.float32(scale)
    nparts = max(1, min(policy.width(), -(-N // CHUNK)))     # not the load-dependent count: same bits
    pm = np.empty((nparts, Hp), np.float32)
    pl = np.empty((nparts, Hp), np.float32)
    pO = np.empty((nparts, Hp, R), np.float32)
    _mla.pick(2 * N * Hp * (R + P))(Q.reshape(-1), Hp, kv_cache, pe_cache, nparts, pm, pl, pO)
    _merge(pm, pl, pO, H, o)
    return o
