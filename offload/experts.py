"""Budgeted routed-expert store: a fixed pool of equal slots, preadv reads, pluggable eviction.

    store = ExpertStore.open(folder, budget_bytes=64 << 30, policy="lru")
    gate, up, down = store.get(layer, e)          # Linear triple whose arrays live in one slot
    store.prefetch(layer + 1, predicted_ids)      # speculative, only on spare I/O
    for e, (gate, up, down) in store.get_many(layer, ids):   # all misses in flight at once
        ...
    store.stats()                                 # hits, misses, recall, bytes, GB/s, ...

Memory. One anonymous mmap (page-aligned, huge pages where the kernel allows, every page faulted
in when the store opens: a read into untouched memory pays the faults inside the read, measured
1.3 vs 2.3 GB/s O_DIRECT and 0.6 vs 0.03 s of system CPU per GB here) of n_slots equal slots,
n_slots = budget_bytes // slot_bytes (or n_slots= directly), at most one slot per expert of the
model (a larger budget is capped: stats()["budget_bytes"] is what was kept). slot_bytes = an
expert's tensor bytes plus at most 2 pages of alignment slack per tensor, rounded up to 4 KiB
(K2: 24.77 MB + 48 KiB); with an expert pack, the pack's block size. Experts are planned lazily
(headers only, on first use), so opening a store costs nothing per expert. Nothing else holds
expert bytes, so the resident expert bytes never exceed the budget.

Layout of a slot. An expert's tensors are grouped into spans (same file, gaps <= MERGE_GAP bytes
coalesced: in a K2 shard, serialised by dtype then name, that is ~2 spans per expert: the three
packed weights, then the three scales). Each span's 4 KiB-aligned superset is read into the slot
at a 4 KiB-aligned offset, so a tensor sits in the slot at the same alignment (mod 4096) as in its
file. With an expert pack (offload/prepare.py) an expert is one aligned block: one span.

I/O. Each span is split into chunks of chunk_bytes (4 MiB), each read by os.preadv (which releases
the GIL) into the slot's memory from a ThreadPoolExecutor: demand reads on io_threads workers,
prefetch reads on a separate, smaller pool (prefetch_threads), so a demand read never queues behind
a prefetch; a prefetch that gets demanded has its unstarted chunks moved to the demand pool.
direct_io=True opens files with O_DIRECT (offsets, lengths and buffers are 4 KiB-aligned by the
layout above); a file system that refuses it (open or first read fails with EINVAL) falls back to
buffered reads for that file, and stats()["direct_io_note"] says why.

Pinning (what the model must know). A slot is never evicted while referenced:
  * get() / get_many() return a lease: every array of the returned triple is a view of one
    per-call root array, and the slot stays pinned until the last view of that root is gone
    (weakref.finalize on the root). Dropping the triple (end of the expert's matmuls) unpins it.
    Keep a triple only as long as you compute with it.
  * pin(layer, e) / unpin(layer, e), or `with store.pinned(layer, ids) as triples:`, hold slots
    explicitly (e.g. prefill grouping, hot experts).
If every slot is pinned or loading, a demand get() waits up to pin_wait_s, then raises
ExpertStoreFull. get_many() needs >= 2 slots (the loop variable still holds the previous triple).

Prefetch. prefetch(layer, ids) starts reads only into a free slot or by evicting the policy's
victim among slots that are neither pinned, loading, nor "just demanded" (demanded in the current
or previous layer step) nor a prefetch issued in the current or previous step; at most
max_prefetch_inflight prefetched experts are being read at once, the rest are dropped (a late
prefetch is worthless). A prefetched expert later demanded counts as prefetch_used:
recall = used / issued, coverage = used / (used + misses).

policy="none": no user-space cache at all. get() returns mmap views of the checkpoint (the
CheckpointExperts behaviour, reads served by the OS page cache), or with none_io="pread" a fresh
buffer filled by the same preadv pool per call; prefetch() becomes posix_fadvise(WILLNEED).

Thread safety: get(), get_many(), prefetch(), pin() and stats() may be called from any thread.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from .formats import QuantConfig, build_linear, check_weight_shape, linear_tensors, load_linear
from .safetensors import DTYPES, Checkpoint, CheckpointError, TensorInfo, anonymous_buffer

__all__ = [
    "ExpertStore", "ExpertStoreFull", "ExpertGeometry", "PartSpec", "MODULES", "POLICIES",
    "EvictionPolicy", "LRUPolicy", "LFUPolicy", "LeastStalePolicy", "RandomPolicy", "Clock",
    "default_budget_bytes", "expert_parts", "gib", "PAGE",
]

PAGE = 4096                  # alignment of slots, spans and O_DIRECT requests
MERGE_GAP = 64 << 10         # coalesce an expert's spans in one file across gaps up to this
CHUNK_BYTES = 4 << 20        # one preadv request
MODULES = ("gate_proj", "up_proj", "down_proj")
PACK_INDEX = "experts.kdpack.json"

FREE, LOADING, READY, FAILED = 0, 1, 2, 3


class ExpertStoreFull(RuntimeError):
    """Every slot is pinned or loading: the budget is too small for what is held at once."""


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


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


# --------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class ExpertGeometry:
    """Which experts exist and their module shapes (out, in)."""
    layers: tuple[int, ...]                  # MoE layer ids, ascending
    n_experts: Mapping[int, int]             # layer -> routed experts
    hidden: int
    moe_inter: int

    def shape(self, module: str) -> tuple[int, int]:
        return (self.hidden, self.moe_inter) if module == "down_proj" else (self.moe_inter, self.hidden)

    def keys(self) -> Iterator[tuple[int, int]]:
        for layer in self.layers:
            for e in range(self.n_experts[layer]):
                yield layer, e

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "ExpertGeometry":
        """MoE layers by the DeepSeek-V3 rule (same as runtime ModelConfig.is_moe_layer)."""
        try:
            n_layers, n_exp = int(cfg["num_hidden_layers"]), int(cfg.get("n_routed_experts") or 0)
            hidden, inter = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"])
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
        first, freq = int(cfg.get("first_k_dense_replace", 0)), int(cfg.get("moe_layer_freq", 1))
        layers = tuple(i for i in range(n_layers) if n_exp > 0 and i >= first and i % freq == 0)
        return cls(layers, {i: n_exp for i in layers}, hidden, inter)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> tuple["ExpertGeometry", QuantConfig]:
        path = Path(folder) / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from None
        return cls.from_config(cfg, str(path)), QuantConfig.from_config(cfg, str(path))


def _geometry(ckpt: Checkpoint, layers, hidden: int, moe_inter: int, n_experts) -> ExpertGeometry:
    if isinstance(layers, Mapping):
        counts = {}
        for layer, v in layers.items():
            counts[int(layer)] = int(v) if isinstance(v, (int, np.integer)) else len(list(v))
    else:
        ids = sorted(int(x) for x in layers)
        if n_experts is not None:
            counts = {layer: int(n_experts) for layer in ids}
        else:  # count experts present in the checkpoint (header names only)
            pat = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
            top: dict[int, int] = {}
            for name in ckpt.names():
                m = pat.match(name)
                if m:
                    layer, e = int(m.group(1)), int(m.group(2))
                    top[layer] = max(top.get(layer, -1), e)
            counts = {}
            for layer in ids:
                if layer not in top:
                    raise CheckpointError(f"{ckpt.folder}: layer {layer} has no routed experts in the checkpoint")
                counts[layer] = top[layer] + 1
    return ExpertGeometry(tuple(sorted(counts)), counts, int(hidden), int(moe_inter))


# --------------------------------------------------------------------------- expert parts

@dataclass(frozen=True)
class PartSpec:
    """One tensor of an expert: e.g. ("gate_proj", "weight_packed", "I32", (I, D/8))."""
    module: str
    role: str          # weight_packed | weight_scale | weight | weight_scale_inv
    dtype: str         # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * math.prod(self.shape)


def expert_parts(ckpt: Checkpoint, qcfg: QuantConfig, layer: int, e: int,
                 geom: ExpertGeometry) -> list[tuple[PartSpec, TensorInfo]]:
    """The tensors of expert (layer, e) in a fixed order, checked from headers only
    (formats.linear_tensors; int4's weight_shape value is data, checked on first load)."""
    out = []
    for module in MODULES:
        tensors = linear_tensors(ckpt, f"model.layers.{layer}.mlp.experts.{e}.{module}", qcfg, geom.shape(module))
        out += [(PartSpec(module, role, t.dtype, t.shape), t) for role, t in tensors.items()
                if role != "weight_shape"]
    return out


@dataclass
class _Plan:
    """Where an expert's bytes are and where they go in a slot."""
    chunks: list[tuple[int, int, int, int]]   # (file id, file offset, length, slot offset); all 4 KiB-aligned
    parts: list[tuple[PartSpec, int]]         # (spec, byte offset in the slot)
    nbytes: int                               # slot footprint (multiple of PAGE)
    data_bytes: int                           # tensor bytes proper
    shape_checks: tuple[str, ...] = ()        # int4 weight_shape tensors, checked on first load


def slot_bound(specs: list[PartSpec]) -> int:
    """Bytes that hold any expert with these parts when spans are not merged across gaps: each
    span's aligned superset adds less than 2 pages to its bytes."""
    return _round_up(sum(p.nbytes for p in specs) + 2 * PAGE * len(specs), PAGE)


def _plan_from_tensors(parts: list[tuple[PartSpec, TensorInfo]], file_id, chunk_bytes: int,
                       shape_checks=(), merge_gap: int = MERGE_GAP) -> _Plan:
    """file_id: path -> file index (a callable)."""
    order = sorted(range(len(parts)), key=lambda k: (str(parts[k][1].path), parts[k][1].start))
    spans: list[list] = []     # [path, start, end, [part indices]]
    for k in order:
        info = parts[k][1]
        if spans and spans[-1][0] == info.path and 0 <= info.start - spans[-1][2] <= merge_gap:
            spans[-1][2] = max(spans[-1][2], info.end)
            spans[-1][3].append(k)
        else:
            spans.append([info.path, info.start, info.end, [k]])
    offsets = [0] * len(parts)
    chunks = []
    cursor = 0
    for path, start, end, members in spans:
        a0, a1 = start // PAGE * PAGE, _round_up(end, PAGE)
        for k in members:
            offsets[k] = cursor + parts[k][1].start - a0
        for c in range(a0, a1, chunk_bytes):
            n = min(chunk_bytes, a1 - c)
            chunks.append((file_id(path), c, n, cursor + c - a0))
        cursor += a1 - a0
    return _Plan(chunks, [(parts[k][0], offsets[k]) for k in range(len(parts))], cursor,
                 sum(p.nbytes for p, _ in parts), tuple(shape_checks))


# --------------------------------------------------------------------------- eviction policies

class Clock:
    """What policies see: a global access tick, the layer cycle, and visits per layer.

    A "visit" of a layer is one pass of the model through it (one token in decode, one chunk in
    prefill). The store counts a visit whenever get() moves to a different layer.
    """

    def __init__(self, n_layers: int):
        self.n_layers = max(1, n_layers)
        self.visits = np.zeros(self.n_layers, np.int64)
        self.tick = 0
        self.cur = 0          # cycle position of the layer being processed
        self.step = 0         # layer visits so far, all layers together

    def visit(self, pos: int) -> None:
        self.cur = pos
        self.visits[pos] += 1
        self.step += 1


class EvictionPolicy:
    """Chooses a victim among evictable slots. Keys are (layer, e); pos is the layer's cycle position.

    insert()/touch()/remove() keep per-slot state; victim(mask) returns a slot with mask True.
    insert(..., prefetch=True) is a speculative load: it is not a use (frequency policies do not count it).
    """
    name = "?"

    def __init__(self, n_slots: int, clock: Clock, seed: int = 0):
        self.n, self.clock = n_slots, clock
        self.last = np.zeros(n_slots, np.int64)       # tick of the last use (tie-breaks everywhere)

    def insert(self, slot: int, key, pos: int, prefetch: bool = False) -> None:
        self.last[slot] = self.clock.tick

    def touch(self, slot: int, key, pos: int) -> None:
        self.last[slot] = self.clock.tick

    def remove(self, slot: int, key) -> None:
        pass

    def victim(self, mask: np.ndarray) -> int:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used (the baseline)."""
    name = "lru"

    def victim(self, mask):
        c = np.flatnonzero(mask)
        return int(c[np.argmin(self.last[c])])


class LFUPolicy(EvictionPolicy):
    """LFU with exponential aging (LRFU-like): each use adds 1 to a count that halves every
    `half_life` visits of the expert's layer; the count survives eviction (history), so an expert
    that keeps coming back is kept next time. Victim: lowest decayed count; ties go to the expert
    whose layer comes round last (see LeastStalePolicy), then to the least recent. half_life=2
    was best of 1..16 on the synthetic DeepSeek-like trace (offload/traces.py)."""
    name = "lfu"

    def __init__(self, n_slots, clock, seed=0, half_life: float = 2.0):
        super().__init__(n_slots, clock, seed)
        self.half_life = float(half_life)
        self.count = np.zeros(n_slots, np.float64)    # decayed count as of visit vlast
        self.vlast = np.zeros(n_slots, np.int64)
        self.pos = np.zeros(n_slots, np.int64)
        self.history: dict = {}                        # key -> (count, visit)

    def _decayed(self, c: float, v: int, pos: int) -> float:
        return c * 2.0 ** (-(self.clock.visits[pos] - v) / self.half_life)

    def insert(self, slot, key, pos, prefetch=False):
        super().insert(slot, key, pos, prefetch)
        c, v = self.history.pop(key, (0.0, self.clock.visits[pos]))
        self.count[slot] = self._decayed(c, v, pos) + (0.0 if prefetch else 1.0)
        self.vlast[slot], self.pos[slot] = self.clock.visits[pos], pos

    def touch(self, slot, key, pos):
        super().touch(slot, key, pos)
        self.count[slot] = self._decayed(self.count[slot], self.vlast[slot], pos) + 1.0
        self.vlast[slot] = self.clock.visits[pos]

    def remove(self, slot, key):
        self.history[key] = (float(self.count[slot]), int(self.vlast[slot]))

    def victim(self, mask):
        c = np.flatnonzero(mask)
        age = self.clock.visits[self.pos[c]] - self.vlast[c]
        score = self.count[c] * np.exp2(-age / self.half_life)
        ahead = (self.pos[c] - self.clock.cur - 1) % self.clock.n_layers + 1   # ties: layer-cyclic
        return int(c[np.lexsort((self.last[c], -ahead, score))[0]])


class LeastStalePolicy(EvictionPolicy):
    """Least-Stale for layer-cyclic access (after SpecMD, arXiv 2602.03921; our reading of it).

    A forward pass visits the MoE layers in a fixed cycle, so an expert can only be used again when
    its layer comes round. Staleness = visits of its layer since it was last used (0: used at its
    layer's latest visit). Evict the stalest; among equally stale, the one whose layer comes round
    last (the layer just processed, whose next use is a whole pass away), then least recent.
    Plain LRU gets this backwards in a shared pool: it evicts the next layer's experts, the ones
    needed soonest. With one layer per cache (simulate's per-layer mode) it reduces to LRU at
    token granularity.
    """
    name = "least-stale"

    def __init__(self, n_slots, clock, seed=0):
        super().__init__(n_slots, clock, seed)
        self.vlast = np.zeros(n_slots, np.int64)
        self.pos = np.zeros(n_slots, np.int64)

    def insert(self, slot, key, pos, prefetch=False):
        super().insert(slot, key, pos, prefetch)
        self.vlast[slot], self.pos[slot] = self.clock.visits[pos], pos

    def touch(self, slot, key, pos):
        super().touch(slot, key, pos)
        self.vlast[slot] = self.clock.visits[pos]

    def victim(self, mask):
        c = np.flatnonzero(mask)
        n = self.clock.n_layers
        stale = self.clock.visits[self.pos[c]] - self.vlast[c]
        ahead = (self.pos[c] - self.clock.cur - 1) % n + 1        # steps until its layer comes round
        score = stale * (n + 1) + ahead
        return int(c[np.lexsort((self.last[c], -score))[0]])


class RandomPolicy(EvictionPolicy):
    name = "random"

    def __init__(self, n_slots, clock, seed=0):
        super().__init__(n_slots, clock, seed)
        self.rng = np.random.default_rng(seed)

    def victim(self, mask):
        c = np.flatnonzero(mask)
        return int(c[self.rng.integers(len(c))])


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "least-stale": LeastStalePolicy, "random": RandomPolicy,
}


def make_policy(policy, n_slots: int, clock: Clock, seed: int = 0) -> EvictionPolicy:
    if isinstance(policy, EvictionPolicy):
        return policy
    if isinstance(policy, type) and issubclass(policy, EvictionPolicy):
        return policy(n_slots, clock, seed)
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy](n_slots, clock, seed)
    raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)}, none)")


# --------------------------------------------------------------------------- files and I/O

class _File:
    """One source file: a buffered fd, and an O_DIRECT fd while the file system accepts it."""

    def __init__(self, path: Path, direct: bool):
        self.path = path
        try:
            self.size = os.stat(path).st_size
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        self.dfd = -1
        self.note: str | None = None
        if direct:
            if not hasattr(os, "O_DIRECT"):
                self.note = "O_DIRECT is not available on this platform"
            else:
                try:
                    self.dfd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    self.note = f"{path}: O_DIRECT refused by the file system ({e.strerror}); buffered reads"

    @property
    def direct(self) -> bool:
        return self.dfd >= 0 and self.note is None

    def refuse_direct(self, why: str) -> None:
        # the O_DIRECT fd stays open until close(): another thread may be reading from it
        if self.note is None:
            self.note = f"{self.path}: O_DIRECT read failed ({why}); buffered reads"

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.dfd = -1


class _IoMeter:
    """Bytes, requests, and the wall time during which at least one read was in flight."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inflight = 0
        self.t0 = 0.0
        self.busy = 0.0
        self.bytes = {"demand": 0, "prefetch": 0}
        self.ops = 0

    def begin(self) -> None:
        with self.lock:
            if self.inflight == 0:
                self.t0 = time.perf_counter()
            self.inflight += 1

    def end(self, nbytes: int, kind: str) -> None:
        with self.lock:
            self.inflight -= 1
            if self.inflight == 0:
                self.busy += time.perf_counter() - self.t0
            self.bytes[kind] += nbytes
            self.ops += 1

    def reset(self) -> None:
        with self.lock:
            self.busy, self.ops = 0.0, 0
            self.bytes = {"demand": 0, "prefetch": 0}
            if self.inflight:
                self.t0 = time.perf_counter()


def _pread_into(f: _File, mv: memoryview, off: int, meter: _IoMeter, kind: str) -> int:
    """Fill mv with the file's bytes at off (an aligned superset; stops at EOF). Returns bytes read."""
    need = min(len(mv), f.size - off)
    got = 0
    meter.begin()
    try:
        while got < need:
            direct = f.direct
            fd = f.dfd if direct else f.fd
            try:
                n = os.preadv(fd, [mv[got:]], off + got)
            except OSError as e:
                if direct and e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.EFAULT):
                    f.refuse_direct(e.strerror or str(e))
                    continue
                raise CheckpointError(f"{f.path}: read of bytes [{off + got}, {off + len(mv)}) failed: "
                                      f"{e.strerror}") from None
            if n == 0:
                break
            got += n
    finally:
        meter.end(got, kind)
    if got < need:
        raise CheckpointError(f"{f.path}: file is truncated: wanted bytes up to {off + need}, "
                              f"got {off + got}")
    return got


class _Load:
    """The reads filling one slot."""
    __slots__ = ("slot", "key", "kind", "futures", "remaining", "error", "event", "pool")

    def __init__(self, slot, key, kind):
        self.slot, self.key, self.kind = slot, key, kind
        self.futures: list = []
        self.remaining = 0
        self.error: BaseException | None = None
        self.event = threading.Event()


# --------------------------------------------------------------------------- the store

class ExpertStore:
    """Routed experts served from a budgeted pool of slots (see the module docstring)."""

    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, layers, hidden: int, moe_inter: int,
                 budget_bytes: int | None = None, policy="lru", io_threads: int = 8,
                 direct_io: bool = False, prefetch: bool = True, *, n_experts: int | None = None,
                 pack: str | os.PathLike | bool | None = "auto", chunk_bytes: int = CHUNK_BYTES,
                 prefetch_threads: int | None = None, max_prefetch_inflight: int = 8,
                 pin_wait_s: float = 30.0, none_io: str = "mmap", n_slots: int | None = None,
                 seed: int = 0):
        self.ckpt, self.qcfg = ckpt, qcfg
        self.geom = _geometry(ckpt, layers, hidden, moe_inter, n_experts)
        self.pos = {layer: i for i, layer in enumerate(self.geom.layers)}
        self.policy_name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
        self.mode = "none" if policy == "none" else "slots"
        if none_io not in ("mmap", "pread"):
            raise ValueError(f"none_io must be 'mmap' or 'pread', got {none_io!r}")
        self.none_io = none_io
        if chunk_bytes <= 0 or chunk_bytes % PAGE:
            raise ValueError(f"chunk_bytes must be a positive multiple of {PAGE}, got {chunk_bytes}")
        self.prefetch_enabled = bool(prefetch)
        self.max_prefetch_inflight = int(max_prefetch_inflight)
        self.pin_wait_s = float(pin_wait_s)
        # reentrant: a read may finish (and its done-callback run) while the lock is held
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._explicit: dict[tuple[int, int], int] = {}
        self._released: deque = deque()
        self._meter = _IoMeter()
        self._closed = False

        # where every expert's bytes are: the pack if present and current, else the checkpoint
        self.pack_note: str | None = None
        self.files: list[_File] = []
        self._file_index: dict[Path, int] = {}
        self._plans: dict[tuple[int, int], _Plan] = {}     # made on first use of each expert
        self._build = build_linear
        self._chunk_bytes = int(chunk_bytes)
        self.direct_io = bool(direct_io)
        self._pack = None
        try:
            first = next(self.geom.keys(), None)
            if first is None:
                raise CheckpointError(f"{ckpt.folder}: no routed experts to serve")
            self._template = [p for p, _ in expert_parts(ckpt, qcfg, first[0], first[1], self.geom)]
            self.expert_nbytes = sum(p.nbytes for p in self._template)   # tensor bytes of one expert
            self._pack = self._open_pack(pack)
            if self._pack is not None:
                self.slot_bytes = self._pack.block_bytes
            else:
                self.slot_bytes = slot_bound(self._template)
        except BaseException:
            for f in self.files:
                f.close()
            raise
        self.source = "pack" if self._pack is not None else "checkpoint"
        self.n_experts_total = sum(self.geom.n_experts.values())
        self._checked: set = set()

        if n_slots is not None:                   # a slot count instead of a byte budget
            budget_bytes = int(n_slots) * self.slot_bytes
        if budget_bytes is None:
            budget_bytes = default_budget_bytes() if self.mode == "slots" else 0
        self.budget_bytes = int(budget_bytes)
        io_threads = max(1, int(io_threads))
        self._demand_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="expert-read")
        self._prefetch_pool = ThreadPoolExecutor(
            max(1, prefetch_threads if prefetch_threads is not None else io_threads // 4),
            thread_name_prefix="expert-prefetch")
        self._stats = dict.fromkeys((
            "gets", "hits", "misses", "hits_inflight", "prefetch_issued", "prefetch_used",
            "prefetch_dropped", "prefetch_redundant", "prefetch_wasted", "prefetch_failed",
            "evictions"), 0)
        self._wait_s = 0.0
        self.n_slots = 0
        if self.mode == "none":
            return
        # never more slots than experts: a budget beyond the model's experts would be memory held for nothing
        self.n_slots = min(self.budget_bytes // self.slot_bytes, self.n_experts_total)
        if self.n_slots < 1:
            self.close()
            raise ValueError(f"an expert cache of {gib(self.budget_bytes)} holds no expert: one expert "
                             f"needs {gib(self.slot_bytes)}")
        self.budget_bytes = min(self.budget_bytes, self.n_experts_total * self.slot_bytes)
        # page-aligned and faulted in now: reads into fresh pages would pay the faults inside the read
        self._pool = anonymous_buffer(self.n_slots * self.slot_bytes, populate=True)
        self._pool_mv = memoryview(self._pool)
        n = self.n_slots
        self._key: list = [None] * n
        self._state = np.zeros(n, np.int8)
        self._pins = np.zeros(n, np.int64)
        self._protect = np.full(n, -10, np.int64)     # prefetch may not evict while step <= this
        self._unused_prefetch = np.zeros(n, bool)
        self._load: list[_Load | None] = [None] * n
        self._free = list(range(n - 1, -1, -1))
        self._map: dict[tuple[int, int], int] = {}
        self._prefetch_inflight = 0
        self._max_resident = 0
        self.clock = Clock(len(self.geom.layers))
        self._cur_layer = None
        self.policy = make_policy(policy, n, self.clock, seed)

    @classmethod
    def open(cls, folder: str | os.PathLike, budget_bytes: int | None = None, policy="lru", **kw) -> "ExpertStore":
        """A store for a checkpoint folder (config.json gives the MoE layers and shapes)."""
        geom, qcfg = ExpertGeometry.from_folder(folder)
        ckpt = Checkpoint(folder)
        try:
            store = cls(ckpt, qcfg, dict(geom.n_experts), geom.hidden, geom.moe_inter, budget_bytes,
                        policy, **kw)
        except BaseException:
            ckpt.close()
            raise
        store._own_ckpt = True
        return store

    # ---- planning

    def _file_id(self, path: Path) -> int:
        with self._lock:
            fid = self._file_index.get(path)
            if fid is None:
                fid = self._file_index[path] = len(self.files)
                self.files.append(_File(path, self.direct_io))
            return fid

    def _plan(self, key: tuple[int, int]) -> _Plan:
        """Where expert `key`'s bytes are (made once, from headers only)."""
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if self._pack is not None:
            info = self._pack
            off, cb = info.offsets[key], self._chunk_bytes
            fid = self._file_id(info.data_path)
            chunks = [(fid, c, min(cb, off + info.block_bytes - c), c - off)
                      for c in range(off, off + info.block_bytes, cb)]
            plan = _Plan(chunks, list(info.parts), info.block_bytes, info.data_bytes)
        else:
            layer, e = key
            parts = expert_parts(self.ckpt, self.qcfg, layer, e, self.geom)
            specs = [p for p, _ in parts]
            if specs != self._template:
                raise CheckpointError(f"{self.ckpt.folder}: expert {e} of layer {layer} is stored as "
                                      f"{specs}, unlike the first expert ({self._template})")
            checks = tuple(f"model.layers.{layer}.mlp.experts.{e}.{p.module}.weight_shape"
                           for p in specs if p.role == "weight_packed")
            plan = _plan_from_tensors(parts, self._file_id, self._chunk_bytes, checks)
            if plan.nbytes > self.slot_bytes:      # gaps merged into a span: read the parts apart
                plan = _plan_from_tensors(parts, self._file_id, self._chunk_bytes, checks, merge_gap=0)
        self._plans[key] = plan
        return plan

    def _open_pack(self, pack):
        if pack in (None, False, "off"):
            return None
        from .prepare import PackError, open_pack
        index = Path(self.ckpt.folder) / PACK_INDEX if pack in (True, "auto") else Path(pack)
        if index.is_dir():
            index = index / PACK_INDEX
        if not index.exists():
            if pack not in (True, "auto"):
                raise CheckpointError(f"{index}: no expert pack index there")
            return None
        try:
            info = open_pack(index, self.ckpt, self.qcfg, self.geom)
        except PackError as e:
            if pack != "auto":
                raise
            self.pack_note = f"expert pack ignored: {e}"
            return None
        self._build = info.byte_format.build
        return info

    # ---- public API

    def get(self, layer: int, e: int):
        """(gate, up, down) Linear triple of expert e of `layer`; its slot stays pinned while any
        array of the triple (or a view of one) is alive."""
        key = self._key_of(layer, e)
        self._plan(key)                            # header problems raise here, before any state changes
        if self.mode == "none":
            return self._get_uncached(key)
        with self._cond:
            self._enter(key[0])
            slot = self._acquire(key, wait=True)
        return self._finish(slot, key)

    def get_many(self, layer: int, experts: Iterable[int]) -> Iterator[tuple[int, tuple]]:
        """Yield (e, triple) for every expert listed, with all of their misses in flight at once.

        Resident experts come first, then the loaded ones in the order their reads were issued.
        Drop each triple before asking for the next when the budget is tight.
        """
        ids = list(dict.fromkeys(int(e) for e in experts))
        keys = [self._key_of(layer, e) for e in ids]
        for key in keys:
            self._plan(key)
        if self.mode == "none":
            for key in keys:
                yield key[1], self._get_uncached(key)
            return
        slots: dict = {}
        with self._cond:
            self._enter(layer)
            for key in keys:                       # hits and as many misses as fit, without waiting
                slot = self._acquire(key, wait=False)
                if slot is not None:
                    slots[key] = slot
        done = set()
        try:
            order = sorted(slots, key=lambda k: self._state[slots[k]] != READY)
            for key in order:
                slot = slots[key]
                done.add(key)
                yield key[1], self._finish(slot, key)
            for key in keys:                       # whatever did not fit: one at a time
                if key in done:
                    continue
                with self._cond:
                    slot = self._acquire(key, wait=True)
                done.add(key)
                yield key[1], self._finish(slot, key)
        finally:
            with self._cond:                        # generator closed early: release claimed pins
                for key, slot in slots.items():
                    if key not in done:
                        self._unpin(slot)

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Start speculative reads of experts of `layer`; returns how many were issued."""
        if not self.prefetch_enabled or self._closed:
            return 0
        keys = [self._key_of(layer, int(e)) for e in experts]
        for key in keys:
            self._plan(key)
        if self.mode == "none":
            for key in keys:
                for fid, off, n, _ in self._plan(key).chunks:
                    try:
                        os.posix_fadvise(self.files[fid].fd, off, n, os.POSIX_FADV_WILLNEED)
                    except (OSError, AttributeError):
                        break
            with self._lock:
                self._stats["prefetch_issued"] += len(keys)
            return len(keys)
        issued = 0
        with self._cond:
            self._drain()
            for key in keys:
                if key in self._map:
                    self._stats["prefetch_redundant"] += 1
                    continue
                if self._prefetch_inflight >= self.max_prefetch_inflight:
                    self._stats["prefetch_dropped"] += 1
                    continue
                slot = self._claim(demand=False)
                if slot is None:
                    self._stats["prefetch_dropped"] += 1
                    continue
                self._install(slot, key, demand=False)
                issued += 1
        return issued

    def pin(self, layer: int, e: int) -> None:
        """Load (if needed) and hold expert e of `layer` in its slot until unpin()."""
        key = self._key_of(layer, e)
        if self.mode == "none":
            return
        self._plan(key)
        with self._cond:
            slot = self._acquire(key, wait=True)
        try:
            self._wait_loaded(slot, key)
        except BaseException:
            with self._cond:
                self._unpin(slot)
            raise
        with self._cond:
            self._explicit[key] = self._explicit.get(key, 0) + 1

    def unpin(self, layer: int, e: int) -> None:
        key = self._key_of(layer, e)
        if self.mode == "none":
            return
        with self._cond:
            slot = self._map.get(key)
            if slot is None or not self._explicit.get(key):
                raise ValueError(f"expert {e} of layer {layer} is not pinned")
            self._explicit[key] -= 1
            if not self._explicit[key]:
                del self._explicit[key]
            self._unpin(slot)

    @contextmanager
    def pinned(self, layer: int, experts: Iterable[int]):
        """with store.pinned(layer, ids) as triples: ... (slots held until the block ends)."""
        ids = [int(e) for e in experts]
        held = []
        try:
            for e in ids:
                self.pin(layer, e)
                held.append(e)
            yield [self.get(layer, e) for e in ids]
        finally:
            for e in held:
                self.unpin(layer, e)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no expert read is in flight; False on timeout."""
        if self.mode == "none":
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while np.any(self._state == LOADING):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
            return True

    def resident(self) -> list[tuple[int, int]]:
        """Keys of the experts in slots (loaded or loading)."""
        if self.mode == "none":
            return []
        with self._lock:
            return list(self._map)

    def missing(self, layer: int, experts: Iterable[int]) -> list[int]:
        """The experts of `layer` among these that are neither resident nor being read."""
        ids = [int(e) for e in experts]
        if self.mode == "none":
            return ids
        with self._lock:
            return [e for e in ids if self._key_of(layer, e) not in self._map]

    def extents(self, layer: int, e: int) -> list[tuple[Path, int, int]]:
        """(file, offset, bytes) of the reads that fill expert e's slot (4 KiB-aligned, in order)."""
        plan = self._plan(self._key_of(layer, e))
        return [(self.files[fid].path, off, n) for fid, off, n, _ in plan.chunks]

    def stats(self) -> dict:
        with self._lock:
            if self.mode == "slots":
                self._drain()
            s = dict(self._stats)
            m = self._meter
            with m.lock:
                busy = m.busy + (time.perf_counter() - m.t0 if m.inflight else 0.0)
                bd, bp, ops = m.bytes["demand"], m.bytes["prefetch"], m.ops
            resident = 0 if self.mode == "none" else int(np.count_nonzero(self._state != FREE)) * self.slot_bytes
            looked = s["hits"] + s["misses"]
            s.update(
                policy=self.policy_name, mode=self.mode, source=self.source, pack_note=self.pack_note,
                direct_io=self.direct_io and any(f.direct for f in self.files),
                direct_io_note=next((f.note for f in self.files if f.note), None) if self.direct_io else None,
                hit_rate=s["hits"] / looked if looked else 0.0,
                prefetch_recall=s["prefetch_used"] / s["prefetch_issued"] if s["prefetch_issued"] else 0.0,
                prefetch_coverage=(s["prefetch_used"] / (s["prefetch_used"] + s["misses"])
                                   if s["prefetch_used"] + s["misses"] else 0.0),
                bytes_read_demand=bd, bytes_read_prefetch=bp, read_ops=ops, read_seconds=busy,
                read_gbps=(bd + bp) / busy / 1e9 if busy > 0 else 0.0, wait_seconds=self._wait_s,
                resident_bytes=resident, max_resident_bytes=(self._max_resident if self.mode == "slots" else 0),
                resident_experts=len(self._map) if self.mode == "slots" else 0,
                pinned_slots=int(np.count_nonzero(self._pins)) if self.mode == "slots" else 0,
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
        if self._closed:
            return
        self._closed = True
        for pool in ("_demand_pool", "_prefetch_pool"):
            if hasattr(self, pool):
                getattr(self, pool).shutdown(wait=True, cancel_futures=True)
        for f in self.files:
            f.close()
        if getattr(self, "_own_ckpt", False):
            self.ckpt.close()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ExpertStore({self.policy_name}, {self.n_slots} slots x {self.slot_bytes} B, "
                f"budget {self.budget_bytes} B, source {self.source})")

    # ---- internals (the _locked ones run with self._lock held)

    def _key_of(self, layer: int, e: int) -> tuple[int, int]:
        key = (int(layer), int(e))
        n = self.geom.n_experts.get(key[0])
        if n is None or not 0 <= key[1] < n:
            what = (f"layer {layer} is not a MoE layer (MoE layers: {list(self.geom.layers)})" if n is None
                    else f"layer {layer} has experts 0..{n - 1}")
            raise KeyError(f"no routed expert {e} in layer {layer}: {what}")
        return key

    def _enter(self, layer: int) -> None:  # locked
        if layer != self._cur_layer:
            self._cur_layer = layer
            self.clock.visit(self.pos[layer])

    def _drain(self) -> None:  # locked: apply unpins from lease finalizers
        while self._released:
            self._unpin(self._released.popleft())

    def _unpin(self, slot: int) -> None:  # locked
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and self._state[slot] == FAILED:
            self._release_slot(slot)
        self._cond.notify_all()

    def _release_slot(self, slot: int) -> None:  # locked
        self._state[slot] = FREE
        self._key[slot] = None
        self._load[slot] = None
        self._unused_prefetch[slot] = False
        self._free.append(slot)

    def _acquire(self, key, wait: bool) -> int | None:  # locked; pins the slot it returns
        self._drain()
        self.clock.tick += 1
        self._stats["gets"] += 1
        slot = self._map.get(key)
        if slot is None:
            deadline = time.monotonic() + self.pin_wait_s
            while True:
                slot = self._claim(demand=True)
                if slot is not None or not wait:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stats["gets"] -= 1
                    raise ExpertStoreFull(
                        f"expert store: all {self.n_slots} slots are pinned or loading after waiting "
                        f"{self.pin_wait_s:.0f} s for expert {key[1]} of layer {key[0]}; raise the expert cache "
                        f"({gib(self.budget_bytes)}, {gib(self.slot_bytes)} per expert) or hold fewer triples")
                self._cond.wait(min(left, 0.01))
                self._drain()
                slot = self._map.get(key)          # someone else may have loaded it meanwhile
                if slot is not None:
                    break
            if slot is None:
                self._stats["gets"] -= 1
                return None
            if self._key[slot] != key:
                self._stats["misses"] += 1
                self._install(slot, key, demand=True)
                self._pins[slot] += 1
                self._protect[slot] = self.clock.step + 1
                return slot
        self._stats["hits"] += 1
        if self._state[slot] == LOADING:
            self._stats["hits_inflight"] += 1
            self._promote(self._load[slot])
        if self._unused_prefetch[slot]:
            self._unused_prefetch[slot] = False
            self._stats["prefetch_used"] += 1
        self.policy.touch(slot, key, self.pos[key[0]])
        self._pins[slot] += 1
        self._protect[slot] = self.clock.step + 1
        return slot

    def _claim(self, demand: bool) -> int | None:  # locked: a free slot, or evict the policy's victim
        if self._free:
            return self._free.pop()
        mask = (self._state == READY) & (self._pins == 0)
        if not demand:
            mask &= self._protect < self.clock.step
        if not mask.any():
            return None
        victim = self.policy.victim(mask)
        old = self._key[victim]
        self.policy.remove(victim, old)
        del self._map[old]
        self._stats["evictions"] += 1
        if self._unused_prefetch[victim]:
            self._stats["prefetch_wasted"] += 1
        self._release_slot(victim)
        return self._free.pop()

    def _install(self, slot: int, key, demand: bool) -> None:  # locked: start reading key into slot
        self._map[key] = slot
        self._key[slot] = key
        self._state[slot] = LOADING
        self._unused_prefetch[slot] = not demand
        self._protect[slot] = self.clock.step + 1
        self.policy.insert(slot, key, self.pos[key[0]], prefetch=not demand)
        kind = "demand" if demand else "prefetch"
        load = _Load(slot, key, kind)
        self._load[slot] = load
        self._max_resident = max(self._max_resident,
                                 int(np.count_nonzero(self._state != FREE)) * self.slot_bytes)
        if not demand:
            self._stats["prefetch_issued"] += 1
            self._prefetch_inflight += 1
        pool = self._demand_pool if demand else self._prefetch_pool
        plan = self._plan(key)
        base = slot * self.slot_bytes
        check = bool(plan.shape_checks) and key not in self._checked
        load.remaining = len(plan.chunks) + check
        load.pool = pool
        if check:       # weight_shape values: tiny reads, in flight with the slot's (not after them)
            pool.submit(self._check_shapes, key).add_done_callback(
                lambda f, load=load: self._chunk_done(load, None, None, f))
        for chunk in plan.chunks:
            load.futures.append(self._submit(pool, load, chunk, base))

    def _submit(self, pool, load: _Load, chunk, base: int):
        fid, off, n, soff = chunk
        mv = self._pool_mv[base + soff: base + soff + n]
        kind = load.kind
        fut = pool.submit(_pread_into, self.files[fid], mv, off, self._meter, kind)
        fut.add_done_callback(lambda f, load=load, chunk=chunk, base=base: self._chunk_done(load, chunk, base, f))
        return fut

    def _promote(self, load: _Load | None) -> None:  # locked: move unstarted prefetch chunks to the demand pool
        if load is None or load.pool is self._demand_pool:
            return
        load.pool = self._demand_pool
        plan = self._plan(load.key)
        for i, fut in enumerate(load.futures):
            if fut.cancel():
                load.futures[i] = self._submit(self._demand_pool, load, plan.chunks[i], load.slot * self.slot_bytes)

    def _chunk_done(self, load: _Load, chunk, base, fut) -> None:
        if fut.cancelled():
            if not self._closed:
                return          # promoted: a replacement future was submitted
            err: BaseException | None = CheckpointError("expert store closed during a read")
        else:
            err = fut.exception()
        with self._cond:
            if err is not None and load.error is None:
                load.error = err
            load.remaining -= 1
            if load.remaining > 0:
                return
            slot = load.slot
            if load.kind == "prefetch":
                self._prefetch_inflight -= 1
            if load.error is None:
                self._state[slot] = READY
            else:
                if load.kind == "prefetch":
                    self._stats["prefetch_failed"] += 1
                if self._map.get(load.key) == slot:
                    del self._map[load.key]
                    self.policy.remove(slot, load.key)
                self._state[slot] = FAILED
                if self._pins[slot] == 0:
                    self._release_slot(slot)
            load.event.set()
            self._cond.notify_all()

    def _wait_loaded(self, slot: int, key) -> None:
        load = self._load[slot]
        if load is not None and not load.event.is_set():
            t0 = time.perf_counter()
            load.event.wait()
            with self._lock:
                self._wait_s += time.perf_counter() - t0
        if load is not None and load.error is not None:
            raise load.error
        if key not in self._checked and self._plan(key).shape_checks:
            self._check_shapes(key)

    def _check_shapes(self, key) -> None:
        for name in self._plan(key).shape_checks:
            check_weight_shape(self.ckpt, self.ckpt.info(name), self.geom.shape(name.split(".")[-2]))
        self._checked.add(key)

    def _finish(self, slot: int, key):
        """Wait for the slot's reads, then build the triple as a lease on the slot."""
        try:
            self._wait_loaded(slot, key)
        except BaseException:
            with self._cond:
                self._unpin(slot)
            raise
        base = slot * self.slot_bytes
        root = np.frombuffer(self._pool_mv[base: base + self.slot_bytes], np.uint8)
        root.flags.writeable = False
        fin = weakref.finalize(root, self._released.append, slot)   # pin held by `root` and its views
        fin.atexit = False
        return self._triple(root, self._plan(key))

    def _triple(self, root: np.ndarray, plan: _Plan):
        views: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODULES}
        for spec, off in plan.parts:
            dt = DTYPES[spec.dtype]
            views[spec.module][spec.role] = root[off: off + spec.nbytes].view(dt).reshape(spec.shape)
        return tuple(self._build(views[m], self.geom.shape(m), self.qcfg) for m in MODULES)

    def _get_uncached(self, key):
        with self._lock:
            self._stats["gets"] += 1
        layer, e = key
        if self.none_io == "mmap":
            p = f"model.layers.{layer}.mlp.experts.{e}."
            return tuple(load_linear(self.ckpt, p + m, self.qcfg, self.geom.shape(m)) for m in MODULES)
        plan = self._plan(key)
        buf = mmap.mmap(-1, _round_up(plan.nbytes, PAGE))
        mv = memoryview(buf)
        futs = [self._demand_pool.submit(_pread_into, self.files[fid], mv[soff: soff + n], off,
                                         self._meter, "demand")
                for fid, off, n, soff in plan.chunks]
        t0 = time.perf_counter()
        for f in futs:
            f.result()
        with self._lock:
            self._wait_s += time.perf_counter() - t0
        if key not in self._checked and plan.shape_checks:
            self._check_shapes(key)
        root = np.frombuffer(mv, np.uint8)
        root.flags.writeable = False
        return self._triple(root, plan)


# --------------------------------------------------------------------------- read benchmark

def _bench_make(folder: Path, gb: float, seed: int = 0) -> Path:
    """A checkpoint of K2-shaped INT4 experts with random bytes (2 MoE layers), ~gb GB."""
    from .safetensors import TensorSpec, write_checkpoint
    hidden, inter, group = 7168, 2048, 32
    per_expert = 3 * (inter * hidden // 2 + inter * hidden // group * 2)
    n = max(2, int(gb * 1e9 / per_expert) // 2 * 2)
    rng = np.random.default_rng(seed)
    specs = []
    for layer in (1, 2):
        for e in range(n // 2):
            for m in MODULES:
                o, i = (hidden, inter) if m == "down_proj" else (inter, hidden)
                p = f"model.layers.{layer}.mlp.experts.{e}.{m}"
                specs += [
                    TensorSpec(p + ".weight_packed", "I32", (o, i // 8),
                               lambda o=o, i=i: np.frombuffer(rng.bytes(o * i // 2), np.int32).reshape(o, i // 8)),
                    TensorSpec(p + ".weight_scale", "BF16", (o, i // group),
                               lambda o=o, i=i: np.full((o, i // group), 0.01, DTYPES["BF16"])),
                    TensorSpec(p + ".weight_shape", "I64", (2,), lambda o=o, i=i: np.array([o, i], np.int64))]
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, specs, shards=max(1, int(gb // 1)))
    cfg = {"num_hidden_layers": 3, "hidden_size": hidden, "moe_intermediate_size": inter,
           "n_routed_experts": n // 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "quantization_config": {
               "quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed", "kv_cache_scheme": None,
               "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                             "output_activations": None,
                                             "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "group", "group_size": group,
                                                         "dynamic": False, "actorder": None,
                                                         "block_structure": None}}},
               "ignore": []}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _bench_drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _bench_pass(folder: Path, cold: bool, **kw) -> dict:
    """Read every expert once through a store (get_many per layer); wall-clock GB/s.

    A first, unmeasured pass faults in the slot pool (a long-running store reuses its slots);
    the measured pass then misses on every expert again (LRU over a cycle longer than the pool).
    """
    store = ExpertStore.open(folder, **kw)

    def one_pass() -> int:
        n_bytes = 0
        for layer in store.geom.layers:
            ids = range(store.geom.n_experts[layer])
            if store.mode == "none":       # mmap views: touch one byte per page (the faults)
                for e in ids:
                    for lin in store.get(layer, e):
                        for a in (lin.packed, lin.scale):
                            int(a.reshape(-1).view(np.uint8)[::PAGE].sum())
                        n_bytes += lin.nbytes
                continue
            for _, triple in store.get_many(layer, ids):
                n_bytes += sum(lin.nbytes for lin in triple)
                del triple
        return n_bytes

    try:
        if store.mode == "slots":
            one_pass()
        if cold:
            _bench_drop_cache([f.path for f in store.files])
        store.reset_stats()
        t0 = time.perf_counter()
        n_bytes = one_pass()
        dt = time.perf_counter() - t0
        s = store.stats()
        return {"GB": round(n_bytes / 1e9, 3), "s": round(dt, 3), "GB/s": round(n_bytes / dt / 1e9, 2),
                "store_read_GB/s": round(s["read_gbps"], 2), "hits": s["hits"], "direct_io": s["direct_io"],
                "note": s["direct_io_note"] or s["pack_note"]}
    finally:
        store.close()


if __name__ == "__main__":   # python -m kimi_desktop.offload.experts --dir DIR [--gb 2] [--keep]
    import argparse
    import shutil

    ap = argparse.ArgumentParser(description="expert-store read throughput: page cache vs O_DIRECT")
    ap.add_argument("--dir", required=True, help="scratch folder on the disk to measure (created, then deleted)")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    root = Path(a.dir)
    try:
        t0 = time.perf_counter()
        folder = _bench_make(root / "ckpt", a.gb)
        print(f"wrote fake experts in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = [
            ("pread, page cache, cold", True, dict(io_threads=8)),
            ("pread, page cache, warm", False, dict(io_threads=8)),
            ("pread, page cache, warm, 2 thr", False, dict(io_threads=2)),
            ("O_DIRECT, 1 thread", True, dict(io_threads=1, direct_io=True)),
            ("O_DIRECT, 4 threads", True, dict(io_threads=4, direct_io=True)),
            ("O_DIRECT, 8 threads", True, dict(io_threads=8, direct_io=True)),
            ("O_DIRECT, 16 threads", True, dict(io_threads=16, direct_io=True)),
            ("none (mmap faults), cold", True, dict(policy="none")),
            ("none (mmap faults), warm", False, dict(policy="none")),
        ]
        from .prepare import prepare_checkpoint
        for name, cold, kw in runs:
            kw.setdefault("n_slots", 16)
            kw.setdefault("pack", "off")
            print(f"{name:34s} {_bench_pass(folder, cold, **kw)}", flush=True)
        t0 = time.perf_counter()
        prepare_checkpoint(folder)
        print(f"prepare (pack) in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, cold, kw in [("pack, O_DIRECT, 8 threads", True, dict(io_threads=8, direct_io=True)),
                               ("pack, pread, cold", True, dict(io_threads=8)),
                               ("pack, pread, warm", False, dict(io_threads=8)),
                               ("pack, pread, warm, 2 thr", False, dict(io_threads=2))]:
            print(f"{name:34s} {_bench_pass(folder, cold, n_slots=16, **kw)}", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
