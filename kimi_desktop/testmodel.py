"""`make-test-model`: random Kimi K2-architecture checkpoints in the official layouts.

Writes config.json, safetensors shards + index, and the tokenizer files. Every tensor is
generated from (seed, tensor name), so a checkpoint is the same whatever the shard count.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from kimi_desktop.offload.formats import quantize_fp8_block, quantize_int4
from kimi_desktop.offload.safetensors import TensorSpec, write_checkpoint
from kimi_desktop.runtime.config import ModelConfig
from kimi_desktop.runtime.tokenizer_files import write_tokenizer_files

BF16 = np.dtype(ml_dtypes.bfloat16)
LAYOUTS = ("int4", "fp8", "bf16")
PRESETS = ("tiny", "k2-slice")

K2_THINKING_QUANT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": 32, "dynamic": False, "observer": "minmax", "actorder": None,
                    "block_structure": None}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}
K2_INSTRUCT_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                     "weight_block_size": [128, 128]}


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_base_tokens: int                  # BPE vocabulary; 256 special ids follow it
    moe_layers: int
    original_max_position_embeddings: int
    rope_factor: float


PRESET_DIMS = {
    # multiples of 32 wherever an INT4 group or a GGUF block needs it; FP8 blocks (128) end partial
    "tiny": Preset(hidden_size=192, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
                   q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=48,
                   n_routed_experts=16, num_experts_per_tok=4, n_base_tokens=1792, moe_layers=2,
                   original_max_position_embeddings=64, rope_factor=32.0),
    # Kimi K2's exact dimensions
    "k2-slice": Preset(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                       num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, num_experts_per_tok=8,
                       n_base_tokens=163584, moe_layers=1, original_max_position_embeddings=4096,
                       rope_factor=64.0),
}


def make_config(preset: str, layout: str, moe_layers: int | None, n_group: int, topk_group: int) -> dict:
    p = PRESET_DIMS[preset]
    n_moe = p.moe_layers if moe_layers is None else moe_layers
    vocab = p.n_base_tokens + 256
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "moe_intermediate_size": p.moe_intermediate_size,
        "num_hidden_layers": 1 + n_moe,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_attention_heads,
        "n_routed_experts": p.n_routed_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": p.num_experts_per_tok,
        "n_group": n_group,
        "topk_group": topk_group,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": p.q_lora_rank,
        "kv_lora_rank": p.kv_lora_rank,
        "qk_nope_head_dim": p.qk_nope_head_dim,
        "qk_rope_head_dim": p.qk_rope_head_dim,
        "v_head_dim": p.v_head_dim,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": p.rope_factor, "beta_fast": 1.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": p.original_max_position_embeddings},
        "max_position_embeddings": int(p.original_max_position_embeddings * p.rope_factor),
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": p.n_base_tokens,
        "eos_token_id": p.n_base_tokens + 2,        # <|im_end|>, as K2-Thinking
        "pad_token_id": p.n_base_tokens + 255,
        "num_nextn_predict_layers": 0,
        "torch_dtype": "bfloat16",
    }
    if layout == "int4":
        cfg["quantization_config"] = K2_THINKING_QUANT
    elif layout == "fp8":
        cfg["quantization_config"] = K2_INSTRUCT_QUANT
    return cfg


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def tensor_shapes(cfg: dict):
    """(module or tensor name, shape, kind) in checkpoint order; kind: linear | norm | embed | gate | bias."""
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    C, P, V, R = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    Q, I, E = cfg["q_lora_rank"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    is_moe = ModelConfig.from_dict(cfg).is_moe_layer            # the config's rule, stated there only
    yield "model.embed_tokens.weight", (cfg["vocab_size"], D), "embed"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (D,), "norm"
        yield p + "self_attn.q_a_proj", (Q, D), "linear"
        yield p + "self_attn.q_a_layernorm.weight", (Q,), "norm"
        yield p + "self_attn.q_b_proj", (H * (C + P), Q), "linear"
        yield p + "self_attn.kv_a_proj_with_mqa", (R + P, D), "linear"
        yield p + "self_attn.kv_a_layernorm.weight", (R,), "norm"
        yield p + "self_attn.kv_b_proj", (H * (C + V), R), "linear"
        yield p + "self_attn.o_proj", (D, H * V), "linear"
        yield p + "post_attention_layernorm.weight", (D,), "norm"
        if not is_moe(i):
            F = cfg["intermediate_size"]
            shapes = (("gate", (F, D)), ("up", (F, D)), ("down", (D, F)))
            yield from ((p + f"mlp.{n}_proj", s, "linear") for n, s in shapes)
            continue
        yield p + "mlp.gate.weight", (E, D), "gate"
        yield p + "mlp.gate.e_score_correction_bias", (E,), "bias"
        for e in [*range(E), "shared"]:
            q = p + (f"mlp.experts.{e}." if e != "shared" else "mlp.shared_experts.")
            yield from ((q + f"{n}_proj", s, "linear") for n, s in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))))
    yield "model.norm.weight", (D,), "norm"
    yield "lm_head", (cfg["vocab_size"], D), "linear"


def _float_weight(seed: int, name: str, shape, gain: float = 1.0) -> np.ndarray:
    # std 1/sqrt(fan_in) keeps activations O(1) through the layers
    return (_rng(seed, name).standard_normal(shape, dtype=np.float32) * np.float32(gain / np.sqrt(shape[-1])))


def _random_int4(seed: int, name: str, shape) -> tuple[np.ndarray, np.ndarray]:
    """Random packed nibbles and bf16 scales without building the float matrix (K2-sized experts)."""
    out, inp = shape
    rng = _rng(seed, name)
    packed = np.frombuffer(rng.bytes(out * inp // 2), dtype=np.int32).reshape(out, inp // 8)
    scale = (rng.uniform(0.5, 1.5, (out, inp // 32)).astype(np.float32) / np.float32(7 * np.sqrt(inp)))
    return packed, scale.astype(BF16)


def build_specs(cfg: dict, layout: str, seed: int, routing_skew: float, fast_experts: bool) -> list[TensorSpec]:
    qc = cfg.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
    specs: list[TensorSpec] = []

    def add(name, dtype, shape, make):
        specs.append(TensorSpec(name, dtype, tuple(shape), make))

    for name, shape, kind in tensor_shapes(cfg):
        if kind == "embed":
            add(name, "BF16", shape, lambda n=name, s=shape: _rng(seed, n).standard_normal(s, np.float32).astype(BF16))
        elif kind == "norm":
            add(name, "BF16", shape, lambda n=name, s=shape: (1 + 0.1 * _rng(seed, n).standard_normal(s)).astype(BF16))
        elif kind == "gate":
            add(name, "BF16", shape, lambda n=name, s=shape: _float_weight(seed, n, s, 2.0).astype(BF16))
        elif kind == "bias":
            add(name, "F32", shape, lambda n=name, s=shape: _routing_bias(seed, n, s[0], routing_skew))
        elif layout == "int4" and ".mlp.experts." in name:
            out, inp = shape
            def parts(n=name, s=shape):
                return _random_int4(seed, n, s) if fast_experts else quantize_int4(_float_weight(seed, n, s), 32)
            cache: dict = {}

            def part(i, parts=parts, cache=cache):
                if "v" not in cache:
                    cache["v"] = parts()
                v = cache["v"][i]
                if i == 1:
                    cache.clear()
                return v
            add(name + ".weight_packed", "I32", (out, inp // 8), lambda part=part: part(0))
            add(name + ".weight_scale", "BF16", (out, inp // 32), lambda part=part: part(1))
            add(name + ".weight_shape", "I64", (2,), lambda s=shape: np.array(s, np.int64))
        elif layout == "fp8" and name != "lm_head":
            out, inp = shape
            cache = {}

            def part(i, n=name, s=shape, cache=cache):
                if "v" not in cache:
                    cache["v"] = quantize_fp8_block(_float_weight(seed, n, s), block)
                v = cache["v"][i]
                if i == 1:
                    cache.clear()
                return v
            add(name + ".weight", "F8_E4M3", shape, lambda part=part: part(0))
            add(name + ".weight_scale_inv", "F32", (-(-out // block[0]), -(-inp // block[1])),
                lambda part=part: part(1))
        else:
            gain = 6.0 if name == "lm_head" else 1.0     # peaked logits: clear greedy choices
            add(name + ".weight", "BF16", shape,
                lambda n=name, s=shape, g=gain: _float_weight(seed, n, s, g).astype(BF16))
    return specs


def _routing_bias(seed: int, name: str, n: int, skew: float) -> np.ndarray:
    """Small random bias; with skew > 0 a Zipf-like popularity (rank r gets -skew*log(r))."""
    rng = _rng(seed, name)
    bias = 0.05 * rng.standard_normal(n)
    if skew > 0:
        ranks = rng.permutation(n) + 1
        bias = bias - skew * np.log(ranks)
    return bias.astype(np.float32)


def make_test_model(out: str | Path, preset: str = "tiny", layout: str = "int4", shards: int = 2,
                    n_group: int = 1, topk_group: int = 1, moe_layers: int | None = None,
                    routing_skew: float = 0.0, seed: int = 0, flavor: str = "thinking") -> Path:
    """Write a complete random checkpoint folder; atomic (temp folder, then rename)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    cfg = make_config(preset, layout, moe_layers, n_group, topk_group)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        specs = build_specs(cfg, layout, seed, routing_skew, fast_experts=(preset == "k2-slice"))
        write_checkpoint(tmp, specs, shards=shards)
        write_tokenizer_files(tmp, PRESET_DIMS[preset].n_base_tokens, seed=seed, flavor=flavor)
        os.chmod(tmp, 0o755)                     # mkdtemp makes it private; a model folder is not
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
