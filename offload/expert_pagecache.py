"""policy="none": the expert store without a user-space cache (the baseline the slot store is measured against).

get() returns mmap views of the checkpoint (reads served by the OS page cache), or with
none_io="pread" a fresh buffer filled by the store's reader pool per call; prefetch() becomes
posix_fadvise(WILLNEED) where the platform has it. Nothing is resident, nothing is pinned.
"""
from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

from .expert_io import ReaderPools, read_into
from .expert_layout import MODULES, PAGE, round_up
from .expert_store import ExpertStore
from .formats import load_linear

__all__ = ["PageCacheStore"]


class PageCacheStore(ExpertStore):
    mode = "none"

    def __init__(self, catalog, options):
        super().__init__(catalog, options)
        self.none_io = options.none_io
        if self.none_io == "pread":
            self._pools = ReaderPools(options.io_threads, options.prefetch_threads)

    def get(self, layer: int, e: int):
        (key,) = self._keys(layer, [e])
        return self._read(key)

    def get_many(self, layer: int, experts: Iterable[int]) -> Iterator[tuple[int, tuple]]:
        keys = self._keys(layer, dict.fromkeys(int(e) for e in experts))
        for key in keys:
            yield key[1], self._read(key)

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        if not self.prefetch_enabled or self._closed:
            return 0
        keys = self._keys(layer, experts)
        for key in keys:
            for fid, off, n, _ in self.catalog.plan(key).chunks:
                f = self.files[fid]
                if not f.can_advise:
                    break
                try:
                    os.posix_fadvise(f.fd, off, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    break
        with self._lock:
            self._stats["prefetch_issued"] += len(keys)
        return len(keys)

    def _read(self, key):
        with self._lock:
            self._stats["gets"] += 1
        layer, e = key
        if self.none_io == "mmap":
            p = f"model.layers.{layer}.mlp.experts.{e}."
            return tuple(load_linear(self.ckpt, p + m, self.qcfg, self.geom.shape(m)) for m in MODULES)
        plan = self.catalog.plan(key)
        mv = memoryview(mmap.mmap(-1, round_up(plan.nbytes, PAGE)))
        futs = [self._pools.demand.submit(read_into, self.files[fid], mv[soff: soff + n], off,
                                          self._meter, "demand")
                for fid, off, n, soff in plan.chunks]
        t0 = time.perf_counter()
        for f in futs:
            f.result()
        with self._lock:
            self._wait_s += time.perf_counter() - t0
        if self.catalog.needs_shape_check(key):
            self.catalog.check_shapes(key)
        root = np.frombuffer(mv, np.uint8)
        root.flags.writeable = False
        return self.catalog.triple(root, plan)
