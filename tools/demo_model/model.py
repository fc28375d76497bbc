"""Kimi K2's architecture in torch, small, for training the demo model (the runtime is numpy; this
file only has to compute the same function, which export.py checks through the runtime).

Same maths as runtime/model.py: MLA with q_lora (naive form), YaRN rope in interleaved pairs, dense
layer 0, then MoE layers with K2's sigmoid router (correction bias for choice only, n_group 1,
normalised weights x routed_scaling_factor) plus one shared expert. The routed experts train
quantization-aware: their forward uses the INT4 group-32 values the export will store
(quantize_int4's rule, straight-through gradient).

Shapes: B batch, T tokens, D hidden, H heads, C nope dim, P rope dim, V value dim, R kv_lora_rank,
E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_desktop.runtime.config import ModelConfig
from kimi_desktop.runtime.rope import rope_parameters, softmax_scale


def fake_int4(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """w [out, in] -> the dequantized INT4 values quantize_int4 stores (scale = bf16(max|w|/7) per
    group of 32 inputs, q = clip(rint(w/scale), -8, 7)); gradient straight through."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    scale = (g.detach().abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / scale), -8, 7) * scale
    return w + (q.reshape(out_f, in_f) - w).detach()


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False)


class Rope(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        inv_freq, factor = rope_parameters(cfg)
        inv = torch.tensor(inv_freq, dtype=torch.float32)
        ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]      # [T, P/2]
        self.register_buffer("cos", torch.cos(ang) * factor, persistent=False)
        self.register_buffer("sin", torch.sin(ang) * factor, persistent=False)

    def forward(self, x):
        """x [B, T, ..., P] -> rotated in interleaved pairs (x[2i], x[2i+1])."""
        T = x.shape[1]
        shape = (1, T) + (1,) * (x.dim() - 3) + (-1,)
        cos, sin = self.cos[:T].reshape(shape), self.sin[:T].reshape(shape)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: Rope):
        super().__init__()
        D, H, Q, R = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
        C, P, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.cfg, self.rope, self.scale = cfg, rope, softmax_scale(cfg)
        self.q_a_proj, self.q_a_layernorm = linear(D, Q), RMSNorm(Q, cfg.rms_norm_eps)
        self.q_b_proj = linear(Q, H * (C + P))
        self.kv_a_proj_with_mqa, self.kv_a_layernorm = linear(D, R + P), RMSNorm(R, cfg.rms_norm_eps)
        self.kv_b_proj = linear(R, H * (C + V))
        self.o_proj = linear(H * V, D)

    def forward(self, x):
        cfg = self.cfg
        B, T, _ = x.shape
        H, R, C, P, V = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                         cfg.qk_rope_head_dim, cfg.v_head_dim)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, H, C + P)
        q = torch.cat((q[..., :C], self.rope(q[..., C:])), -1)                      # [B, T, H, C+P]
        ckv = self.kv_a_proj_with_mqa(x)                                            # [B, T, R+P]
        k_pe = self.rope(ckv[..., R:])[:, :, None, :].expand(B, T, H, P)            # [B, T, H, P]
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv[..., :R])).view(B, T, H, C + V)
        k = torch.cat((kv[..., :C], k_pe), -1)                                      # [B, T, H, C+P]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., C:].transpose(1, 2),
                                             is_causal=True, scale=self.scale)      # [B, H, T, V]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * V))


class MLP(nn.Module):
    def __init__(self, D: int, inter: int, int4: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(D, inter), linear(D, inter), linear(inter, D)
        self.int4 = int4

    def forward(self, x):
        if not self.int4:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g, u, d = (fake_int4(m.weight) for m in (self.gate_proj, self.up_proj, self.down_proj))
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size, int4=True)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
        self.load = torch.zeros(cfg.n_routed_experts)       # tokens per expert in the last forward

    def route(self, x):
        """x [N, D] -> (idx [N, K], weights [N, K]); n_group 1, so no group limit."""
        scores = torch.sigmoid(x @ self.gate.weight.T)                              # [N, E]
        idx = torch.topk(scores.detach() + self.gate.e_score_correction_bias, self.cfg.num_experts_per_tok, -1).indices
        w = scores.gather(-1, idx)
        if self.cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.cfg.routed_scaling_factor

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                # [N, D]
        idx, w = self.route(x)
        y = self.shared_experts(x)
        self.load = torch.bincount(idx.flatten(), minlength=self.cfg.n_routed_experts).float()
        for e, expert in enumerate(self.experts):
            rows, k = torch.nonzero(idx == e, as_tuple=True)
            if rows.numel():
                y = y.index_add(0, rows, expert(x[rows]) * w[rows, k, None])
        return y.reshape(shape)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, rope: Rope):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope = Rope(cfg, max_len)
        self.layers = nn.ModuleList(Layer(cfg, i, rope) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class K2(nn.Module):
    """Parameter names are the checkpoint's (model.layers.{i}.self_attn.q_a_proj.weight, ...)."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg, max_len)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, ids):
        """ids [B, T] int64 -> logits [B, T, vocab] float32."""
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]


def init_weights(model: K2, seed: int) -> None:
    """Normal(0, 0.02) matrices, output projections scaled down by depth, norms at 1."""
    g = torch.Generator().manual_seed(seed)
    depth = 2 * model.cfg.num_hidden_layers
    for name, p in sorted(model.named_parameters()):
        if p.dim() < 2:
            continue
        std = 0.02 / depth ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)
