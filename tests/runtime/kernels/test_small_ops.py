"""rmsnorm, interleaved RoPE, noaux_tc router: numba vs the numpy reference vs float64."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K

from ._util import rng


@pytest.mark.parametrize("T,d", [(1, 7), (3, 100), (17, 7168), (2, 1536)])
def test_rmsnorm(T, d):
    r = rng(T * 10 + d)
    x = (r.standard_normal((T, d)) * 3).astype(np.float32)
    w = r.standard_normal(d).astype(np.float32)
    x64 = x.astype(np.float64)
    want = w * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    for got in (K.rmsnorm(x, w, 1e-6), K.rmsnorm_ref(x, w, 1e-6)):
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    np.testing.assert_array_equal(K.rmsnorm(x[0], w, 1e-6), K.rmsnorm(x[:1], w, 1e-6)[0])


def test_rmsnorm_bf16_weight_and_checks():
    r = rng(1)
    x = r.standard_normal((3, 64)).astype(np.float32)
    wb = r.standard_normal(64).astype(np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(K.rmsnorm(x, wb, 1e-6), K.rmsnorm(x, wb.astype(np.float32), 1e-6))
    np.testing.assert_array_equal(K.rmsnorm(x, wb.view(np.uint16), 1e-6), K.rmsnorm(x, wb.astype(np.float32), 1e-6))
    with pytest.raises(ValueError, match="w"):
        K.rmsnorm(x, np.ones(63, np.float32), 1e-6)


INV = (1.0 / 50000 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)


@pytest.mark.parametrize("T,H", [(1, 1), (3, 5), (17, 64)])
def test_rope(T, H):
    r = rng(T + H)
    x = r.standard_normal((T, H, 64)).astype(np.float32)
    pos = r.integers(0, 300000, T)
    got = K.rope_interleaved(x, pos, INV)
    np.testing.assert_array_equal(got, K.rope_interleaved_ref(x, pos, INV))
    ang = pos.astype(np.float64)[:, None, None] * INV.astype(np.float64)[None, None, :]
    e, o = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    want = np.empty(x.shape)
    want[..., 0::2] = e * np.cos(ang) - o * np.sin(ang)
    want[..., 1::2] = e * np.sin(ang) + o * np.cos(ang)
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(x).max() * 4)
    np.testing.assert_array_equal(K.rope_interleaved(x, pos, INV, fp32_angles=True, mscale=1.5),
                                  K.rope_interleaved_ref(x, pos, INV, fp32_angles=True, mscale=1.5))
    y = x.copy()
    assert K.rope_interleaved(y, pos, INV, out=y) is y
    np.testing.assert_array_equal(y, got)
    np.testing.assert_array_equal(K.rope_interleaved(np.ascontiguousarray(x[:, 0]), pos, INV), got[:, 0])  # [T, d]


def test_rope_position_zero_is_identity_and_checks():
    x = rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_array_equal(K.rope_interleaved(x, np.zeros(2, np.int64), INV[:4]), x)
    with pytest.raises(ValueError, match="positions"):
        K.rope_interleaved(x, np.zeros(3, np.int64), INV[:4])
    with pytest.raises(ValueError, match="inv_freq"):
        K.rope_interleaved(x, np.zeros(2, np.int64), INV[:3])


ROUTER_CASES = [  # T, E, n_group, topk_group, top_k
    (1, 384, 1, 1, 8), (17, 256, 8, 4, 8), (3, 64, 8, 3, 6), (5, 16, 4, 1, 8), (3, 384, 1, 1, 8)]


@pytest.mark.parametrize("T,E,ng,tg,k", ROUTER_CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_reference(T, E, ng, tg, k, norm):
    r = rng(T * E + ng + k)
    logits = r.standard_normal((T, E)).astype(np.float32)
    bias = (r.standard_normal(E) * 0.1).astype(np.float32)
    logits[0, :6] = logits[0, 6]            # ties inside a group
    if T > 1:
        logits[1] = 0.0                     # all equal: lowest indices win
        bias[:] = 0.0
    i1, w1 = K.router_topk(logits, bias, ng, tg, k, norm, 2.827)
    i2, w2 = K.router_topk_ref(logits, bias, ng, tg, k, norm, 2.827)
    assert i1.dtype == np.int32 and w1.dtype == np.float32 and i1.shape == (T, k)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(w1, w2, rtol=1e-6)
    if T > 1 and ng == 1:
        assert i1[1].tolist() == list(range(k))
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    want = np.take_along_axis(s, i1.astype(np.int64), -1)
    if norm:
        want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(w1, want * 2.827, rtol=1e-6)


def test_router_group_limit_and_nan():
    E, ng = 16, 4
    logits = np.full((1, E), -5.0, np.float32)
    logits[0, [0, 1]] = 3.0                 # group 0 strong
    logits[0, [13]] = 4.0                   # group 3 has the best single expert but weak top-2
    logits[0, 5] = np.nan
    bias = np.zeros(E, np.float32)
    idx, w = K.router_topk(logits, bias, ng, 1, 2, True, 1.0)
    assert idx.tolist() == [[0, 1]] and abs(w.sum() - 1.0) < 1e-6
    idx2, _ = K.router_topk(logits, bias, ng, 2, 3, True, 1.0)
    i_ref, _ = K.router_topk_ref(logits, bias, ng, 2, 3, True, 1.0)
    np.testing.assert_array_equal(idx2, i_ref)
    assert 5 not in idx2


def test_router_checks():
    with pytest.raises(ValueError, match="n_group"):
        K.router_topk(np.zeros((1, 10), np.float32), np.zeros(10, np.float32), 3, 1, 2, True, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        K.router_topk(np.zeros((1, 8), np.float32), np.zeros(8, np.float32), 1, 1, 9, True, 1.0)
