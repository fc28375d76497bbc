"""Eviction policies of the expert store, and the offline optimum (Belady) the trace study compares them with.

A policy keeps per-slot state (insert/touch/remove) and picks a victim among the slots a mask
allows; the store (offload/expert_slots.py) and the trace simulator (offload/traces.py) drive the
same classes, so a simulated hit rate is the store's.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Clock", "EvictionPolicy", "LRUPolicy", "LFUPolicy", "LeastStalePolicy", "RandomPolicy",
           "BeladyPolicy", "POLICIES", "make_policy", "check_policy"]


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


class BeladyPolicy(EvictionPolicy):
    """Optimal offline eviction (simulation only): the simulator sets next[slot] = index of the
    slot's expert's next access; the victim is the one used furthest in the future."""
    name = "belady"

    def __init__(self, n_slots, clock, seed=0):
        super().__init__(n_slots, clock, seed)
        self.next = np.zeros(n_slots, np.int64)

    def victim(self, mask):
        c = np.flatnonzero(mask)
        return int(c[np.argmax(self.next[c])])


POLICIES: dict[str, type[EvictionPolicy]] = {       # the store's (Belady needs the future)
    "lru": LRUPolicy, "lfu": LFUPolicy, "least-stale": LeastStalePolicy, "random": RandomPolicy,
}


def check_policy(policy) -> None:
    """ValueError unless `policy` is "none", a known name, or an EvictionPolicy (class or instance)."""
    if policy == "none" or isinstance(policy, EvictionPolicy):
        return
    if isinstance(policy, type) and issubclass(policy, EvictionPolicy):
        return
    if isinstance(policy, str) and policy in POLICIES:
        return
    raise ValueError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)}, none)")


def make_policy(policy, n_slots: int, clock: Clock, seed: int = 0) -> EvictionPolicy:
    check_policy(policy)
    if isinstance(policy, EvictionPolicy):
        return policy
    if isinstance(policy, type):
        return policy(n_slots, clock, seed)
    return POLICIES[policy](n_slots, clock, seed)
