"""kimi_desktop.planner: the expert-cache decision the engine makes, and `kimi-desktop plan`."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_desktop.planner import (GIB, ModelSizes, choose_expert_cache, decide, format_plan, headroom_bytes,
                                  model_sizes, plan_memory)

MIB = 1 << 20


@pytest.fixture(scope="module")
def tiny_sizes(tiny_int4):
    return model_sizes(tiny_int4)


def test_a_budget_beyond_the_experts_is_capped(tiny_int4):
    """README's `chat --demo --expert-cache-gb 4` held 4 GiB for a model whose experts are ~2 MiB."""
    import psutil

    from kimi_desktop.engines import open_engine
    from kimi_desktop.offload.experts import ExpertStore

    sizes = model_sizes(tiny_int4)
    cap = sizes.n_experts * sizes.slot_bytes
    assert cap < 8 * MIB
    proc = psutil.Process()
    before = proc.memory_info().rss
    with ExpertStore.open(tiny_int4, budget_bytes=4 << 30) as store:
        grew = proc.memory_info().rss - before
        assert store.n_slots == sizes.n_experts and store.stats()["pool_bytes"] == cap
        assert grew < cap + 64 * MIB           # the pool is faulted in at open: this is what it holds
    e = open_engine("native", tiny_int4, expert_cache_bytes=4 << 30)
    try:
        assert e.stats()["expert_cache_budget"] == cap
    finally:
        e.close()
    c = choose_expert_cache(tiny_int4, 4.0, available_bytes=64 * GIB)
    assert (c.budget_bytes, c.n_slots, c.auto) == (cap, sizes.n_experts, False)
    assert "capped at the model's 32 experts" in c.reason


