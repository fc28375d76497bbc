"""Absorbed MLA decode attention vs the numpy reference vs float64."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K
from kimi_desktop.runtime.kernels import mla

from kimi_desktop.runtime.kernels._common import bf16_to_f32, f32_to_bf16

from ._util import rng


def _case(H, R, P, N, seed, spread=1.0):
    r = rng(seed)
    f = lambda *s: (r.standard_normal(s) * spread).astype(np.float32)
    return f(H, R), f(H, P), r.standard_normal((N, R)).astype(np.float32), r.standard_normal((N, P)).astype(np.float32)


def _f64(ql, qp, kv, pe, scale):
    s = (ql.astype(np.float64) @ kv.T.astype(np.float64) + qp.astype(np.float64) @ pe.T.astype(np.float64)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ kv.astype(np.float64)


@pytest.mark.parametrize("H,R,P,N", [(1, 16, 16, 1), (3, 20, 5, 3), (5, 64, 16, 17), (7, 96, 32, 300),
                                     (64, 512, 64, 1), (64, 512, 64, 3), (64, 512, 64, 2 * mla.CHUNK + 17)])
def test_mla(H, R, P, N):
    ql, qp, kv, pe = _case(H, R, P, N, H * 7 + N)
    want = _f64(ql, qp, kv, pe, 0.1308608)
    tol = 2e-6 * np.abs(kv).max()
    got = K.mla_decode_absorbed(ql, qp, kv, pe, 0.1308608)
    assert got.dtype == np.float32 and got.shape == (H, R)
    np.testing.assert_allclose(got, want, atol=tol)
    np.testing.assert_allclose(K.mla_decode_absorbed_ref(ql, qp, kv, pe, 0.1308608), want, atol=tol)


@pytest.mark.parametrize("H,R,P,N", [(3, 20, 5, 3), (7, 96, 32, 300), (64, 512, 64, 2 * mla.CHUNK + 17)])
def test_mla_bf16_cache(H, R, P, N):
    """uint16 bf16 bits (and the ml_dtypes view) against float64 on the values the bf16 cache holds."""
    ql, qp, kv, pe = _case(H, R, P, N, H * 5 + N)
    kb, pb = f32_to_bf16(kv), f32_to_bf16(pe)
    kd, pd = bf16_to_f32(kb), bf16_to_f32(pb)
    want = _f64(ql, qp, kd, pd, 0.1308608)
    tol = 2e-6 * np.abs(kd).max()
    np.testing.assert_allclose(K.mla_decode_absorbed(ql, qp, kb, pb, 0.1308608), want, atol=tol)
    np.testing.assert_allclose(K.mla_decode_absorbed(ql, qp, kb.view(ml_dtypes.bfloat16), pb.view(ml_dtypes.bfloat16),
                                                     0.1308608), want, atol=tol)
    np.testing.assert_allclose(K.mla_decode_absorbed_ref(ql, qp, kb, pb, 0.1308608), want, atol=tol)


def test_mla_peaked_softmax_and_prefix_view():
    ql, qp, kv, pe = _case(4, 64, 16, 700, 3, spread=4.0)   # large scores: max-subtraction matters
    cache_kv = np.concatenate([kv, np.full((100, 64), np.nan, np.float32)])   # unused capacity
    cache_pe = np.concatenate([pe, np.full((100, 16), np.nan, np.float32)])
    got = K.mla_decode_absorbed(ql, qp, cache_kv[:700], cache_pe[:700], 1.0)
    np.testing.assert_allclose(got, _f64(ql, qp, kv, pe, 1.0), atol=2e-6 * np.abs(kv).max())


def test_mla_thread_count_invariant():
    ql, qp, kv, pe = _case(8, 64, 16, 5 * mla.CHUNK + 3, 4)
    n = K.policy.fixed_threads
    try:
        K.set_threads(1)
        one = K.mla_decode_absorbed(ql, qp, kv, pe, 0.3)
    finally:
        K.set_threads(n)
    np.testing.assert_allclose(K.mla_decode_absorbed(ql, qp, kv, pe, 0.3), one, atol=1e-6)


def test_mla_checks():
    ql, qp, kv, pe = _case(2, 16, 16, 4, 5)
    with pytest.raises(ValueError, match="pe_cache"):
        K.mla_decode_absorbed(ql, qp, kv, pe[:3], 0.1)
    with pytest.raises(TypeError, match="pe_cache"):
        K.mla_decode_absorbed(ql, qp, f32_to_bf16(kv), pe, 0.1)       # mixed storage
    with pytest.raises(TypeError, match="kv_cache"):
        K.mla_decode_absorbed(ql, qp, kv.astype(np.float64), pe, 0.1)
    with pytest.raises(ValueError, match="empty"):
        K.mla_decode_absorbed(ql, qp, kv[:0], pe[:0], 0.1)
