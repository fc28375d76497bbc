"""Helpers for the kernel tests: random stored-format weights and a float64 error bound."""
from __future__ import annotations

import numpy as np

from kimi_desktop.runtime.kernels._common import f32_to_bf16


def rng(seed=0):
    return np.random.default_rng(seed)


def rand_int4(r, out, n):
    """packed int32 [out, ceil(n/8)] (all nibble values), bf16 scales [out, ceil(W/4)] as uint16."""
    W = (n + 7) // 8
    packed = r.integers(-2**31, 2**31, size=(out, W), dtype=np.int64).astype(np.int32)
    scale = f32_to_bf16(r.random((out, (W + 3) // 4), dtype=np.float32) * 0.02 + 0.001)
    return packed, scale


def assert_close_bound(got, want64, bound, tol, what):
    """|got - want64| <= tol * bound elementwise, bound = |W| @ |x| in float64 (scale-free)."""
    got = np.asarray(got, np.float64)
    assert got.shape == want64.shape, (what, got.shape, want64.shape)
    err = np.abs(got - want64) / np.maximum(bound, 1e-30)
    assert np.all(np.isfinite(got)), what
    assert err.max() <= tol, f"{what}: max error {err.max():.3g} x bound > {tol}"
