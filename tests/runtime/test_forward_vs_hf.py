"""The native forward pass against Hugging Face transformers' DeepseekV3 (float32, torch CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimi_desktop.runtime import load_model

torch = pytest.importorskip("torch")
from tests.hf_reference import load_reference, reference_greedy, reference_logits  # noqa: E402

CASES = {
    # K2 routing (one group), INT4 routed experts, 2 shards
    "int4-k2-routing": dict(layout="int4", shards=2),
    # group-limited routing, FP8 128x128 blocks (partial at the edges), 3 shards
    "fp8-grouped": dict(layout="fp8", shards=3, n_group=4, topk_group=2),
    # group-limited, bf16; a strong routing skew makes biased scores negative, where
    # masking unchosen groups with -inf (transformers) and with 0 differ
    "bf16-grouped-skew": dict(layout="bf16", shards=2, n_group=8, topk_group=3, routing_skew=1.0),
}


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_ckpt):
    folder = make_ckpt(**CASES[request.param])
    return folder, load_model(folder, kv_dtype="fp32"), load_reference(folder)   # the reference cache


def test_prefill_logits_match_transformers(case):
    folder, model, ref = case
    cfg = json.loads((folder / "config.json").read_text())
    # 100 tokens: positions run past original_max_position_embeddings (64), where YaRN bends the rope
    assert cfg["rope_scaling"]["original_max_position_embeddings"] < 100
    ids = prompt(100, cfg["vocab_size"])
    ours, theirs = model.logits(ids), reference_logits(ref, ids)
    assert ours.shape == theirs.shape == (100, cfg["vocab_size"])
    assert ours.dtype == np.float32
    assert rel_err(ours, theirs) < 1e-4


def test_greedy_through_cache_matches_reference_recomputation(case):
    folder, model, ref = case
    ids = prompt(70, model.cfg.vocab_size, seed=2)
    want, margins = reference_greedy(ref, ids, 20)
    got = list(model.generate(ids, max_new_tokens=20, temperature=0.0))
    assert min(margins) > 1e-3, "the random model's choices must be clear for greedy equality to mean anything"
    # generation may stop early only at an end id, which the reference would have produced too
    assert got == want[: len(got)] and (len(got) == 20 or got[-1] in model.end_ids)
    assert len(got) >= 16


def test_model_types_and_layout_are_what_the_case_says(case):
    folder, model, _ = case
    names = set(model.ckpt.names())
    layout = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if layout is None:
        assert not any(n.endswith(("weight_packed", "weight_scale_inv")) for n in names)
    elif layout["quant_method"] == "fp8":
        assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in names
    else:
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_packed" in names
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in names
    assert len({model.ckpt.info(n).path for n in names}) >= 2


def test_numpy_reference_path_matches_transformers(case):
    """The plain-numpy products (no numba kernels) are kept as the readable reference."""
    folder, _, ref = case
    model = load_model(folder, kernels=False, kv_dtype="fp32")
    ids = prompt(40, model.cfg.vocab_size, seed=3)
    assert rel_err(model.logits(ids), reference_logits(ref, ids)) < 1e-4
