"""Causal MLA prefill attention (latent expanded) vs the numpy reference vs float64."""
from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K

from ._util import rng


def _case(T, start, H, C, P, V, seed, spread=1.0):
    r = rng(seed)
    N = start + T
    f = lambda *s: (r.standard_normal(s) * spread).astype(np.float32)
    q = f(T, H, C + P)
    return q, r.standard_normal((N, H, C + V)).astype(np.float32), r.standard_normal((N, P)).astype(np.float32)


def _f64(q, kvb, pe, start, scale, C):
    q, kvb, pe = (a.astype(np.float64) for a in (q, kvb, pe))
    T, H, _ = q.shape
    out = np.zeros((T, H, kvb.shape[2] - C))
    for t in range(T):
        n = start + t + 1                                   # causal: keys 0..start+t
        for h in range(H):
            s = (kvb[:n, h, :C] @ q[t, h, :C] + pe[:n] @ q[t, h, C:]) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ kvb[:n, h, C:]
    return out


@pytest.mark.parametrize("T,start,H,C,P,V", [
    (1, 0, 1, 16, 16, 16), (1, 5, 2, 16, 16, 48), (3, 0, 3, 20, 5, 7), (5, 2, 4, 32, 16, 48),
    (7, 9, 5, 16, 16, 64), (17, 0, 4, 128, 64, 128), (64, 0, 3, 128, 64, 128), (13, 40, 2, 48, 32, 80)])
def test_mla_prefill(T, start, H, C, P, V):
    q, kvb, pe = _case(T, start, H, C, P, V, T * 31 + start + H)
    scale = 0.1308608
    want = _f64(q, kvb, pe, start, scale, C)
    tol = 2e-6 * np.abs(kvb).max()
    got = K.mla_prefill(q, kvb, pe, start, scale, C)
    assert got.dtype == np.float32 and got.shape == (T, H, V)
    np.testing.assert_allclose(got, want, atol=tol)
    np.testing.assert_allclose(K.mla_prefill_ref(q, kvb, pe, start, scale, C), want, atol=tol)


def test_mla_prefill_peaked_softmax():
    q, kvb, pe = _case(9, 3, 2, 32, 16, 32, 7, spread=6.0)   # large scores: max-subtraction matters
    np.testing.assert_allclose(K.mla_prefill(q, kvb, pe, 3, 1.0, 32), _f64(q, kvb, pe, 3, 1.0, 32),
                               atol=2e-6 * np.abs(kvb).max())


def test_mla_prefill_causal():
    """Changing a later token's key and value leaves earlier queries' outputs alone."""
    q, kvb, pe = _case(6, 2, 2, 16, 16, 16, 8)
    a = K.mla_prefill(q, kvb, pe, 2, 0.2, 16)
    kvb2, pe2 = kvb.copy(), pe.copy()
    kvb2[5:] += 3.0
    pe2[5:] -= 2.0
    b = K.mla_prefill(q, kvb2, pe2, 2, 0.2, 16)
    np.testing.assert_array_equal(a[:3], b[:3])              # queries at positions 2..4
    assert np.abs(a[3:] - b[3:]).max() > 1e-3


def test_mla_prefill_checks():
    q, kvb, pe = _case(3, 1, 2, 16, 16, 16, 9)
    with pytest.raises(ValueError, match="kvb: expected 4 keys"):
        K.mla_prefill(q, kvb[:3], pe[:3], 1, 0.1, 16)
    with pytest.raises(ValueError, match="pe"):
        K.mla_prefill(q, kvb, pe[:, :8], 1, 0.1, 16)
    with pytest.raises(ValueError, match="C: expected"):
        K.mla_prefill(q, kvb, pe, 1, 0.1, 32)
