"""The slot store: routed experts served from a budgeted pool of equal slots (see offload/experts.py).

State per slot: key, state (FREE, LOADING, READY, FAILED), pins, protect (the layer step until
which prefetch may not evict it), unused_prefetch, and the _Load filling it. Everything under
self._lock; reads complete on reader threads and report through _chunk_done.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from .expert_io import ReaderPools, read_into
from .expert_policies import Clock, make_policy
from .expert_store import ExpertStore, ExpertStoreFull, default_budget_bytes, gib
from .safetensors import CheckpointError, anonymous_buffer

__all__ = ["SlotStore"]

FREE, LOADING, READY, FAILED = 0, 1, 2, 3


class _Load:
    """The reads filling one slot."""
    __slots__ = ("slot", "key", "kind", "futures", "remaining", "error", "event", "pool")

    def __init__(self, slot, key, kind):
        self.slot, self.key, self.kind = slot, key, kind
        self.futures: list = []
        self.remaining = 0
        self.error: BaseException | None = None
        self.event = threading.Event()


class SlotStore(ExpertStore):
    mode = "slots"

    def __init__(self, catalog, options):
        super().__init__(catalog, options)
        self.max_prefetch_inflight = int(options.max_prefetch_inflight)
        self.pin_wait_s = float(options.pin_wait_s)
        # never more slots than experts: a budget beyond the model's experts would be memory held for nothing
        self.n_slots = min(self.budget_bytes // self.slot_bytes, self.n_experts_total)
        if self.n_slots < 1:
            raise ValueError(f"an expert cache of {gib(self.budget_bytes)} holds no expert: one expert "
                             f"needs {gib(self.slot_bytes)}")
        self.budget_bytes = min(self.budget_bytes, self.n_experts_total * self.slot_bytes)
        self._pools = ReaderPools(options.io_threads, options.prefetch_threads)
        self._released: deque = deque()       # slots whose lease died (finalizers run anywhere)
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
        self.pos = {layer: i for i, layer in enumerate(self.geom.layers)}
        self.clock = Clock(len(self.geom.layers))
        self._cur_layer = None
        self.policy = make_policy(options.policy, n, self.clock, options.seed)

    def _default_budget(self) -> int:
        return default_budget_bytes()

    # ---- the interface

    def get(self, layer: int, e: int):
        """(gate, up, down) Linear triple of expert e of `layer`; its slot stays pinned while any
        array of the triple (or a view of one) is alive."""
        (key,) = self._keys(layer, [e])
        with self._cond:
            self._enter(key[0])
            slot = self._acquire(key, wait=True)
        return self._finish(slot, key)

    def get_many(self, layer: int, experts: Iterable[int]) -> Iterator[tuple[int, tuple]]:
        """Yield (e, triple) for every expert listed, with all of their misses in flight at once.

        Resident experts come first, then the loaded ones in the order their reads were issued.
        Drop each triple before asking for the next when the budget is tight.
        """
        keys = self._keys(layer, dict.fromkeys(int(e) for e in experts))
        slots: dict = {}
        with self._cond:
            self._enter(int(layer))
            for key in keys:                       # hits and as many misses as fit, without waiting
                slot = self._acquire(key, wait=False)
                if slot is not None:
                    slots[key] = slot
        done = set()
        try:
            order = sorted(slots, key=lambda k: self._state[slots[k]] != READY)
            for key in order:
                done.add(key)
                yield key[1], self._finish(slots[key], key)
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
        """Start speculative reads of experts of `layer` into free or evictable slots (see
        offload/experts.py: Prefetch); returns how many were issued."""
        if not self.prefetch_enabled or self._closed:
            return 0
        keys = self._keys(layer, experts)
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

    def resident(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._map)

    def missing(self, layer: int, experts: Iterable[int]) -> list[int]:
        ids = [int(e) for e in experts]
        with self._lock:
            return [e for e in ids if self._key_of(layer, e) not in self._map]

    def _residency(self) -> dict:  # locked
        self._drain()
        return {"resident_bytes": int(np.count_nonzero(self._state != FREE)) * self.slot_bytes,
                "max_resident_bytes": self._max_resident, "resident_experts": len(self._map),
                "pinned_slots": int(np.count_nonzero(self._pins)),
                "loading_experts": int(np.count_nonzero(self._state == LOADING))}

    # ---- slot bookkeeping (these run with self._lock held)

    def _enter(self, layer: int) -> None:
        if layer != self._cur_layer:
            self._cur_layer = layer
            self.clock.visit(self.pos[layer])

    def _drain(self) -> None:  # apply unpins from lease finalizers
        while self._released:
            self._unpin(self._released.popleft())

    def _unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and self._state[slot] == FAILED:
            self._release_slot(slot)
        self._cond.notify_all()

    def _release_slot(self, slot: int) -> None:
        self._state[slot] = FREE
        self._key[slot] = None
        self._load[slot] = None
        self._unused_prefetch[slot] = False
        self._free.append(slot)

    def _acquire(self, key, wait: bool) -> int | None:  # pins the slot it returns
        self._drain()
        self.clock.tick += 1
        self._stats["gets"] += 1
        slot = self._map.get(key)
        if slot is None:
            slot = self._claim_for_demand(key, wait)
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

    def _claim_for_demand(self, key, wait: bool) -> int | None:
        """A slot for a demand miss; with wait, waits up to pin_wait_s (then ExpertStoreFull) and
        returns key's own slot if another thread loaded it meanwhile."""
        deadline = time.monotonic() + self.pin_wait_s
        while True:
            slot = self._claim(demand=True)
            if slot is not None or not wait:
                return slot
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
                return slot

    def _claim(self, demand: bool) -> int | None:  # a free slot, or evict the policy's victim
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

    # ---- reads

    def _install(self, slot: int, key, demand: bool) -> None:  # locked: start reading key into slot
        self._map[key] = slot
        self._key[slot] = key
        self._state[slot] = LOADING
        self._unused_prefetch[slot] = not demand
        self._protect[slot] = self.clock.step + 1
        self.policy.insert(slot, key, self.pos[key[0]], prefetch=not demand)
        load = _Load(slot, key, "demand" if demand else "prefetch")
        self._load[slot] = load
        self._max_resident = max(self._max_resident,
                                 int(np.count_nonzero(self._state != FREE)) * self.slot_bytes)
        if not demand:
            self._stats["prefetch_issued"] += 1
            self._prefetch_inflight += 1
        pool = self._pools.demand if demand else self._pools.prefetch
        plan = self.catalog.plan(key)
        base = slot * self.slot_bytes
        check = self.catalog.needs_shape_check(key)
        load.remaining = len(plan.chunks) + check
        load.pool = pool
        if check:       # weight_shape values: tiny reads, in flight with the slot's (not after them)
            pool.submit(self.catalog.check_shapes, key).add_done_callback(
                lambda f, load=load: self._chunk_done(load, f))
        for chunk in plan.chunks:
            load.futures.append(self._submit(pool, load, chunk, base))

    def _submit(self, pool, load: _Load, chunk, base: int):
        fid, off, n, soff = chunk
        mv = self._pool_mv[base + soff: base + soff + n]
        fut = pool.submit(read_into, self.files[fid], mv, off, self._meter, load.kind)
        fut.add_done_callback(lambda f, load=load: self._chunk_done(load, f))
        return fut

    def _promote(self, load: _Load | None) -> None:  # locked: move unstarted prefetch chunks to the demand pool
        if load is None or load.pool is self._pools.demand:
            return
        load.pool = self._pools.demand
        plan = self.catalog.plan(load.key)
        for i, fut in enumerate(load.futures):
            if fut.cancel():
                load.futures[i] = self._submit(self._pools.demand, load, plan.chunks[i],
                                               load.slot * self.slot_bytes)

    def _chunk_done(self, load: _Load, fut) -> None:
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
            self._loaded(load)
            load.event.set()
            self._cond.notify_all()

    def _loaded(self, load: _Load) -> None:  # locked: the last read of a slot finished
        slot = load.slot
        if load.kind == "prefetch":
            self._prefetch_inflight -= 1
        if load.error is None:
            self._state[slot] = READY
            return
        if load.kind == "prefetch":
            self._stats["prefetch_failed"] += 1
        if self._map.get(load.key) == slot:
            del self._map[load.key]
            self.policy.remove(slot, load.key)
        self._state[slot] = FAILED
        if self._pins[slot] == 0:
            self._release_slot(slot)

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
        return self.catalog.triple(root, self.catalog.plan(key))

    def _wait_loaded(self, slot: int, key) -> None:
        load = self._load[slot]
        if load is not None and not load.event.is_set():
            t0 = time.perf_counter()
            load.event.wait()
            with self._lock:
                self._wait_s += time.perf_counter() - t0
        if load is not None and load.error is not None:
            raise load.error
        if self.catalog.needs_shape_check(key):
            self.catalog.check_shapes(key)