def test_cache_size_errors_speak_of_gib_and_experts(tiny_sizes):
    s = tiny_sizes
    with pytest.raises(ValueError, match=r"^0\.0001 GiB holds 1 expert, fewer than the 4 a token needs in one "
                                         r"layer: give at least 0\.0003 GiB \(0\.3 MiB\), or 0 for the OS page cache$"):
        decide(s, 0.0001, available_bytes=64 * GIB)
    for bad in (-1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match=r"^must be a number of GiB >= 0 \(0: the OS page cache\)"):
            decide(s, bad, available_bytes=64 * GIB)
    with pytest.raises(ValueError, match=r"^1 GiB does not fit in memory: .* available, of which the resident weights"):
        decide(s, 1.0, available_bytes=s.resident_bytes + s.n_experts * s.slot_bytes // 2)
    from kimi_desktop.offload.experts import ExpertStore
    with pytest.raises(ValueError, match=r"expert cache of 0\.0000 GiB \(0\.0 MiB\) holds no expert: one expert needs"):
        ExpertStore.open(s.folder, budget_bytes=4096)


def test_zero_means_the_page_cache_and_auto_fits_the_machine(tiny_sizes):
    s = tiny_sizes
    zero = decide(s, 0, available_bytes=64 * GIB)
    assert zero.budget_bytes is None and not zero.direct_io and not zero.auto
    fits = decide(s, None, available_bytes=64 * GIB)
    assert fits.budget_bytes is None and fits.auto and "fit in" in fits.reason
    # experts do not fit beside the resident weights, KV and headroom: a store of what is left, O_DIRECT
    avail = s.resident_bytes + s.kv_bytes(s.default_ctx()) + headroom_bytes(s.resident_bytes) + s.expert_bytes * 3 // 4
    c = decide(s, None, available_bytes=avail)
    left = avail - headroom_bytes(avail) - s.resident_bytes - s.kv_bytes(s.default_ctx())
    assert c.budget_bytes is not None and c.direct_io and c.auto and "do not fit" in c.reason
    assert c.budget_bytes == left // s.slot_bytes * s.slot_bytes and c.n_slots >= s.top_k
    assert c.line().startswith("expert cache: ") and "O_DIRECT" in c.line()


def test_engine_uses_the_decision_and_reports_it(tiny_int4):
    from kimi_desktop.engines.native import NativeEngine

    e = NativeEngine(tiny_int4)
    try:
        st_ = e.stats()
        assert st_["expert_cache_mode"] == "page cache" and st_["expert_cache_auto"] is True
        assert "fit in" in st_["expert_cache_reason"] and st_["expert_cache_budget"] is None
    finally:
        e.close()
    e = NativeEngine(tiny_int4, expert_cache_gb=0.001)
    try:
        st_ = e.stats()
        assert st_["expert_cache_mode"] == "expert store" and st_["expert_cache_auto"] is False
        assert st_["expert_cache_budget"] == e.expert_cache_choice.budget_bytes > 0
    finally:
        e.close()


def _synthetic(draw_kw) -> ModelSizes:
    slot = draw_kw["expert"] + 4096 * 12
    return ModelSizes(folder="synthetic", disk_bytes=0, resident_bytes=draw_kw["resident"], embedding_bytes=0,
                      expert_bytes=draw_kw["expert"] * draw_kw["layers"] * draw_kw["experts"],
                      expert_nbytes=draw_kw["expert"], slot_bytes=slot // 4096 * 4096 + 4096,
                      n_experts=draw_kw["layers"] * draw_kw["experts"], moe_layers=draw_kw["layers"],
                      top_k=draw_kw["top_k"], n_layers=draw_kw["layers"] + 1, kv_bytes_per_token=draw_kw["kv"],
                      max_ctx=draw_kw["ctx"], expert_source="checkpoint")


models = st.fixed_dictionaries({
    "resident": st.integers(1 * MIB, 64 * GIB), "expert": st.integers(64 << 10, 64 * MIB),
    "layers": st.integers(1, 80), "experts": st.integers(8, 512), "top_k": st.integers(1, 8),
    "kv": st.integers(0, 1 << 20), "ctx": st.integers(0, 1 << 18)}).map(_synthetic)
rams = st.integers(256 * MIB, 2048 * GIB)


def _check_within_budget(p) -> None:
    s, c = p.sizes, p.cache
    if c.budget_bytes is not None:
        assert s.top_k <= c.n_slots <= s.n_experts and c.budget_bytes == c.n_slots * s.slot_bytes
    if not any(w.startswith("not enough RAM for the resident weights") for w in p.warnings):
        assert p.memory_bytes <= p.ram_bytes
    else:
        assert c.budget_bytes is None and p.expert_ram_bytes == 0


@settings(max_examples=300, deadline=None)
@given(models, rams, rams)
def test_plan_stays_in_its_budget_and_more_ram_never_reads_more(sizes, ram_a, ram_b):
    lo, hi = sorted((ram_a, ram_b))
    a, b = plan_memory(sizes, lo), plan_memory(sizes, hi)
    for p in (a, b):
        _check_within_budget(p)
    assert b.planned_read_per_token <= a.planned_read_per_token
    assert b.expert_ram_bytes >= a.expert_ram_bytes


@settings(max_examples=60, deadline=None)
@given(rams, rams)
def test_real_models_over_many_ram_sizes(tiny_sizes, k2_full, ram_a, ram_b):
    lo, hi = sorted((ram_a, ram_b))
    for sizes in (tiny_sizes, _k2_sizes(k2_full)):
        a, b = plan_memory(sizes, lo), plan_memory(sizes, hi)
        _check_within_budget(a), _check_within_budget(b)
        assert b.planned_read_per_token <= a.planned_read_per_token


_K2 = {}


def _k2_sizes(folder):
    if folder not in _K2:
        _K2[folder] = model_sizes(folder)
    return _K2[folder]


def test_full_k2_config_from_headers_only(k2_full):
    files = list(k2_full.glob("*.safetensors"))
    assert len(files) == 62
    on_disk = sum(f.stat().st_blocks * 512 for f in files)
    s = _k2_sizes(k2_full)
    assert s.disk_bytes > 500e9 and on_disk < 100 * MIB            # sparse: headers only
    assert (s.n_experts, s.moe_layers, s.top_k, s.n_layers) == (60 * 384, 60, 8, 61)
    assert s.expert_nbytes == 3 * (2048 * 896 * 4 + 2048 * 224 * 2)  # INT4 nibbles + bf16 group-32 scales
    assert s.kv_bytes_per_token == 61 * (512 + 64) * 2        # bf16 latent: 70 KB per token
    params = s.resident_bytes // 2 + s.embedding_bytes // 2 + s.n_experts * 3 * 2048 * 7168
    assert 1.0e12 < params < 1.1e12                                   # "1T parameters"
    big, mid, small = (plan_memory(s, g * GIB) for g in (768, 256, 64))
    assert big.cache.budget_bytes is None and big.hit_rate == 1.0 and big.planned_read_per_token == 0
    assert mid.cache.direct_io and small.cache.direct_io
    assert 0 < small.cache.n_slots < mid.cache.n_slots < s.n_experts
    assert mid.planned_read_per_token < small.planned_read_per_token
    text = format_plan(small)
    for want in ("resident weights:", "KV cache: 70272 bytes per token", "expert cache:", "hit rate", "disk:"):
        assert want in text
    tiny_ram = plan_memory(s, 16 * GIB)
    assert any(w.startswith("not enough RAM for the resident weights") for w in tiny_ram.warnings)
    slow = plan_memory(s, 64 * GIB, disk_gbps=0.5)
    assert any(w.startswith("disk slower than needed") for w in slow.warnings)


def test_plan_cli(tiny_int4, capsys):
    from kimi_desktop.cli import main

    assert main(["plan", str(tiny_int4), "--ram-gb", "64", "--ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "memory: 64.00 GiB (--ram-gb)" in out and "expert cache: none, the OS page cache" in out
    assert "4096 tokens:" in out
    assert main(["plan"]) == 2 and "give MODEL or --demo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", str(tiny_int4), "--ram-gb", "-1"])
    assert e.value.code == 2


def test_sizes_match_the_store(tiny_int4):
    """The planner's slot arithmetic is the store's (one place)."""
    from kimi_desktop.offload.experts import ExpertStore

    s = model_sizes(tiny_int4)
    with ExpertStore.open(tiny_int4, n_slots=s.top_k) as store:
        assert (store.slot_bytes, store.expert_nbytes, store.n_experts_total) == (s.slot_bytes, s.expert_nbytes,
                                                                                   s.n_experts)
    assert dataclasses.asdict(s)["resident_bytes"] > 0
