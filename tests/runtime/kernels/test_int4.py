"""INT4 group-32 kernels (stored pack-quantized layout) vs the numpy reference vs float64."""
from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.offload.formats import dequantize_int4, unpack_int4
from kimi_desktop.runtime import kernels as K

from ._util import assert_close_bound, rand_int4, rng

TOL = 2e-6

# (rows, in_features, tokens): odd rows, rows not a multiple of the 4-row block, words per row not a
# multiple of the 16-word vector, in not a multiple of 8 / 32, T = 1, 3 (direct path), 17 (tiles)
SHAPES = [(1, 32, 1), (5, 40, 3), (7, 96, 1), (13, 200, 17), (37, 1000, 3), (9, 36, 4), (6, 1152, 17),
          (33, 2048, 1), (66, 7168, 5)]


def _f64(packed, scale, X):
    Wd = dequantize_int4(packed, scale, X.shape[1], 32).astype(np.float64)
    return X.astype(np.float64) @ Wd.T, np.abs(X).astype(np.float64) @ np.abs(Wd).T


@pytest.mark.parametrize("out,n,T", SHAPES)
def test_int4_gemm_and_gemv(out, n, T):
    r = rng(out * 1000 + n + T)
    packed, scale = rand_int4(r, out, n)
    X = r.standard_normal((T, n)).astype(np.float32)
    want, bound = _f64(packed, scale, X)
    assert_close_bound(K.int4_gemm_ref(packed, scale, X), want, bound, TOL, "ref")
    assert_close_bound(K.int4_gemm(packed, scale, X), want, bound, TOL, "int4_gemm")
    y = K.int4_gemv(packed, scale, X[0])
    assert_close_bound(y, want[0], bound[0], TOL, "int4_gemv")
    assert y.dtype == np.float32 and y.shape == (out,)


def test_int4_gemm_paths_agree_and_large_values():
    r = rng(1)
    packed, scale = rand_int4(r, 21, 520)
    X = (r.standard_normal((9, 520)) * 1e3).astype(np.float32)
    want, bound = _f64(packed, scale, X)
    for T in (1, 2, 3, 4, 5, 8, 9):   # direct (<= DIRECT_T_MAX) and tile paths
        assert_close_bound(K.int4_gemm(packed, scale, X[:T]), want[:T], bound[:T], TOL, f"T={T}")


def test_nibble_order_by_hand():
    # word 0x76543210 holds u = 0..7 in columns 0..7 (lowest nibble first): q = -8..-1
    packed = np.array([[0x76543210, -0x01234568 & 0xFFFFFFFF]], np.uint32).view(np.int32)  # 0xFEDCBA98
    q = unpack_int4(packed, 16)
    assert q.tolist() == [list(range(-8, 8))]
    scale = np.array([[0x3F80]], np.uint16)  # bf16 1.0
    for c in range(16):
        x = np.zeros(16, np.float32)
        x[c] = 1.0
        assert K.int4_gemv(packed, scale, x)[0] == c - 8


def test_matches_compressed_tensors_packing():
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    r = rng(2)
    for out, n in [(3, 64), (5, 40), (4, 36)]:
        q = r.integers(-8, 8, size=(out, n)).astype(np.int8)
        packed = helpers.pack_to_int32(torch.from_numpy(q), 4).numpy()
        assert np.array_equal(unpack_int4(packed, n), q)
        scale = np.full((out, (packed.shape[1] + 3) // 4), 0x3F80, np.uint16)
        x = r.standard_normal(n).astype(np.float32)
        np.testing.assert_allclose(K.int4_gemv(packed, scale, x), q.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_accepted_dtypes_and_out():
    import ml_dtypes
    r = rng(3)
    packed, scale = rand_int4(r, 8, 64)
    x = r.standard_normal(64).astype(np.float32)
    y = K.int4_gemv(packed, scale, x)
    np.testing.assert_array_equal(K.int4_gemv(packed.view(np.uint32), scale.view(ml_dtypes.bfloat16), x), y)
    out = np.empty(8, np.float32)
    assert K.int4_gemv(packed, scale, x, out=out) is out
    np.testing.assert_array_equal(out, y)
    assert K.int4_gemm(packed, scale, np.zeros((0, 64), np.float32)).shape == (0, 8)


def test_bad_inputs_raise_clear_errors():
    r = rng(4)
    packed, scale = rand_int4(r, 8, 64)
    x = np.zeros(64, np.float32)
    with pytest.raises(TypeError, match="x"):
        K.int4_gemv(packed, scale, x.astype(np.float64))
    with pytest.raises(ValueError, match="x"):
        K.int4_gemv(packed, scale, np.zeros(80, np.float32))
    with pytest.raises(ValueError, match="scale"):
        K.int4_gemv(packed, scale[:, :1], x)
    with pytest.raises(ValueError, match="contiguous"):
        K.int4_gemv(np.asfortranarray(packed), scale, x)
    with pytest.raises(TypeError, match="packed"):
        K.int4_gemv(packed.astype(np.int64), scale, x)
    with pytest.raises(ValueError, match="X"):
        K.int4_gemm(packed, scale, np.zeros((2, 56), np.float32))
