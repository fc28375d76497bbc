"""Serial twins and the thread choice (_launch.py): small work never pays a parallel launch, the
twins give the parallel kernels' bits, and the default thread count follows the free cores."""
from __future__ import annotations

import importlib
import math

import numba
import numpy as np
import pytest

from kimi_desktop.runtime import kernels as K
from kimi_desktop.runtime.kernels import _launch, absorb, bf16, fp8, int4, mla

from ._util import rand_int4, rng

mla_prefill = importlib.import_module("kimi_desktop.runtime.kernels.mla_prefill")   # the name is also a function
TWINS = [absorb._absorb_q, absorb._absorb_out, bf16._bf16_gemv, bf16._bf16_tiles, fp8._fp8_gemv, fp8._fp8_tiles,
         int4._int4_direct, int4._int4_tiles, mla._mla, mla_prefill._mla_prefill]


@pytest.fixture(autouse=True)
def launch_path():
    """Overrides conftest's: this module sets the threshold itself (the default, or forced per call)."""
    yield "default"


def _calls(r):
    """One call of every launcher, on shapes with many row blocks / heads / tokens / partitions."""
    packed, scale = rand_int4(r, 203, 1000)
    bfw = r.integers(0, 1 << 15, (203, 300)).astype(np.uint16)
    f8 = r.integers(0, 120, (203, 300)).astype(np.uint8)
    f8s = r.random((2, 3)).astype(np.float32) + 0.5
    X = r.standard_normal((9, 1000)).astype(np.float32)
    Xb = r.standard_normal((9, 300)).astype(np.float32)
    H, R, P, C, V, N = 8, 64, 16, 32, 48, 3 * mla.CHUNK + 5
    kv, pe = r.standard_normal((N, R)).astype(np.float32), r.standard_normal((N, P)).astype(np.float32)
    kvb_w = r.integers(0, 1 << 14, (H * (C + V), R)).astype(np.uint16)
    T = 11
    q = r.standard_normal((T, H, C + P)).astype(np.float32)
    kvb = r.standard_normal((T + 4, H, C + V)).astype(np.float32)
    return {
        "int4_gemv": lambda: K.int4_gemv(packed, scale, X[0]),
        "int4_gemm_direct": lambda: K.int4_gemm(packed, scale, X[:5]),
        "int4_gemm_tiles": lambda: K.int4_gemm(packed, scale, X),
        "bf16_gemv": lambda: K.bf16_gemv(bfw, Xb[0]),
        "bf16_gemm": lambda: K.bf16_gemm(bfw, Xb),
        "fp8_gemv": lambda: K.fp8_gemv(f8, f8s, Xb[0]),
        "fp8_gemm": lambda: K.fp8_gemm(f8, f8s, Xb),
        "mla_decode": lambda: K.mla_decode_absorbed(r0(H, R), r0(H, P), kv, pe, 0.2),
        "mla_prefill": lambda: K.mla_prefill(q, kvb, pe[:T + 4], 4, 0.2, C),
        "absorb_q": lambda: absorb.absorb_q(kvb_w, r0(H, C), C, V),
        "absorb_out": lambda: absorb.absorb_out(kvb_w, r0(H, R), C, V),
    }


def r0(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _run_all(min_work):
    with K.policy.forced(min_work):
        return {name: call() for name, call in _calls(rng(4)).items()}


@pytest.fixture
def all_threads():
    n = K.policy.fixed_threads
    K.set_threads(numba.config.NUMBA_NUM_THREADS)
    yield
    K.set_threads(n)


def test_serial_twins_give_the_parallel_bits(all_threads):
    before = dict(K.policy.launches)
    serial, parallel = _run_all(math.inf), _run_all(0)
    for name in serial:
        a, b = serial[name], parallel[name]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_array_equal(x, y, err_msg=name)
    took = {k: K.policy.launches[k] - before[k] for k in before}
    assert took["serial"] >= len(serial)
    if numba.config.NUMBA_NUM_THREADS > 1:
        assert took["parallel"] >= len(parallel)


def test_twins_are_separate_compilations():
    """numba's on-disk cache key ignores parallel=: a twin sharing its kernel's qualname would load
    the other's machine code."""
    for k in TWINS:
        assert k.serial.py_func.__qualname__ != k.parallel.py_func.__qualname__
        assert k.parallel.targetoptions.get("parallel") and not k.serial.targetoptions.get("parallel")
        assert k.serial.targetoptions.get("fastmath") == k.parallel.targetoptions.get("fastmath")


def test_small_work_is_serial_large_parallel(all_threads):
    p = K.policy
    assert not p.parallel(_launch.PARALLEL_MIN_WORK - 1)
    assert p.parallel(_launch.PARALLEL_MIN_WORK) == (numba.get_num_threads() > 1)
    before = dict(p.launches)
    packed, scale = rand_int4(rng(1), 64, 256)               # 131 K multiply-adds: serial
    K.int4_gemv(packed, scale, np.ones(256, np.float32))
    assert p.launches["serial"] == before["serial"] + 1 and p.launches["parallel"] == before["parallel"]


def test_demo_sized_model_decodes_without_a_parallel_launch(tiny_int4, all_threads):
    """The demo model's matrices are all below the threshold: no launch waits on a thread, and its
    logits are those of all-parallel launches, bit for bit."""
    from kimi_desktop.runtime import load_model

    model = load_model(tiny_int4)
    ids = rng(3).integers(300, 1500, 12).tolist()
    before = dict(K.policy.launches)
    s = model.session()
    logits = [s.feed(ids)] + [s.feed([t]) for t in (400, 401, 402)]
    assert K.policy.launches["parallel"] == before["parallel"] and K.policy.launches["serial"] > before["serial"]
    with K.policy.forced(0):
        s = model.session()
        again = [s.feed(ids)] + [s.feed([t]) for t in (400, 401, 402)]
    for a, b in zip(logits, again):
        np.testing.assert_array_equal(a, b)


class _Share:
    def __init__(self, free):
        self.free = free

    def free_cores(self):
        return self.free


def test_default_threads_follow_the_free_cores():
    p = _launch.LaunchPolicy()
    top = p.top
    for free, want in ((0.2, 1), (0.9, 1), (1.0, 1), (1.6, 2), (2.0, 2), (64.0, top)):
        p.share = _Share(free)
        assert p.threads_now() == max(1, min(top, want)), free
    p.fixed_threads = 1
    p.share = _Share(64.0)
    assert p.threads_now() == 1 and p.width() == 1       # a fixed count is kept whatever the load
    p.fixed_threads = None
    assert p.width() == top                              # partitions follow the cores, not the load


def test_cpu_share_reads_this_machine():
    s = _launch.CpuShare(window=0.0)
    x = sum(i * i for i in range(200_000))               # some CPU time of our own in the window
    assert x > 0
    other = s.update()
    assert math.isfinite(other) and other >= 0.0
    assert s.free_cores() <= max(len(s.cpus), 1)


def test_a_fixed_count_holds_on_the_thread_that_runs_the_model(tiny_int4):
    """numba's thread count is per calling thread; engines decode on their own threads, so the
    forward pass applies the setting (here `--threads 1`) on whichever thread runs it."""
    import threading

    from kimi_desktop.runtime import load_model

    model = load_model(tiny_int4)
    n = K.policy.fixed_threads
    seen = []
    K.set_threads(1)
    try:
        th = threading.Thread(target=lambda: (model.session().feed([5, 6, 7]), seen.append(numba.get_num_threads())))
        th.start()
        th.join()
    finally:
        K.set_threads(n)
    assert seen == [1]
