"""Session and KV cache behaviour: absorbed == naive, chunked == whole, truncate == fresh."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.runtime import load_model
from kimi_desktop.runtime.model import MoE
from kimi_desktop.runtime.prefetch import PrefetchGate


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def folder(make_ckpt):
    return make_ckpt(layout="int4", shards=2)


@pytest.fixture(scope="module")
def ids(folder):
    return np.random.default_rng(5).integers(0, 2048, 90).tolist()


def test_absorbed_and_naive_attention_agree(folder, ids):
    # forms compared on the float32 cache: bf16 rounding amplifies 1e-7 differences between forms
    naive = load_model(folder, attn_impl="naive", kv_dtype="fp32")
    absorb = load_model(folder, attn_impl="absorb", kv_dtype="fp32")
    a, b = naive.logits(ids), absorb.logits(ids)
    assert rel_err(b, a) < 1e-5
    # decode one token at a time: the absorbed form over the latent cache
    s_naive, s_absorb = naive.session(), absorb.session()
    s_naive.feed(ids[:80]), s_absorb.feed(ids[:80])
    for t in ids[80:]:
        assert rel_err(s_absorb.feed([t]), s_naive.feed([t])) < 1e-5


def test_auto_attention_absorbs_prefill_over_a_long_cache(folder, ids, monkeypatch):
    """Past naive_max_bytes of expanded latent, prefill chunks run the absorbed form (causal per
    query); the logits stay those of the naive form."""
    from kimi_desktop.runtime import dispatch

    want = load_model(folder, attn_impl="naive", kv_dtype="fp32").logits(ids)
    monkeypatch.setattr(dispatch, "mla_prefill", lambda *a: pytest.fail("naive prefill attention ran"))
    assert rel_err(load_model(folder, naive_max_bytes=0, kv_dtype="fp32").logits(ids), want) < 1e-5


def test_token_by_token_equals_prefill(folder, ids):
    model = load_model(folder)
    whole = model.logits(ids[:40])
    s = model.session()
    steps = np.stack([s.feed([t]) for t in ids[:40]])
    assert len(s) == 40
    assert rel_err(steps, whole) < 1e-5


def test_chunked_feed_and_all_logits(folder, ids):
    model = load_model(folder)
    whole = model.logits(ids)
    s = model.session()
    s.chunk = 32                                 # several prefill chunks
    assert rel_err(s.feed(ids, all_logits=True), whole) < 1e-5
    s2 = model.session()
    s2.feed(ids[:50])
    assert rel_err(s2.feed(ids[50:]), whole[-1]) < 1e-5


def test_truncate_reuses_prefix(folder, ids):
    model = load_model(folder)
    s = model.session()
    s.feed(ids[:60])
    s.truncate(30)
    assert len(s) == 30
    again = s.feed(ids[30:60])
    assert rel_err(again, model.logits(ids[:60])[-1]) < 1e-5
    with pytest.raises(ValueError):
        s.truncate(61)


def test_bad_token_ids_are_rejected(folder):
    s = load_model(folder).session()
    with pytest.raises(ValueError, match="out of range"):
        s.feed([10**9])
    with pytest.raises(ValueError):
        s.feed([])
    assert len(s) == 0


def test_generate_stops_at_end_id_and_is_seeded(folder, ids):
    model = load_model(folder)
    a = list(model.generate(ids[:10], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3))
    b = list(model.generate(ids[:10], max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3))
    assert a == b and 1 <= len(a) <= 12
    assert all(t not in model.end_ids for t in a[:-1])
    im_end = 1792 + 2
    assert im_end in model.end_ids


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_decode_through_a_small_expert_cache_with_prefetch_is_exact(folder, ids, policy):
    plain = load_model(folder)
    from kimi_desktop.offload.experts import ExpertStore
    store = ExpertStore.open(folder, n_slots=12, policy=policy)
    try:
        cached = load_model(folder, experts=store)
        for layer in cached.layers:          # read every guess (random routers guess near chance)
            if isinstance(layer.mlp, MoE):
                layer.mlp.prefetch_gate = PrefetchGate(min_precision=0.0, min_samples=0)
        want = list(plain.generate(ids[:20], max_new_tokens=12))
        got = list(cached.generate(ids[:20], max_new_tokens=12))
        assert got == want
        st = store.stats()
        assert st["prefetch_issued"] > 0 and st["evictions"] > 0
        assert st["max_resident_bytes"] <= st["pool_bytes"]
    finally:
        store.close()


def test_expert_cache_budget_from_load_model(folder, ids):
    model = load_model(folder, expert_cache_bytes=1 << 20)
    assert model.experts.stats()["budget_bytes"] == 1 << 20
    np.testing.assert_array_equal(model.logits(ids[:8]), load_model(folder).logits(ids[:8]))


def test_prefetch_gate_reads_only_while_guesses_pay():
    g = PrefetchGate(min_precision=0.75, window=8, min_samples=4, probe_every=2)
    assert [g.wants_guess() for _ in range(4)] == [False, True, False, True]   # off: every 2nd step
    for routed in ([1, 2], [1, 2], [1, 9]):
        g.guessed([1, 2])                     # guessed experts that were not resident
        g.observe(routed)
    assert g.precision == 5 / 6 and g.active  # 6 scored guesses >= 4, 5 used
    assert all(g.wants_guess() for _ in range(3))
    g.guessed([3, 4])
    g.observe([5, 6, 7])
    assert g.precision == 5 / 8 and not g.active
    g.observe([3])                            # no guess pending: nothing scored
    assert len(g.scores) == 8


def test_prefetch_gate_keeps_reads_within_what_is_used(folder, ids):
    """With the default gate, a random router's near-chance guesses are scored but not read."""
    from kimi_desktop.offload.experts import ExpertStore
    store = ExpertStore.open(folder, n_slots=12)
    try:
        model = load_model(folder, experts=store)
        list(model.generate(ids[:20], max_new_tokens=16))
        gates = [layer.mlp.next_moe.prefetch_gate for layer in model.layers
                 if isinstance(layer.mlp, MoE) and layer.mlp.next_moe is not None]
        assert gates and all(g.scores for g in gates)
        st = store.stats()
        if not any(g.active for g in gates):
            assert st["prefetch_issued"] == 0
        assert st["prefetch_wasted"] <= max(1, st["prefetch_used"] // 3)
    finally:
        store.close()
