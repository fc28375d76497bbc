"""Routing traces: synthetic locality, policy simulation (Belady bounds), record / replay."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.offload.traces import (SIM_POLICIES, Trace, TraceRecorder, format_table, load_trace,
                                         policy_table, record_trace, simulate, synthetic_trace,
                                         trace_stats)

ONLINE = [p for p in SIM_POLICIES if p != "belady"]


def test_synthetic_trace_shape_and_locality():
    tr = synthetic_trace(1500, 2, n_experts=384, top_k=8, seed=1)
    assert tr.experts.shape == (1500, 2, 8) and tr.n_experts == 384
    assert all(len(set(row)) == 8 for row in tr.experts.reshape(-1, 8).tolist())   # distinct per token
    np.testing.assert_array_equal(tr.experts, synthetic_trace(1500, 2, seed=1).experts)
    s = trace_stats(tr)
    assert 0.38 < s["reuse_next"] < 0.52              # target ~0.45
    assert 0.74 < s["reuse_within_8"] < 0.86          # target ~0.80
    assert 0.25 < s["gini"] < 0.5                     # ~0.30 long-run; short traces read higher
    flat = synthetic_trace(1500, 1, reuse=0.0, zipf=0.0, seed=2)
    assert trace_stats(flat)["reuse_next"] < 0.05     # no locality when asked for none


def cyclic_trace(n_tokens, n_cycle, top_k, n_layers=2):
    ex = np.array([[(np.arange(top_k) + t * top_k) % n_cycle for _ in range(n_layers)]
                   for t in range(n_tokens)])
    return Trace(ex, tuple(range(n_layers)), n_cycle)


@pytest.mark.parametrize("top_k, n_cycle, slots", [(4, 12, 8), (4, 20, 16), (8, 40, 32), (2, 9, 8), (8, 17, 16)])
def test_lru_gets_no_hits_on_a_cycle_longer_than_the_cache(top_k, n_cycle, slots):
    tr = cyclic_trace(60, n_cycle, top_k)
    assert simulate(tr, "lru", slots) == 0.0
    assert simulate(tr, "lru", slots, shared=True) == 0.0
    assert simulate(tr, "belady", slots) > 0.0
    assert simulate(tr, "lru", n_cycle) > 0.8          # the whole cycle fits: only cold misses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_belady_bounds_every_policy(seed):
    rng = np.random.default_rng(seed)
    traces = [synthetic_trace(300, 2, n_experts=48, top_k=4, seed=seed),
              Trace(np.stack([rng.permutation(32)[:4] for _ in range(600)]).reshape(300, 2, 4), (0, 1), 32)]
    for tr in traces:
        for slots in (4, 8, 16):
            for shared in (False, True):
                best = simulate(tr, "belady", slots, shared=shared)
                for p in ONLINE:
                    assert simulate(tr, p, slots, shared=shared) <= best + 1e-12, (p, slots, shared)


def test_policy_table_shape():
    tr = synthetic_trace(200, 2, n_experts=64, top_k=4, seed=3)
    table = policy_table(tr, slots=(4, 8, 16))
    assert list(table) == ["lru", "lfu", "least-stale", "random", "belady"]
    assert all(list(row) == [4, 8, 16] and all(0 <= v <= 1 for v in row.values()) for row in table.values())
    for p in ("lru", "belady"):                                  # stack algorithms: more slots, more hits
        assert table[p][4] <= table[p][8] <= table[p][16]
    assert format_table(table).count("\n") == 6
    with pytest.raises(ValueError, match="must hold"):
        simulate(tr, "lru", 2)
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(tr, "mru", 8)


def test_record_and_replay(tmp_path):
    rec = TraceRecorder(n_experts=16, meta={"model": "tiny"})
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 16, (n, 4)) for n in (5, 1, 1)]   # a prefill chunk, then decode steps
    for ids in chunks:
        for layer in (1, 2):
            rec.record(layer, ids)
    path = rec.save(tmp_path / "trace.npz")
    tr = load_trace(path)
    assert tr.layers == (1, 2) and tr.n_experts == 16 and tr.meta == {"model": "tiny"}
    np.testing.assert_array_equal(tr.experts[:, 0], np.concatenate(chunks))
    again = load_trace(record_trace(tmp_path / "b.npz", tr.experts, tr.layers, 16))
    np.testing.assert_array_equal(again.experts, tr.experts)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError):
        load_trace(tmp_path / "bad.npz")
