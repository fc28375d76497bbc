"""The machine's ceilings, measured in the same run as the engines: DRAM read, disk read, fp32 GEMM."""

from __future__ import annotations

import mmap
import os
import statistics
import time
from pathlib import Path

import numpy as np


def dram_read_gbps(gib: float = 1.0, repeats: int = 3) -> float:
    """numpy sum over a float32 array much larger than L3: median GB/s of one streaming read."""
    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    a.sum()                                              # fault the pages in first
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        runs.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return statistics.median(runs)


def gemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """numpy/OpenBLAS float32 GEMM: the prefill compute ceiling this runtime can reach."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        runs.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(runs)


def drop_page_cache(paths) -> None:
    """Evict the files' clean pages (posix_fadvise DONTNEED), so the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths, block: int = 16 << 20) -> None:
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def odirect_read_gbps(path: str | Path, max_bytes: int = 2 << 30, block: int = 4 << 20,
                      inflight: int = 1, start: int = 0) -> float | None:
    """Sequential O_DIRECT read of up to max_bytes from byte `start` of a file on the model's disk,
    `inflight` block-sized requests at a time from threads (as the expert store reads), into
    buffers faulted in beforehand (page faults are not disk time). None if O_DIRECT is refused."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    bufs = [mmap.mmap(-1, block) for _ in range(inflight)]      # page-aligned, as O_DIRECT needs
    for b in bufs:
        b.write(bytes(block))
    try:
        start = start // block * block
        size = min(os.fstat(fd).st_size - start, max_bytes) // block * block
        offsets = list(range(start, start + size, block))

        def worker(i: int) -> int:
            return sum(os.preadv(fd, [bufs[i]], off) for off in offsets[i::inflight])

        t = time.perf_counter()
        with ThreadPoolExecutor(inflight) as ex:
            done = sum(ex.map(worker, range(inflight)))
        dt = time.perf_counter() - t
    except OSError:
        return None
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    return done / dt / 1e9 if done else None
