"""The model's options and instruments are arguments of load_model, per model, not module state;
which layers are MoE comes from the config alone."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_desktop.offload.traces import TraceRecorder
from kimi_desktop.runtime import ModelConfig, load_model
from kimi_desktop.runtime.model import MoE
from kimi_desktop.runtime.profile import StageTimer

IDS = list(range(300, 309))


def test_options_reach_the_model_and_are_checked(tiny_int4):
    ref = load_model(tiny_int4, kernels=False, attn_impl="absorb", naive_max_bytes=0, kv_dtype="fp32")
    assert (ref.options.kernels, ref.options.attn_impl, ref.options.naive_max_bytes) == (False, "absorb", 0)
    assert ref.warmup() == 0.0                           # nothing to compile for the numpy products
    assert load_model(tiny_int4).options.kernels         # another model keeps the defaults
    with pytest.raises(ValueError, match="attn_impl"):
        load_model(tiny_int4, attn_impl="flash")


def test_stage_timer_is_passed_in_and_per_model(tiny_int4):
    timer = StageTimer()
    timed, plain = load_model(tiny_int4, timer=timer), load_model(tiny_int4)
    plain.session().feed(IDS)
    assert not timer.calls                               # another model's pass is not timed here
    s = timed.session()
    s.feed(IDS), s.feed([400])
    stages = {"attention", "dense_mlp", "router", "expert_fetch", "experts", "shared_expert", "lm_head"}
    assert stages <= set(timer.calls)
    assert timer.calls["lm_head"] == 2 and all(v >= 0 for v in timer.seconds.values())
    assert not plain.timer.enabled and not plain.timer.calls


def test_routing_recorder_is_passed_in(tiny_int4):
    cfg = load_model(tiny_int4).cfg
    rec = TraceRecorder(cfg.n_routed_experts)
    s = load_model(tiny_int4, recorder=rec).session()
    s.feed(IDS), s.feed([400]), s.feed([401])
    tr = rec.to_trace()
    assert tr.layers == cfg.moe_layers and tr.experts.shape == (len(IDS) + 2, len(cfg.moe_layers),
                                                                 cfg.num_experts_per_tok)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in tr.experts.reshape(-1, cfg.num_experts_per_tok))
    assert tr.experts.min() >= 0 and tr.experts.max() < cfg.n_routed_experts


def test_moe_layers_follow_the_config_rule(tiny_int4):
    base = dict(model_type="kimi_k2", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                num_hidden_layers=7, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    assert ModelConfig.from_dict(dict(base, first_k_dense_replace=1, moe_layer_freq=2)).moe_layers == (2, 4, 6)
    assert ModelConfig.from_dict(dict(base, first_k_dense_replace=3)).moe_layers == (3, 4, 5, 6)
    assert ModelConfig.from_dict(dict(base, n_routed_experts=0, num_experts_per_tok=0)).moe_layers == ()
    model = load_model(tiny_int4)
    assert tuple(i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)) == model.cfg.moe_layers


def test_numpy_reference_products_equal_the_kernels(tiny_int4):
    ids = np.random.default_rng(2).integers(300, 1500, 24).tolist()
    got = load_model(tiny_int4, kernels=False, kv_dtype="fp32").logits(ids)
    want = load_model(tiny_int4, kv_dtype="fp32").logits(ids)
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) < 1e-5
