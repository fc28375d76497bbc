"""set_threads / get_threads."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K

from ._util import rand_int4, rng


def test_set_threads_default_and_bounds():
    top = numba.config.NUMBA_NUM_THREADS
    n = K.policy.fixed_threads
    try:
        assert K.set_threads(1) == 1 and K.get_threads() == 1 and K.policy.fixed_threads == 1
        n_free = K.set_threads(None)                 # the cores free right now: depends on the load
        assert 1 <= n_free <= top and K.get_threads() == n_free and K.policy.fixed_threads is None
        with pytest.raises(ValueError, match="threads"):
            K.set_threads(top + 1)
    finally:
        K.set_threads(n)


def test_results_do_not_depend_on_thread_count():
    r = rng(9)
    packed, scale = rand_int4(r, 41, 2048)
    X = r.standard_normal((5, 2048)).astype(np.float32)
    n = K.policy.fixed_threads
    try:
        K.set_threads(1)
        a, b = K.int4_gemv(packed, scale, X[0]), K.int4_gemm(packed, scale, X)
        K.set_threads(numba.config.NUMBA_NUM_THREADS)
        with K.policy.forced(0):                     # parallel launches even for this small matrix
            np.testing.assert_array_equal(K.int4_gemv(packed, scale, X[0]), a)
            np.testing.assert_array_equal(K.int4_gemm(packed, scale, X), b)
    finally:
        K.set_threads(n)


def test_stream_read_and_microbench_helpers():
    from kimi_desktop.runtime.kernels import microbench
    from kimi_desktop.runtime.kernels._stream import stream_read, stream_read_ref
    a = rng(2).standard_normal(100_003).astype(np.float32)
    assert abs(stream_read(a) - stream_read_ref(a)) < 1e-3
    times = microbench._timeit(lambda: None, 0.0)
    assert len(times) == 3
    assert microbench._rate(2.0, [1.0, 2.0, 4.0]) == (1.0, 2.0)
