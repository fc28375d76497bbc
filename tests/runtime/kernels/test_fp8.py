"""FP8 e4m3fn block-scaled GEMV / GEMM; the lookup table and the vector decoder on all 256 codes."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.offload.formats import dequantize_fp8_block
from kimi_desktop.runtime import kernels as K

from ._util import assert_close_bound, rng

TOL = 2e-6
ALL = np.arange(256, dtype=np.uint8)
TRUTH = ALL.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def test_lut_matches_ml_dtypes_all_codes():
    np.testing.assert_array_equal(K.FP8_E4M3_LUT, TRUTH)          # NaN == NaN here
    assert np.isnan(K.FP8_E4M3_LUT[[0x7F, 0xFF]]).all()
    assert np.isfinite(np.delete(K.FP8_E4M3_LUT, [0x7F, 0xFF])).all()
    assert K.FP8_E4M3_LUT[0x7E] == 448.0 and K.FP8_E4M3_LUT[0x01] == 2.0 ** -9


def test_every_finite_code_decodes_exactly_in_both_paths():
    """One-hot activations pick single weights out of rows that hold every finite code, so each
    output is one decoded code: the vector decoders (GEMV and tiles, 2^-8 folded into the scale)
    and the scalar tails (the last 8 columns) against ml_dtypes."""
    finite = ALL[(ALL & 0x7F) != 0x7F]                                  # 254 codes
    n = 264                                                              # 2 x 128 vector columns + an 8-column tail
    w = np.stack([np.resize(np.roll(finite, 37 * r), n) for r in range(5)])   # rows 0-3: 4-row kernel, 4: 1-row
    s = np.ones((1, 3), np.float32)
    want = TRUTH[w]                                                      # [5, n]
    eye = np.eye(n, dtype=np.float32)
    np.testing.assert_array_equal(K.fp8_gemm(w, s, eye), want.T)       # tiles (T = n)
    got = np.stack([K.fp8_gemv(w.view(ml_dtypes.float8_e4m3fn), s, eye[c]) for c in range(n)], axis=1)
    np.testing.assert_array_equal(got, want)                            # GEMV


def _weights(r, out, n, block):
    w = r.integers(0, 256, size=(out, n)).astype(np.uint8)
    w[(w & 0x7F) == 0x7F] ^= 1                                    # no NaN codes
    s = ((r.random((-(-out // block[0]), -(-n // block[1])), dtype=np.float32) + 0.5) * 0.01)
    return w, s


@pytest.mark.parametrize("out,n,T", [(1, 16, 1), (5, 33, 3), (7, 130, 1), (13, 300, 17), (37, 1000, 3), (6, 600, 17)])
@pytest.mark.parametrize("block", [(128, 128), (4, 48), (3, 20)])
def test_fp8(out, n, T, block):
    r = rng(out * 1000 + n + T + block[1])
    w, s = _weights(r, out, n, block)
    X = r.standard_normal((T, n)).astype(np.float32)
    Wd = dequantize_fp8_block(w, s, block).astype(np.float64)
    want, bound = X.astype(np.float64) @ Wd.T, np.abs(X).astype(np.float64) @ np.abs(Wd).T
    assert_close_bound(K.fp8_gemm_ref(w, s, X, block), want, bound, TOL, "ref")
    assert_close_bound(K.fp8_gemm(w, s, X, block), want, bound, TOL, "fp8_gemm")
    assert_close_bound(K.fp8_gemv(w, s, X[0], block), want[0], bound[0], TOL, "fp8_gemv")


def test_fp8_nan_code_propagates_like_reference():
    r = rng(5)
    w, s = _weights(r, 8, 256, (128, 128))
    w[3, 17] = 0x7F
    w[6, 200] = 0xFF
    x = r.standard_normal(256).astype(np.float32)
    y = K.fp8_gemv(w, s, x)
    assert np.array_equal(np.isnan(y), np.isnan(K.fp8_gemv_ref(w, s, x)))
    assert np.isnan(y[[3, 6]]).all() and np.isfinite(np.delete(y, [3, 6])).all()


def test_fp8_checks():
    r = rng(6)
    w, s = _weights(r, 8, 256, (128, 128))
    with pytest.raises(ValueError, match="scale_inv"):
        K.fp8_gemv(w, s[:, :1], np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="block"):
        K.fp8_gemv(w, s, np.zeros(256, np.float32), block=(0, 128))
    np.testing.assert_array_equal(K.fp8_gemv(w.view(ml_dtypes.float8_e4m3fn), s, np.ones(256, np.float32)),
                                  K.fp8_gemv(w, s, np.ones(256, np.float32)))
