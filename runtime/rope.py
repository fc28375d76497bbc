"""YaRN rotary embedding for MLA's rope half, in DeepSeek's interleaved-pair layout.

Follows transformers' `_compute_yarn_parameters` and DeepSeek-V3's `yarn_get_mscale`
(reference doc §3): frequencies are blended between extrapolation and interpolation
over the correction range, cos/sin are scaled by `attention_factor`, and the softmax
scale gains mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_kind(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling or {}
    return rs.get("type", rs.get("rope_type", "default")) or "default"


def rope_parameters(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float64 [rope_dim/2], attention_factor multiplying cos and sin)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extra = 1.0 / pos_freqs
    if _rope_kind(cfg) != "yarn":
        return extra, 1.0
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp                                   # 1: original frequency, 0: divided by factor
    inv_freq = (extra / factor) * (1.0 - keep) + extra * keep
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs and _rope_kind(cfg) != "default" and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rs["factor"]), rs["mscale_all_dim"])
        scale *= m * m
    return scale


class Rope:
    """Rotates [T, ..., rope_dim] vectors in interleaved pairs (x[2i], x[2i+1])."""

    def __init__(self, cfg: ModelConfig):
        # float32 like transformers (inv_freq and angles), so long positions round the same way
        inv_freq, self.attention_factor = rope_parameters(cfg)
        self.inv_freq = inv_freq.astype(np.float32)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]   # [T, dim/2]
        return (np.cos(angles) * np.float32(self.attention_factor),
                np.sin(angles) * np.float32(self.attention_factor))

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [T, H, d] or [T, d] float32 -> rotated copy, same layout."""
        cos, sin = self.cos_sin(positions)
        if x.ndim == 3:
            cos, sin = cos[:, None, :], sin[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out
