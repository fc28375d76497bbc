"""Kernel microbenchmarks: how close the kernels run to this machine's memory and FMA ceilings.

    python -m kimi_desktop.runtime.kernels.microbench [--threads N] [--seconds S] [--quick]

prints a JSON dict (see run_microbench). Bandwidths are GB/s (1e9 bytes/s) of the bytes the kernel
must read (packed weights + scales); every GEMV rotates over distinct matrices totalling >= 256 MB
so nothing is served from the 32 MB L3. Each figure is the median over repeated timed passes, with
the best pass alongside ("_best"): the machine is shared, so the best is the less noisy estimate of
what the code can do, the median what a run typically got. pct_of_dram is relative to the one-thread
numpy sum figure (dram_read_gbs); dram_read_gbs_all_threads is a numba read stream on all kernel
threads, the real ceiling for the parallel GEMVs. numpy_f32 GEMM runs on OpenBLAS's own threads
(set_threads does not change them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import numba

from . import get_threads, policy, set_threads
from ._common import f32_to_bf16

ROTATE_BYTES = 256 << 20


def _timeit(fn, seconds: float, min_reps: int = 3, max_reps: int = 50) -> list[float]:
    fn()  # warm-up (compiles, faults pages in)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _rate(work: float, times: list[float]) -> tuple[float, float]:
    """(median, best) of work / time."""
    return work / float(np.median(times)), work / min(times)


def dram_read_gbs(seconds: float = 1.0) -> dict:
    """numpy sum over 1 GiB float32 (one thread), median of 3; and a numba all-threads read stream."""
    a = np.ones(1 << 28, np.float32)
    times = _timeit(lambda: float(a.sum()), 0.0, min_reps=3, max_reps=3)
    res = {"dram_read_gbs": a.nbytes / float(np.median(times)) / 1e9,
           "dram_read_gbs_best": a.nbytes / min(times) / 1e9}
    from ._stream import stream_read
    t2 = _timeit(lambda: stream_read(a), seconds, min_reps=3, max_reps=10)
    res["dram_read_gbs_all_threads"], res["dram_read_gbs_all_threads_best"] = (
        v / 1e9 for v in _rate(a.nbytes, t2))

    return res


def _rotating_int4(out: int, n: int, rng) -> tuple[list, int]:
    W, G = n // 8, n // 32
    per = out * W * 4 + out * G * 2
    k = max(2, -(-ROTATE_BYTES // per))
    mats = [(rng.integers(-2**31, 2**31, size=(out, W), dtype=np.int64).astype(np.int32),
             f32_to_bf16(rng.random((out, G), dtype=np.float32) * 0.02 + 0.001)) for _ in range(k)]
    return mats, per


def bench_int4_gemv(out: int, n: int, seconds: float, rng) -> dict:
    from .int4 import int4_gemv
    mats, per = _rotating_int4(out, n, rng)
    x = rng.standard_normal(n).astype(np.float32)
    y = np.empty(out, np.float32)

    def run():
        for p, s in mats:
            int4_gemv(p, s, x, out=y)

    med, best = _rate(per * len(mats), _timeit(run, seconds))
    return {"gbs": med / 1e9, "gbs_best": best / 1e9, "rotating_mb": per * len(mats) / 1e6}


def bench_bf16_gemv(out: int, n: int, seconds: float, rng) -> dict:
    from .bf16 import bf16_gemv
    per = out * n * 2
    k = max(1, -(-ROTATE_BYTES // per))
    mats = [f32_to_bf16(rng.standard_normal((out, n), dtype=np.float32)) for _ in range(k)]
    x = rng.standard_normal(n).astype(np.float32)
    y = np.empty(out, np.float32)

    def run():
        for w in mats:
            bf16_gemv(w, x, out=y)

    med, best = _rate(per * k, _timeit(run, seconds))
    return {"gbs": med / 1e9, "gbs_best": best / 1e9, "rotating_mb": per * k / 1e6}


def bench_fp8_gemv(out: int, n: int, seconds: float, rng) -> dict:
    from .fp8 import fp8_gemv
    sb = (-(-out // 128), -(-n // 128))
    per = out * n + sb[0] * sb[1] * 4
    k = max(1, -(-ROTATE_BYTES // per))
    mats = []
    for _ in range(k):
        w = rng.integers(0, 256, size=(out, n), dtype=np.uint8)
        w[(w & 0x7F) == 0x7F] = 0
        mats.append((w, rng.random(sb, dtype=np.float32) * 0.01))
    x = rng.standard_normal(n).astype(np.float32)
    y = np.empty(out, np.float32)

    def run():
        for w, s in mats:
            fp8_gemv(w, s, x, out=y)

    med, best = _rate(per * k, _timeit(run, seconds))
    return {"gbs": med / 1e9, "gbs_best": best / 1e9, "rotating_mb": per * k / 1e6}


def bench_gemm(T: int, out: int, n: int, seconds: float, rng) -> dict:
    """GFLOP/s (2 T out n per call): numpy/OpenBLAS float32 matmul vs int4_gemm vs bf16_gemm."""
    from .bf16 import bf16_gemm
    from .int4 import int4_gemm
    X = rng.standard_normal((T, n)).astype(np.float32)
    Wf = rng.standard_normal((out, n)).astype(np.float32)
    flops = 2.0 * T * out * n
    res = {}
    med, best = _rate(flops, _timeit(lambda: X @ Wf.T, seconds))
    res["numpy_f32_gflops"], res["numpy_f32_gflops_best"] = med / 1e9, best / 1e9

    p = rng.integers(-2**31, 2**31, size=(out, n // 8), dtype=np.int64).astype(np.int32)
    s = f32_to_bf16(rng.random((out, n // 32), dtype=np.float32) * 0.02 + 0.001)
    Y = np.empty((T, out), np.float32)
    med, best = _rate(flops, _timeit(lambda: int4_gemm(p, s, X, out=Y), seconds))
    res["int4_gemm_gflops"], res["int4_gemm_gflops_best"] = med / 1e9, best / 1e9
    wb = f32_to_bf16(rng.standard_normal((out, n), dtype=np.float32))
    med, best = _rate(flops, _timeit(lambda: bf16_gemm(wb, X, out=Y), seconds))
    res["bf16_gemm_gflops"], res["bf16_gemm_gflops_best"] = med / 1e9, best / 1e9
    return res


def bench_mla(N: int, seconds: float, rng, H: int = 64, R: int = 512, P: int = 64) -> dict:
    from .mla import mla_decode_absorbed, mla_decode_absorbed_ref
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    ql, qp, kv, pe = f(H, R), f(H, P), f(N, R), f(N, P)
    flops = 2.0 * H * N * (R + P) + 2.0 * H * N * R
    res = {}
    for name, fn in (("numba", mla_decode_absorbed), ("numpy", mla_decode_absorbed_ref)):
        med, best = _rate(flops, _timeit(lambda fn=fn: fn(ql, qp, kv, pe, 0.13), seconds))
        res[f"{name}_gflops"], res[f"{name}_gflops_best"] = med / 1e9, best / 1e9
        res[f"{name}_ms"] = flops / med * 1e3
    return res


def run_microbench(threads: int | None = None, seconds: float = 1.0, quick: bool = False) -> dict:
    """Measure and return a dict of results (GB/s, GFLOP/s, % of the numpy DRAM read figure)."""
    old = policy.fixed_threads
    set_threads(threads)
    rng = np.random.default_rng(0)
    try:
        res: dict = {"threads": get_threads(), "cpu": platform.processor() or platform.machine(),
                     "numba": numba.__version__, "numpy": np.__version__,
                     "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE")}
        res.update(dram_read_gbs(seconds))
        dram = res["dram_read_gbs"]
        shapes = [("int4_gemv_2048x7168", bench_int4_gemv, (2048, 7168)),
                  ("int4_gemv_7168x2048", bench_int4_gemv, (7168, 2048)),
                  ("bf16_gemv_16384x7168", bench_bf16_gemv, (16384, 7168)),
                  ("fp8_gemv_2048x7168", bench_fp8_gemv, (2048, 7168))]
        for name, fn, (o, n) in shapes:
            r = fn(o, n, seconds, rng)
            r["pct_of_dram"] = 100.0 * r["gbs"] / dram
            r["pct_of_dram_best"] = 100.0 * r["gbs_best"] / dram
            res[name] = r
        res["gemm_T64_2048x7168"] = bench_gemm(64, 2048, 7168, seconds, rng)
        if not quick:
            res["gemm_T8_2048x7168"] = bench_gemm(8, 2048, 7168, seconds, rng)
            res["mla_decode_N4096"] = bench_mla(4096, seconds, rng)
        return res
    finally:
        set_threads(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    ap.add_argument("--quick", action="store_true", help="skip the T=8 GEMM and MLA measurements")
    args = ap.parse_args(argv)
    print(json.dumps(run_microbench(args.threads, args.seconds, args.quick), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
