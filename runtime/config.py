"""Model configuration from a checkpoint's config.json, with Hugging Face key names."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_desktop.offload.safetensors import CheckpointError

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int              # dense MLP (layers < first_k_dense_replace)
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None      # None: q_proj straight from hidden (DeepSeek-V2-Lite style)
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "deepseek_v3"
    quantization_config: dict | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def context_limit(self) -> int:
        """Tokens the model's positions cover (K2-Thinking 262,144; K2-Instruct 131,072)."""
        return int(self.max_position_embeddings)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i routes to experts (else a dense MLP): DeepSeek-V3's rule, stated here only."""
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Kimi K2 / DeepSeek-V3 architecture)")
        names = {f.name: f for f in dataclasses.fields(cls) if f.name != "raw"}
        required = [n for n, f in names.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for key in required:
            if key not in d:
                raise CheckpointError(f"{source}: required key {key!r} is missing")
        kwargs = {k: v for k, v in d.items() if k in names}
        for key in required:
            if not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool) or kwargs[key] < 0:
                raise CheckpointError(f"{source}: {key!r} must be a non-negative integer, got {kwargs[key]!r}")
        cfg = cls(**kwargs, raw=dict(d))
        cfg._check(source)
        return cfg

    def _check(self, source: str) -> None:
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise CheckpointError(f"{source}: only scoring_func 'sigmoid' with topk_method 'noaux_tc' is "
                                  f"supported, got {self.scoring_func!r} / {self.topk_method!r}")
        if self.hidden_act != "silu":
            raise CheckpointError(f"{source}: hidden_act {self.hidden_act!r} is not supported (expected 'silu')")
        if self.n_routed_experts and self.n_routed_experts % self.n_group:
            raise CheckpointError(f"{source}: n_routed_experts {self.n_routed_experts} is not divisible "
                                  f"by n_group {self.n_group}")
        if self.n_routed_experts and not (1 <= self.topk_group <= self.n_group):
            raise CheckpointError(f"{source}: topk_group {self.topk_group} must be in 1..n_group {self.n_group}")
        per_group = self.n_routed_experts // max(self.n_group, 1)
        if self.n_routed_experts and self.num_experts_per_tok > self.topk_group * per_group:
            raise CheckpointError(f"{source}: num_experts_per_tok {self.num_experts_per_tok} exceeds the experts "
                                  f"in topk_group groups")
        if not isinstance(self.max_position_embeddings, int) or self.max_position_embeddings < 1:
            raise CheckpointError(f"{source}: max_position_embeddings must be a positive integer, "
                                  f"got {self.max_position_embeddings!r}")
        if self.qk_rope_head_dim % 2:
            raise CheckpointError(f"{source}: qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (expected 'yarn')")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in rs:
                        raise CheckpointError(f"{source}: rope_scaling is missing {key!r}")


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found; is {folder} a checkpoint folder?") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return ModelConfig.from_dict(d, str(path))
