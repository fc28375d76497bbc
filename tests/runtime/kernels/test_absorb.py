import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.runtime.kernels.absorb import absorb_out, absorb_out_ref, absorb_q, absorb_q_ref

CASES = [(1, 3, 5, 7), (4, 32, 48, 64), (3, 17, 9, 130)]   # H, C, V, R


def _kv_b(rng, H, C, V, R):
    """kv_b bf16 [H*(C+V), R] and the same values in float64 [H, C+V, R]."""
    kv_b = rng.standard_normal((H * (C + V), R)).astype(ml_dtypes.bfloat16)
    return kv_b, kv_b.astype(np.float64).reshape(H, C + V, R)


def _assert_close(got, ref, exact, bound):
    assert got.shape == exact.shape
    assert np.abs(ref - exact).max() <= 1e-6 * bound
    assert np.abs(got - exact).max() <= 1e-6 * bound


@pytest.mark.parametrize("H,C,V,R", CASES)
def test_absorb_q_matches_reference_and_float64(H, C, V, R):
    rng = np.random.default_rng(H * 100 + R)
    kv_b, w64 = _kv_b(rng, H, C, V, R)
    q = rng.standard_normal((H, C)).astype(np.float32)
    exact = np.einsum("hc,hcr->hr", q.astype(np.float64), w64[:, :C])
    bound = np.einsum("hc,hcr->hr", np.abs(q.astype(np.float64)), np.abs(w64[:, :C])).max()
    _assert_close(absorb_q(kv_b, q, C, V), absorb_q_ref(kv_b.view(np.uint16), q, C, V), exact, bound)


@pytest.mark.parametrize("H,C,V,R", CASES)
def test_absorb_out_matches_reference_and_float64(H, C, V, R):
    rng = np.random.default_rng(H * 10 + V)
    kv_b, w64 = _kv_b(rng, H, C, V, R)
    o_lat = rng.standard_normal((H, R)).astype(np.float32)
    exact = np.einsum("hvr,hr->hv", w64[:, C:], o_lat.astype(np.float64))
    bound = np.einsum("hvr,hr->hv", np.abs(w64[:, C:]), np.abs(o_lat.astype(np.float64))).max()
    _assert_close(absorb_out(kv_b, o_lat, C, V), absorb_out_ref(kv_b.view(np.uint16), o_lat, C, V), exact, bound)


def test_absorb_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kv_b"):
        absorb_q(np.zeros((11, 4), np.uint16), np.zeros((2, 3), np.float32), 3, 2)
    with pytest.raises(ValueError, match="q_nope"):
        absorb_q(np.zeros((10, 4), np.uint16), np.zeros((2, 4), np.float32), 3, 2)
    with pytest.raises(ValueError, match="o_lat"):
        absorb_out(np.zeros((10, 4), np.uint16), np.zeros((2, 3), np.float32), 3, 2)
