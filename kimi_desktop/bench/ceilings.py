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


def odirect_read_gbps(paths, max_bytes: int = 2 << 30, block: int = 4 << 20, inflight: int = 1,
                      start: int = 0) -> float | None:
    """O_DIRECT read of max_bytes spread over the files `paths` (one path or several: each read
    sequentially from byte `start`, the files in turn), `inflight` block-sized requests at a time
    (as the expert store reads its shards). None if O_DIRECT is refused."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    per_file = max_bytes // len(paths) // block * block
    start = start // block * block
    reqs = []
    for p in paths:
        n = max(min(os.stat(p).st_size - start, per_file) // block * block, 0)
        reqs.append([(p, off, block) for off in range(start, start + n, block)])
    return replay_gbps([r for group in zip(*reqs) for r in group], inflight)


def replay_gbps(extents, inflight: int = 8) -> float | None:
    """Raw O_DIRECT reads of exactly these (path, offset, bytes) extents (4 KiB-aligned), `inflight`
    at a time from threads, into buffers faulted in beforehand (page faults are not disk time).
    With the expert store's own extents: the disk's ceiling for its access pattern. None if
    O_DIRECT is refused."""
    from concurrent.futures import ThreadPoolExecutor

    extents = list(extents)
    if not extents:
        return None
    fds = {}
    try:
        for p, _, _ in extents:
            if p not in fds:
                fds[p] = os.open(p, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        return None
    size = max(n for _, _, n in extents)
    bufs = [mmap.mmap(-1, size) for _ in range(inflight)]
    for b in bufs:
        b.write(bytes(size))
    try:
        def worker(i: int) -> int:
            return sum(os.preadv(fds[p], [memoryview(bufs[i])[:n]], off) for p, off, n in extents[i::inflight])

        t = time.perf_counter()
        with ThreadPoolExecutor(inflight) as ex:
            done = sum(ex.map(worker, range(inflight)))
        dt = time.perf_counter() - t
    except OSError:
        return None
    finally:
        for fd in fds.values():
            os.close(fd)
        for b in bufs:
            b.close()
    return done / dt / 1e9 if done else None
