"""Routing traces: synthetic generation, recording, and cache-policy simulation.

A trace is the routed expert ids of every token at every MoE layer: int [T, L, K]
(T tokens, L MoE layers, K = top-k experts per token).

    tr = synthetic_trace(4000, 8, n_experts=384, top_k=8, seed=0)
    trace_stats(tr)                          # reuse_next, reuse_within_8, gini, ...
    simulate(tr, "lru", slots_per_layer=64)  # hit rate
    policy_table(tr)                         # {policy: {slots: hit rate}} at 16/32/64/128 slots per layer

Real traces: TraceRecorder.record(layer, ids [T, K]) from the model's router, .save(path) (npz,
see record_trace), then load_trace(path) and replay.

Synthetic model (per layer, layers independent; offload-anchors.md §4 has the targets):
  * popularity: Zipf weights r**-zipf over a random permutation of the experts. zipf=0.48 gives a
    long-run Gini of ~0.30 over 384 experts (measured 0.30 on 30K tokens), the mild skew measured
    for DeepSeek-V3 (Gini 0.288 on the MTP layer, 0.36 base-layer mean, over 608K tokens;
    aux-loss-free balancing keeps it low). Short traces measure higher (sampling noise and bursts:
    ~0.37 on 4K tokens).
  * temporal reuse: each of the K picks of token t is, with probability `reuse`, a copy of an
    expert of token t - lag (lag ~ geometric with mean `lag_mean`, at most `window` tokens back),
    else a fresh draw from the popularity. Defaults reuse=0.8, lag_mean=3.0, window=64 reproduce
    the figures reported for fine-grained MoEs (Qwen3-30B-A3B, 128 experts top-8: ~45% of a token's
    experts were used by the previous token, ~80% within the previous 8 tokens); measured on 30K
    tokens: reuse_next 0.45, reuse_within_8 0.80.
  A more pessimistic variant, reuse=0.7, lag_mean=12, window=256 (reuse spread over ~a hundred
  tokens, only ~14% next-token reuse), reproduces instead the per-layer LRU curve measured on
  Qwen3.8-Flash-Next (512 experts top-10: LRU-64 ~67%, LRU-128 ~81%); K2 may lie anywhere between.
  Cross-layer correlation is not modelled (it matters for prefetch, not for per-layer caching).
  There is no measured K2 trace yet: replace these numbers with a recorded trace when one exists.

Policies: the store's own (offload/expert_policies.py: lru, lfu, least-stale, random) plus belady
(optimal offline: evict the expert whose next use is furthest away; the upper bound). Accesses
are replayed in order, token by token and, within a token, the K experts in order; the experts of
the current token (and layer) are held, never evicted while the token's other experts load.
Per-layer mode (default): each MoE layer has its own cache of slots_per_layer slots. shared=True:
one pool of slots_per_layer * L slots for all layers, accessed layer-cyclically (the store's layout).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

from .expert_policies import POLICIES, BeladyPolicy, Clock, EvictionPolicy
from .safetensors import atomic_file

__all__ = ["Trace", "synthetic_trace", "trace_stats", "simulate", "policy_table", "format_table",
           "record_trace", "load_trace", "TraceRecorder", "BeladyPolicy", "SIM_POLICIES", "gini"]

TRACE_FORMAT = "kimi-desktop-routing-trace"
TRACE_VERSION = 1


@dataclass
class Trace:
    experts: np.ndarray                     # int [T, L, K]
    layers: tuple[int, ...]                 # model layer id of each of the L columns
    n_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.experts = np.asarray(self.experts)
        if self.experts.ndim != 3:
            raise ValueError(f"trace experts must be [tokens, layers, top_k], got shape {self.experts.shape}")
        if len(self.layers) != self.experts.shape[1]:
            raise ValueError(f"trace has {self.experts.shape[1]} layer columns but {len(self.layers)} layer ids")
        if self.experts.size and (self.experts.min() < 0 or self.experts.max() >= self.n_experts):
            raise ValueError(f"trace expert ids must lie in 0..{self.n_experts - 1}")

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]


# --------------------------------------------------------------------------- synthetic traces

def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: uniform, -> 1: concentrated)."""
    x = np.sort(np.asarray(counts, np.float64))
    n = x.size
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def synthetic_trace(n_tokens: int, n_layers: int, n_experts: int = 384, top_k: int = 8,
                    reuse: float = 0.8, zipf: float = 0.48, lag_mean: float = 3.0,
                    window: int = 64, seed: int = 0) -> Trace:
    """A synthetic routing trace with DeepSeek-class locality (see the module docstring)."""
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k must be in 1..n_experts, got {top_k} of {n_experts}")
    if not 0 <= reuse < 1:
        raise ValueError(f"reuse must be in [0, 1), got {reuse}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_tokens, n_layers, top_k), np.int16 if n_experts < 32768 else np.int32)
    q = 1.0 / max(1.0, lag_mean)                                  # geometric lag parameter
    lag_p = q * (1 - q) ** np.arange(window)
    lag_cdf = np.cumsum(lag_p / lag_p.sum())
    for li in range(n_layers):
        w = np.arange(1, n_experts + 1, dtype=np.float64) ** -zipf
        p = np.empty(n_experts)
        p[rng.permutation(n_experts)] = w / w.sum()
        cdf = np.cumsum(p)
        cdf[-1] = 1.0
        for t in range(n_tokens):
            chosen: list[int] = []
            n_copy = rng.binomial(top_k, reuse) if t > 0 else 0
            if n_copy:
                lags = np.minimum(np.searchsorted(lag_cdf, rng.random(n_copy * 2)) + 1, t)
                cols = rng.integers(top_k, size=n_copy * 2)
                for lag, c in zip(lags, cols):
                    e = int(out[t - lag, li, c])
                    if e not in chosen:
                        chosen.append(e)
                        if len(chosen) == n_copy:
                            break
            while len(chosen) < top_k:
                for e in np.searchsorted(cdf, rng.random(2 * top_k)):
                    e = int(min(e, n_experts - 1))
                    if e not in chosen:
                        chosen.append(e)
                        if len(chosen) == top_k:
                            break
            out[t, li] = chosen
    meta = {"synthetic": True, "reuse": reuse, "zipf": zipf, "lag_mean": lag_mean, "window": window,
            "seed": seed}
    return Trace(out, tuple(range(n_layers)), n_experts, meta)


def trace_stats(trace: Trace, within: int = 8) -> dict:
    """Locality figures: reuse_next = mean share of a token's experts that the previous token used
    (same layer); reuse_within_8 = share used by any of the previous `within` tokens; gini = mean
    over layers of the Gini of per-expert counts; unique_share = experts touched / n_experts."""
    ex = trace.experts
    T, L, K = ex.shape
    nxt, win, g, uniq = [], [], [], []
    for li in range(L):
        sets = ex[:, li, :]
        member = np.zeros((T, trace.n_experts), bool)
        np.put_along_axis(member, sets.astype(np.int64), True, axis=1)
        if T > 1:
            nxt.append(np.take_along_axis(member[:-1], sets[1:].astype(np.int64), 1).mean())
        if T > within:
            seen = np.zeros((T - within, trace.n_experts), bool)
            for d in range(1, within + 1):
                seen |= member[within - d: T - d]
            win.append(np.take_along_axis(seen, sets[within:].astype(np.int64), 1).mean())
        counts = member.sum(0)
        g.append(gini(counts))
        uniq.append(np.count_nonzero(counts) / trace.n_experts)

    def f(v):
        return float(np.mean(v)) if v else float("nan")
    return {"tokens": T, "layers": L, "top_k": K, "n_experts": trace.n_experts, "reuse_next": f(nxt),
            f"reuse_within_{within}": f(win), "gini": f(g), "unique_share": f(uniq)}


# --------------------------------------------------------------------------- simulation

SIM_POLICIES: dict[str, type[EvictionPolicy]] = {**POLICIES, "belady": BeladyPolicy}
_NEVER = np.iinfo(np.int64).max


def _next_use(keys: np.ndarray) -> np.ndarray:
    """For a flat access sequence, the index of the next access of the same key (or NEVER)."""
    nxt = np.full(keys.size, _NEVER, np.int64)
    last: dict = {}
    for i in range(keys.size - 1, -1, -1):
        k = int(keys[i])
        nxt[i] = last.get(k, _NEVER)
        last[k] = i
    return nxt


def _run(visits: np.ndarray, positions: np.ndarray, n_layers: int, n_slots: int, policy: str,
         warmup_visits: int, seed: int) -> tuple[int, int]:
    """Replay visits [V, K] of keys (visit v at layer cycle position positions[v]) through one cache."""
    if policy not in SIM_POLICIES:
        raise ValueError(f"unknown policy {policy!r} (known: {', '.join(SIM_POLICIES)})")
    clock = Clock(n_layers)
    pol = SIM_POLICIES[policy](n_slots, clock, seed)
    belady = isinstance(pol, BeladyPolicy)
    nxt = _next_use(visits.reshape(-1)) if belady else None
    slot_of: dict = {}
    key_of = [None] * n_slots
    free = list(range(n_slots - 1, -1, -1))
    occupied = np.zeros(n_slots, bool)
    hits = total = 0
    i = 0
    for v in range(visits.shape[0]):
        pos = int(positions[v])
        clock.visit(pos)
        counted = v >= warmup_visits
        held = []
        for key in visits[v].tolist():
            clock.tick += 1
            s = slot_of.get(key)
            if s is not None:
                hits += counted
                pol.touch(s, key, pos)
            else:
                if free:
                    s = free.pop()
                else:
                    m = occupied.copy()
                    m[held] = False
                    s = pol.victim(m)
                    old = key_of[s]
                    pol.remove(s, old)
                    del slot_of[old]
                slot_of[key] = s
                key_of[s] = key
                occupied[s] = True
                pol.insert(s, key, pos)
            if belady:
                pol.next[s] = nxt[i]
            held.append(s)
            total += counted
            i += 1
    return hits, total


def simulate(trace: Trace, policy: str, slots_per_layer: int, shared: bool = False,
             warmup: int = 0, seed: int = 0) -> float:
    """Hit rate of `policy` with slots_per_layer experts cached per MoE layer.

    warmup: tokens replayed before hits are counted (to leave out cold misses).
    shared: one pool of slots_per_layer * L slots for all layers, accessed layer-cyclically.
    """
    T, L, K = trace.experts.shape
    if slots_per_layer < K:
        raise ValueError(f"slots_per_layer ({slots_per_layer}) must hold a token's {K} experts")
    ex = trace.experts.astype(np.int64)
    if shared:
        keys = ex + (np.arange(L, dtype=np.int64) * trace.n_experts)[None, :, None]    # [T, L, K]
        visits = keys.reshape(T * L, K)
        positions = np.tile(np.arange(L), T)
        h, n = _run(visits, positions, L, slots_per_layer * L, policy, warmup * L, seed)
    else:
        h = n = 0
        for li in range(L):
            hh, nn = _run(ex[:, li, :], np.zeros(T, np.int64), 1, slots_per_layer, policy, warmup, seed + li)
            h += hh
            n += nn
    return h / n if n else 0.0


def policy_table(trace: Trace, slots: Sequence[int] = (16, 32, 64, 128),
                 policies: Sequence[str] = ("lru", "lfu", "least-stale", "random", "belady"),
                 shared: bool = False, warmup: int = 0) -> dict[str, dict[int, float]]:
    """{policy: {slots_per_layer: hit rate}}."""
    return {p: {int(s): simulate(trace, p, int(s), shared=shared, warmup=warmup) for s in slots}
            for p in policies}


def format_table(table: Mapping[str, Mapping[int, float]]) -> str:
    """A markdown table of policy_table's result (hit rates in %)."""
    slots = sorted({s for row in table.values() for s in row})
    lines = ["| policy | " + " | ".join(f"{s} slots" for s in slots) + " |",
             "|---|" + "---:|" * len(slots)]
    for p, row in table.items():
        lines.append(f"| {p} | " + " | ".join(f"{100 * row[s]:.1f}%" for s in slots) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- recording

def record_trace(path: str | os.PathLike, experts: np.ndarray, layers: Sequence[int], n_experts: int,
                 meta: Mapping | None = None) -> Path:
    """Write a trace as npz: experts int16/int32 [T, L, K], layers int32 [L], n_experts, meta (JSON
    string), format, version. Atomic (temp file + rename); the path is used as given."""
    tr = Trace(np.asarray(experts), tuple(int(x) for x in layers), int(n_experts), dict(meta or {}))
    path = Path(path)
    dt = np.int16 if tr.n_experts < 32768 else np.int32
    bio = io.BytesIO()
    np.savez_compressed(bio, experts=tr.experts.astype(dt), layers=np.asarray(tr.layers, np.int32),
                        n_experts=np.int64(tr.n_experts), meta=np.str_(json.dumps(tr.meta)),
                        format=np.str_(TRACE_FORMAT), version=np.int64(TRACE_VERSION))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(bio.getbuffer())
    return path


def load_trace(path: str | os.PathLike) -> Trace:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != TRACE_FORMAT:
                raise ValueError(f"{path}: not a {TRACE_FORMAT} file")
            return Trace(z["experts"], tuple(int(x) for x in z["layers"]), int(z["n_experts"]),
                         json.loads(str(z["meta"])))
    except (KeyError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable routing trace ({e})") from None


class TraceRecorder:
    """Collects router choices: call record(layer, ids [T, K]) once per MoE layer per forward chunk
    (in the runtime: right after route()), then save(path) / to_trace()."""

    def __init__(self, n_experts: int, meta: Mapping | None = None):
        self.n_experts = int(n_experts)
        self.meta = dict(meta or {})
        self._rows: dict[int, list[np.ndarray]] = {}

    def record(self, layer: int, ids) -> None:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        self._rows.setdefault(int(layer), []).append(ids.astype(np.int32, copy=True))

    def to_trace(self) -> Trace:
        if not self._rows:
            raise ValueError("TraceRecorder: nothing recorded")
        layers = sorted(self._rows)
        cols = [np.concatenate(self._rows[x]) for x in layers]
        T = min(c.shape[0] for c in cols)      # a forward pass cut short leaves later layers behind
        return Trace(np.stack([c[:T] for c in cols], axis=1), tuple(layers), self.n_experts, self.meta)

    def save(self, path: str | os.PathLike) -> Path:
        tr = self.to_trace()
        return record_trace(path, tr.experts, tr.layers, tr.n_experts, tr.meta)


if __name__ == "__main__":   # python -m kimi_desktop.offload.traces [--tokens N] [--layers L] [--shared] [--trace F]
    import argparse
    import time

    ap = argparse.ArgumentParser(description="hit-rate table of expert-cache policies on a routing trace")
    ap.add_argument("--trace", help="an npz trace (default: synthetic)")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--reuse", type=float, default=0.8)
    ap.add_argument("--lag-mean", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=0.48)
    ap.add_argument("--shared", action="store_true", help="one pool for all layers")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tr = (load_trace(a.trace) if a.trace else
          synthetic_trace(a.tokens, a.layers, a.experts, a.top_k, reuse=a.reuse, zipf=a.zipf,
                          lag_mean=a.lag_mean, window=a.window, seed=a.seed))
    print(json.dumps(trace_stats(tr)))
    print(format_table(policy_table(tr, shared=a.shared, warmup=a.warmup)))
    print(f"({time.perf_counter() - t0:.1f} s)")
