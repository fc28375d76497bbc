"""Absorbed MLA attention for a chunk of queries (causal) vs a float64 numpy reference; bf16 cache."""
from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K
from kimi_desktop.runtime.kernels import mla_chunk
from kimi_desktop.runtime.kernels._common import bf16_to_f32, f32_to_bf16

from ._util import rng

SCALE = 0.1308608


def _case(T, H, R, P, N, seed, spread=1.0):
    r = rng(seed)
    f = lambda *s: (r.standard_normal(s) * spread).astype(np.float32)
    return f(T, H, R), f(T, H, P), r.standard_normal((N, R)).astype(np.float32), \
        r.standard_normal((N, P)).astype(np.float32)


def _f64(ql, qp, kv, pe, start, scale):
    """Independent float64 form: one query row at a time over its visible keys."""
    T, H, _ = ql.shape
    kv64, pe64 = np.asarray(kv, np.float64), np.asarray(pe, np.float64)
    out = np.empty(ql.shape, np.float64)
    for t in range(T):
        n = start + t + 1
        s = (ql[t].astype(np.float64) @ kv64[:n].T + qp[t].astype(np.float64) @ pe64[:n].T) * scale   # [H, n]
        p = np.exp(s - s.max(-1, keepdims=True))
        out[t] = (p / p.sum(-1, keepdims=True)) @ kv64[:n]
    return out


# awkward sizes: T = 1, 3, 17; N not a multiple of 16 / 128; start > 0; H not a multiple of 4;
# T x H spanning several tasks of MB rows (the last one partial) and key splits (few rows)
CASES = [(1, 1, 16, 16, 1, 0), (1, 3, 20, 5, 300, 299), (3, 5, 64, 16, 17, 9), (3, 7, 96, 32, 300, 297),
         (17, 7, 96, 32, 200, 150), (17, 6, 64, 16, 17, 0), (1, 64, 512, 64, 2 * mla_chunk.CS + 17, 200),
         (17, 64, 512, 64, 333, 316), (40, 64, 32, 16, 50, 10)]   # the last: rows enough for no key split


@pytest.mark.parametrize("T,H,R,P,N,start", CASES)
def test_chunk_fp32(T, H, R, P, N, start):
    ql, qp, kv, pe = _case(T, H, R, P, N, T * 31 + H * 7 + N)
    want = _f64(ql, qp, kv, pe, start, SCALE)
    tol = 2e-6 * np.abs(kv).max()
    got = K.mla_absorbed_chunk(ql, qp, kv, pe, start, SCALE)
    assert got.dtype == np.float32 and got.shape == (T, H, R)
    np.testing.assert_allclose(got, want, atol=tol)
    np.testing.assert_allclose(K.mla_absorbed_chunk_ref(ql, qp, kv, pe, start, SCALE), want, atol=tol)
    np.testing.assert_allclose(K.mla_absorbed_chunk_ref(ql, qp, kv, pe, start, SCALE, np.float64), want, atol=1e-12)


@pytest.mark.parametrize("T,H,R,P,N,start", CASES[1::2])
def test_chunk_bf16(T, H, R, P, N, start):
    ql, qp, kv, pe = _case(T, H, R, P, N, T * 13 + H + N)
    kb, pb = f32_to_bf16(kv), f32_to_bf16(pe)
    kd, pd = bf16_to_f32(kb), bf16_to_f32(pb)            # the values the bf16 cache holds
    want = _f64(ql, qp, kd, pd, start, SCALE)
    got = K.mla_absorbed_chunk(ql, qp, kb, pb, start, SCALE)
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(kd).max())
    np.testing.assert_allclose(K.mla_absorbed_chunk_ref(ql, qp, kb, pb, start, SCALE), want,
                               atol=2e-6 * np.abs(kd).max())


def test_chunk_peaked_softmax_and_unused_rows():
    ql, qp, kv, pe = _case(5, 4, 64, 16, 700, 3, spread=4.0)   # large scores: max-subtraction matters
    nan_kv = np.concatenate([kv, np.full((100, 64), np.nan, np.float32)])   # rows past start + T: never read
    nan_pe = np.concatenate([pe, np.full((100, 16), np.nan, np.float32)])
    got = K.mla_absorbed_chunk(ql, qp, nan_kv, nan_pe, 695, 1.0)
    want = _f64(ql, qp, kv, pe, 695, 1.0)
    # scores reach |s| ~ 40: float32 rounding of a score alone moves a weight by ~1e-6 relative, so the
    # yardstick is the float32 numpy reference's own error on the same case
    ref_err = np.abs(K.mla_absorbed_chunk_ref(ql, qp, kv, pe, 695, 1.0) - want).max()
    assert np.all(np.isfinite(got))
    assert np.abs(got - want).max() <= 2 * ref_err + 1e-6 * np.abs(kv).max()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("H,R,P,N", [(3, 20, 5, 7), (64, 512, 64, 2 * mla_chunk.CS + 33)])
def test_chunk_t1_equals_decode(bf16, H, R, P, N):
    ql, qp, kv, pe = _case(1, H, R, P, N, N + H)
    if bf16:
        kv, pe = f32_to_bf16(kv), f32_to_bf16(pe)
    dec = K.mla_decode_absorbed(ql[0], qp[0], kv, pe, SCALE)
    got = K.mla_absorbed_chunk(ql, qp, kv, pe, N - 1, SCALE)[0]
    # the key ranges are split differently (decode: one per thread; chunk: CS-aligned): the sums
    # round differently, each within 2e-6 x max|kv| of float64 (the tests above)
    np.testing.assert_allclose(got, dec, atol=2e-6 * np.abs(bf16_to_f32(kv) if bf16 else kv).max())


def test_chunk_checks():
    ql, qp, kv, pe = _case(3, 2, 16, 16, 6, 5)
    with pytest.raises(ValueError, match="start"):
        K.mla_absorbed_chunk(ql, qp, kv, pe, 4, 0.1)             # needs 4 + 3 rows
    with pytest.raises(ValueError, match="pe"):
        K.mla_absorbed_chunk(ql, qp, kv, pe[:5], 0, 0.1)
    with pytest.raises(TypeError, match="pe"):
        K.mla_absorbed_chunk(ql, qp, f32_to_bf16(kv), pe, 0, 0.1)   # mixed storage
    with pytest.raises(TypeError, match="kv"):
        K.mla_absorbed_chunk(ql, qp, kv.astype(np.float64), pe, 0, 0.1)
    with pytest.raises(ValueError, match="q_pe"):
        K.mla_absorbed_chunk(ql, qp[:2], kv, pe, 0, 0.1)
