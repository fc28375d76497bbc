"""bf16 GEMV / GEMM vs the numpy reference vs float64."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K
from kimi_desktop.runtime.kernels._common import bf16_to_f32, f32_to_bf16

from ._util import assert_close_bound, rng

TOL = 2e-6
SHAPES = [(1, 1, 1), (5, 33, 3), (7, 96, 1), (13, 200, 17), (37, 1000, 3), (6, 1100, 17), (9, 31, 2)]


@pytest.mark.parametrize("out,n,T", SHAPES)
def test_bf16(out, n, T):
    r = rng(out * 1000 + n + T)
    w = f32_to_bf16(r.standard_normal((out, n)).astype(np.float32))
    X = r.standard_normal((T, n)).astype(np.float32)
    Wd = bf16_to_f32(w).astype(np.float64)
    want, bound = X.astype(np.float64) @ Wd.T, np.abs(X).astype(np.float64) @ np.abs(Wd).T
    assert_close_bound(K.bf16_gemm_ref(w, X), want, bound, TOL, "ref")
    assert_close_bound(K.bf16_gemm(w, X), want, bound, TOL, "bf16_gemm")
    assert_close_bound(K.bf16_gemv(w, X[0]), want[0], bound[0], TOL, "bf16_gemv")


def test_bf16_accepts_ml_dtypes_and_checks():
    r = rng(1)
    w = f32_to_bf16(r.standard_normal((4, 40)).astype(np.float32))
    x = r.standard_normal(40).astype(np.float32)
    np.testing.assert_array_equal(K.bf16_gemv(w.view(ml_dtypes.bfloat16), x), K.bf16_gemv(w, x))
    with pytest.raises(ValueError, match="x"):
        K.bf16_gemv(w, np.zeros(41, np.float32))
    with pytest.raises(TypeError, match="w"):
        K.bf16_gemv(w.astype(np.float32), x)


def test_bf16_conversion_exact():
    vals = np.array([0.0, -0.0, 1.0, -2.5, 3.0e38, 1e-40, np.inf, -np.inf], np.float32)
    u = f32_to_bf16(vals)
    np.testing.assert_array_equal(bf16_to_f32(u), u.view(ml_dtypes.bfloat16).astype(np.float32))
