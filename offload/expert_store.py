"""The expert store's interface, its options, and the factory that picks a mode.

    store = ExpertStore.open(folder, budget_bytes=64 << 30, policy="lru")    # or StoreOptions(...)
    store = ExpertStore.from_checkpoint(ckpt, qcfg, layers, hidden, moe_inter, policy="none")

Two modes behind one interface (callers do not branch on it): SlotStore (offload/expert_slots.py,
a budgeted pool of slots) and PageCacheStore (offload/expert_pagecache.py, policy="none": no
user-space cache, the OS page cache). Both expose get, get_many, prefetch, resident, missing,
extents, stats, reset_stats, close, and the attributes geom, files, slot_bytes, expert_nbytes,
n_experts_total, source, n_slots, budget_bytes, mode.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator

from .expert_catalog import ExpertCatalog
from .expert_io import IoMeter, resolve_reads
from .expert_layout import CHUNK_BYTES, PAGE, ExpertGeometry, geometry_for
from .expert_policies import check_policy
from .formats import QuantConfig
from .safetensors import Checkpoint

__all__ = ["ExpertStore", "ExpertStoreFull", "StoreOptions", "gib", "default_budget_bytes"]

_STAT_COUNTERS = ("gets", "hits", "misses", "hits_inflight", "prefetch_issued", "prefetch_used",
                  "prefetch_dropped", "prefetch_redundant", "prefetch_wasted", "prefetch_failed", "evictions")


class ExpertStoreFull(RuntimeError):
    """Every slot is pinned or loading: the budget is too small for what is held at once."""


def gib(n: int) -> str:
    """Bytes as the user gives them (--expert-cache-gb is in GiB): '0.02 GiB'; small ones in MiB too."""
    g = n / (1 << 30)
    return f"{g:.2f} GiB" if g >= 0.1 else f"{g:.4f} GiB ({n / (1 << 20):.1f} MiB)"


def default_budget_bytes(fraction: float = 0.5, reserve: int = 4 << 30) -> int:
    """Half of the memory available now, leaving at least `reserve` bytes (and the rest of the
    available memory) to the OS page cache and to everything else (design.md §4)."""
    import psutil
    avail = psutil.virtual_memory().available
    return int(max(0, min(avail - reserve, avail * fraction)))


@dataclass(frozen=True)
class StoreOptions:
    """How a store caches and reads (every field has the default the CLI uses)."""
    budget_bytes: int | None = None      # None: default_budget_bytes() (policy "none": no budget)
    n_slots: int | None = None           # a slot count instead of a byte budget
    policy: object = "lru"               # lru | lfu | least-stale | random | none, or an EvictionPolicy
    seed: int = 0                        # of the random policy
    prefetch: bool = True                # False: prefetch() does nothing
    max_prefetch_inflight: int = 8       # prefetched experts read at once; more are dropped
    pin_wait_s: float = 30.0             # a demand get() waits this long for a slot, then ExpertStoreFull
    pack: str | os.PathLike | bool | None = "auto"   # expert pack: auto | off | True | index path
    none_io: str = "mmap"                # policy "none": mmap views, or "pread" into a fresh buffer
    io_threads: int = 8                  # demand readers
    prefetch_threads: int | None = None  # prefetch readers (None: io_threads // 4, at least 1)
    direct_io: bool = False              # O_DIRECT where the file system accepts it
    reads: str = "auto"                  # preadv | portable (seek + readinto) | auto
    chunk_bytes: int = CHUNK_BYTES       # one read request

    def __post_init__(self):
        if self.none_io not in ("mmap", "pread"):
            raise ValueError(f"none_io must be 'mmap' or 'pread', got {self.none_io!r}")
        if self.chunk_bytes <= 0 or self.chunk_bytes % PAGE:
            raise ValueError(f"chunk_bytes must be a positive multiple of {PAGE}, got {self.chunk_bytes}")
        resolve_reads(self.reads)
        check_policy(self.policy)


class ExpertStore:
    """Routed experts by (layer, e); see offload/experts.py for the whole contract."""
    mode = "?"

    @classmethod
    def open(cls, folder: str | os.PathLike, budget_bytes: int | None = None, policy="lru",
             options: StoreOptions | None = None, **kw) -> ExpertStore:
        """A store for a checkpoint folder (config.json gives the MoE layers and shapes)."""
        geom, qcfg = ExpertGeometry.from_folder(folder)
        ckpt = Checkpoint(folder)
        try:
            store = cls.from_checkpoint(ckpt, qcfg, dict(geom.n_experts), geom.hidden, geom.moe_inter,
                                        budget_bytes, policy, options=options, **kw)
        except BaseException:
            ckpt.close()
            raise
        store._own_ckpt = True
        return store

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, qcfg: QuantConfig, layers, hidden: int, moe_inter: int,
                        budget_bytes: int | None = None, policy="lru", *, n_experts: int | None = None,
                        options: StoreOptions | None = None, **kw) -> ExpertStore:
        """layers: {layer: n_experts} or layer ids (n_experts each, or counted in the headers).
        Options come as `options=StoreOptions(...)` or as its fields by keyword."""
        if options is None:
            options = StoreOptions(budget_bytes=budget_bytes, policy=policy, **kw)
        geom = geometry_for(ckpt, layers, hidden, moe_inter, n_experts)
        catalog = ExpertCatalog(ckpt, qcfg, geom, pack=options.pack, chunk_bytes=options.chunk_bytes,
                                direct_io=options.direct_io, reads=options.reads)
        from .expert_pagecache import PageCacheStore
        from .expert_slots import SlotStore
        kind = PageCacheStore if options.policy == "none" else SlotStore
        try:
            return kind(catalog, options)
        except BaseException:
            catalog.close()
            raise

    def __init__(self, catalog: ExpertCatalog, options: StoreOptions):
        self.catalog, self.options = catalog, options
        self.ckpt, self.qcfg, self.geom = catalog.ckpt, catalog.qcfg, catalog.geom
        self.files = catalog.files                    # grows as experts are planned
        self.slot_bytes, self.expert_nbytes = catalog.slot_bytes, catalog.expert_nbytes
        self.n_experts_total, self.source, self.pack_note = catalog.n_experts_total, catalog.source, catalog.pack_note
        self.direct_io = catalog.direct_io
        policy = options.policy
        self.policy_name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
        self.prefetch_enabled = bool(options.prefetch)
        # reentrant: a read may finish (and its done-callback run) while the lock is held
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._meter = IoMeter()
        self._stats = dict.fromkeys(_STAT_COUNTERS, 0)
        self._wait_s = 0.0
        self._closed = False
        self._pools = None
        self.n_slots = 0
        self.budget_bytes = self._budget(options)

    def _budget(self, options: StoreOptions) -> int:
        if options.n_slots is not None:
            return int(options.n_slots) * self.slot_bytes
        if options.budget_bytes is None:
            return self._default_budget()
        return int(options.budget_bytes)

    def _default_budget(self) -> int:
        return 0

    # ---- the interface (each mode implements these)

    def get(self, layer: int, e: int):
        """(gate, up, down) Linear triple of expert e of `layer`."""
        raise NotImplementedError

    def get_many(self, layer: int, experts: Iterable[int]) -> Iterator[tuple[int, tuple]]:
        """Yield (e, triple) for every expert listed (each once)."""
        raise NotImplementedError

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Start speculative reads of experts of `layer`; returns how many were issued."""
        raise NotImplementedError

    def resident(self) -> list[tuple[int, int]]:
        """Keys of the experts in slots (loaded or loading)."""
        return []

    def missing(self, layer: int, experts: Iterable[int]) -> list[int]:
        """The experts of `layer` among these that are neither resident nor being read."""
        return [int(e) for e in experts]

    def _residency(self) -> dict:  # locked
        return {"resident_bytes": 0, "max_resident_bytes": 0, "resident_experts": 0, "pinned_slots": 0,
                "loading_experts": 0}

    # ---- shared

    def _key_of(self, layer: int, e: int) -> tuple[int, int]:
        return self.catalog.key_of(layer, e)

    def _keys(self, layer: int, experts: Iterable[int]) -> list[tuple[int, int]]:
        """Checked keys, each planned (header problems raise here, before any state changes)."""
        keys = [self._key_of(layer, int(e)) for e in experts]
        for key in keys:
            self.catalog.plan(key)
        return keys

    def extents(self, layer: int, e: int) -> list[tuple[Path, int, int]]:
        """(file, offset, bytes) of the reads that fill expert e's slot (4 KiB-aligned, in order)."""
        return self.catalog.extents(self._key_of(layer, e))

    def stats(self) -> dict:
        with self._lock:
            residency = self._residency()
            s = dict(self._stats)
            busy, bd, bp, ops = self._meter.snapshot()
            looked = s["hits"] + s["misses"]
            direct, note = self.catalog.direct_io_status()
            s.update(
                policy=self.policy_name, mode=self.mode, source=self.source, pack_note=self.pack_note,
                direct_io=direct, direct_io_note=note, reads=self.catalog.reads,
                hit_rate=s["hits"] / looked if looked else 0.0,
                prefetch_recall=s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else 0.0,
                prefetch_coverage=(s["prefetch_used"] / (s["prefetch_used"] + s["misses"])
                                   if s["prefetch_used"] + s["misses"] else 0.0),
                bytes_read_demand=bd, bytes_read_prefetch=bp, read_ops=ops, read_seconds=busy,
                read_gbps=(bd + bp) / busy / 1e9 if busy > 0 else 0.0, wait_seconds=self._wait_s,
                **residency,
                slot_bytes=self.slot_bytes, n_slots=self.n_slots, pool_bytes=self.n_slots * self.slot_bytes,
                budget_bytes=self.budget_bytes,
            )
            return s

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0
            self._wait_s = 0.0
            self._meter.reset()

    def close(self) -> None:
        """Stop the I/O threads and close files; arrays still held stay valid until dropped."""
        was_closed, self._closed = self._closed, True
        if was_closed:
            return
        if self._pools is not None:
            self._pools.shutdown()           # waits for reads in flight; cancels queued ones
        self.catalog.close()
        if getattr(self, "_own_ckpt", False):
            self.ckpt.close()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.policy_name}, {self.n_slots} slots x {self.slot_bytes} B, "
                f"budget {self.budget_bytes} B, source {self.source})")
