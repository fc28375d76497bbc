"""`export-gguf`: a Kimi K2 checkpoint folder -> one llama.cpp GGUF file (arch `deepseek2`).

Follows what llama.cpp's own converter (convert_hf_to_gguf.py, DeepseekV2Model) writes, so the file
loads in llama.cpp / llama-cpp-python:

- MLA as MQA: head_count_kv 1, key_length kv_lora+rope, value_length kv_lora, key/value_length_mla
  the per-head sizes; kv_b_proj split per head into attn_k_b (W_UK transposed, [H, kv_lora, nope])
  and attn_v_b (W_UV, [H, v, kv_lora]) for the absorbed attention.
- q_pe / k_pe stay in the checkpoint's interleaved-pair order: llama.cpp ropes deepseek2 with
  LLAMA_ROPE_TYPE_NORM, which rotates the pairs (x[2i], x[2i+1]), so no permutation is needed.
- Routed experts stacked per layer into ffn_{gate,up,down}_exps [E, out, in]. INT4 pack-quantized
  experts (group 32) become Q4_0 bit for bit: a Q4_0 block is one fp16 scale and 32 nibbles holding
  q + 8, the same grid. Other layouts keep BF16 experts (exact for bf16 checkpoints).
- Norms, the router weight and e_score_correction_bias (exp_probs_b) in F32, everything else BF16.
- Tokenizer: "gpt2" byte-level BPE with pre-tokenizer "kimi-k2"; tokens in GPT-2's byte-to-unicode
  spelling, merges rebuilt from the tiktoken ranks (llama.cpp's QwenModel.bpe rule), special ids
  CONTROL, ids without a token UNUSED `[PAD{id}]`.

Tensors are streamed: each one is produced (a row block or one expert at a time) while the file is
written, so exporting a model never holds more than one expert / row block in memory.

Note for llama.cpp users: deepseek2 ignores rope.scaling.yarn_beta_fast/slow in the GGUF (it uses
32 / 1 unless the context is created with other values). K2 uses beta_fast = beta_slow = 1; the
values are written here and `kimi_desktop.engines.llama_cpp.load_llama` passes them on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from kimi_desktop.offload.formats import Int4Linear, QuantConfig, int4_nibbles, load_linear
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError
from kimi_desktop.runtime.config import ModelConfig, load_config

__all__ = ["export_gguf", "register", "gguf_metadata", "int4_to_q4_0", "bytes_to_unicode",
           "EXPERT_TYPES", "WEIGHT_TYPES"]

ARCH = "deepseek2"
EXPERT_TYPES = ("auto", "q4_0", "bf16", "f32")
WEIGHT_TYPES = ("bf16", "f32")
QK4_0 = 32                       # values per Q4_0 block
Q4_0_BLOCK_BYTES = 2 + QK4_0 // 2
BLOCK_BYTES = 32 << 20           # target size of one streamed piece of a tensor
BF16 = np.dtype(ml_dtypes.bfloat16)

Progress = Callable[[int, int, str], None]   # (bytes written, total bytes, tensor name)


# --------------------------------------------------------------------------------------------
# Q4_0 from INT4 pack-quantized

def int4_to_q4_0(packed: np.ndarray, scale: np.ndarray, in_features: int, where: str = "") -> np.ndarray:
    """compressed-tensors INT4 (group 32) rows -> Q4_0 blocks, exactly.

    packed int32 [rows, in/8] (column 8k+j in nibble j, value q + 8), scale bf16/f16/f32 [rows, in/32]
    -> uint8 [rows, in/32 * 18]: per block fp16 d, then 16 bytes, byte j = element j (low nibble) |
    element j+16 (high nibble). Raises CheckpointError if a scale is not exactly an fp16 number.
    """
    rows = packed.shape[0]
    if in_features % QK4_0 or scale.shape != (rows, in_features // QK4_0):
        raise CheckpointError(f"{where}: Q4_0 needs groups of {QK4_0}; in_features {in_features}, "
                              f"scale shape {scale.shape}")
    nb = in_features // QK4_0
    s32 = np.asarray(scale).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        d = s32.astype(np.float16)
    bad = ~(d.astype(np.float32) == s32)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise CheckpointError(
            f"{where}: weight_scale[{r}, {c}] = {float(s32[r, c])!r} is not exactly representable as an fp16 "
            f"number (fp16 gives {d[r, c].astype(np.float32)!r}); a Q4_0 export would not be exact")
    u = int4_nibbles(packed, in_features).reshape(rows, nb, QK4_0)   # [rows, blocks, 32] nibble values q + 8
    out = np.empty((rows, nb, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :2] = d.astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = u[:, :, :16] | (u[:, :, 16:] << 4)
    return out.reshape(rows, nb * Q4_0_BLOCK_BYTES)


# --------------------------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE token spelling)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _vocab(folder: Path, cfg: ModelConfig):
    """(tokens, token types, merges, tokenizer) as llama.cpp's kimi-k2 converter branch builds them."""
    import gguf

    from kimi_desktop.runtime.tokenizer import bpe_split, load_tokenizer

    tok = load_tokenizer(folder)
    enc = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    by_id: dict[int, str] = {}
    merges: list[str] = []
    for token, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
        by_id[rank] = spell(token)
        if len(token) > 1:
            parts = bpe_split(tok.ranks, token, max_rank=rank)
            if len(parts) == 2:               # as the converter: tokens that are no merge are skipped
                merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    if cfg.vocab_size < tok.num_base:
        raise CheckpointError(f"{folder / 'config.json'}: vocab_size {cfg.vocab_size} is smaller than the "
                              f"{tok.num_base} tokens of tiktoken.model")
    tokens, types = [], []
    special = {i: name for name, i in tok.special_ids.items()}
    for i in range(cfg.vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        elif i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types, merges, tok


def _tokenizer_config(folder: Path) -> dict:
    try:
        d = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _special_id(cfg: ModelConfig, tok, tok_cfg: dict, key: str, name_key: str) -> int | None:
    """bos/eos/pad id: config.json's *_token_id, else tokenizer_config.json's token string."""
    v = cfg.raw.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < cfg.vocab_size:
        return v
    s = tok_cfg.get(name_key)
    if isinstance(s, dict):
        s = s.get("content")
    if isinstance(s, str) and s in tok.special_ids and tok.special_ids[s] < cfg.vocab_size:
        return tok.special_ids[s]
    return None


# --------------------------------------------------------------------------------------------
# metadata

def gguf_metadata(cfg: ModelConfig, source: str = "config.json") -> list[tuple[str, str, object]]:
    """The architecture key/values, as (writer method, short key, value), in writing order."""
    import gguf

    if cfg.n_routed_experts and cfg.moe_layers != tuple(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)):
        raise CheckpointError(f"{source}: moe_layer_freq {cfg.moe_layer_freq} cannot be expressed in a "
                              f"deepseek2 GGUF (llama.cpp makes every layer after the dense ones MoE)")
    if cfg.n_routed_experts and cfg.n_shared_experts < 1:
        raise CheckpointError(f"{source}: n_shared_experts {cfg.n_shared_experts}: llama.cpp's deepseek2 "
                              f"needs the shared expert tensors")
    return [*_model_kv(cfg, gguf), *_mla_expert_kv(cfg), *_yarn_kv(cfg, source, gguf)]


def _model_kv(cfg: ModelConfig, gguf) -> list[tuple[str, str, object]]:
    """Sizes, norms, rope base, and the router: expert counts, groups, gating."""
    # llama.cpp asserts n_group_used < n_group when n_group > 1; topk_group == n_group is no grouping
    grouped = cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    return [
        ("add_block_count", "block_count", cfg.num_hidden_layers),
        ("add_context_length", "context_length", cfg.max_position_embeddings),
        ("add_embedding_length", "embedding_length", cfg.hidden_size),
        ("add_feed_forward_length", "feed_forward_length", cfg.intermediate_size),
        ("add_head_count", "attention.head_count", cfg.num_attention_heads),
        ("add_head_count_kv", "attention.head_count_kv", 1),       # MLA as MQA
        ("add_rope_freq_base", "rope.freq_base", float(cfg.rope_theta)),
        ("add_layer_norm_rms_eps", "attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps)),
        ("add_expert_count", "expert_count", cfg.n_routed_experts),
        ("add_expert_used_count", "expert_used_count", cfg.num_experts_per_tok),
        ("add_expert_group_count", "expert_group_count", cfg.n_group if grouped else 1),
        ("add_expert_group_used_count", "expert_group_used_count", cfg.topk_group if grouped else 1),
        ("add_expert_gating_func", "expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID),
        ("add_leading_dense_block_count", "leading_dense_block_count", cfg.first_k_dense_replace),
        ("add_vocab_size", "vocab_size", cfg.vocab_size),
    ]


def _mla_expert_kv(cfg: ModelConfig) -> list[tuple[str, str, object]]:
    """MLA's ranks and head sizes, the experts' width and scaling, the rope dimension."""
    kv: list[tuple[str, str, object]] = []
    if cfg.q_lora_rank is not None:
        kv.append(("add_q_lora_rank", "attention.q_lora_rank", cfg.q_lora_rank))
    kv += [
        ("add_kv_lora_rank", "attention.kv_lora_rank", cfg.kv_lora_rank),
        ("add_key_length", "attention.key_length", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        ("add_value_length", "attention.value_length", cfg.kv_lora_rank),
        ("add_key_length_mla", "attention.key_length_mla", cfg.qk_nope_head_dim + cfg.qk_rope_head_dim),
        ("add_value_length_mla", "attention.value_length_mla", cfg.v_head_dim),
        ("add_expert_feed_forward_length", "expert_feed_forward_length", cfg.moe_intermediate_size),
        ("add_expert_shared_count", "expert_shared_count", cfg.n_shared_experts),
        ("add_expert_weights_scale", "expert_weights_scale", float(cfg.routed_scaling_factor)),
    ]
    if cfg.norm_topk_prob:
        kv.append(("add_expert_weights_norm", "expert_weights_norm", True))
    kv.append(("add_rope_dimension_count", "rope.dimension_count", cfg.qk_rope_head_dim))
    return kv


def _yarn_kv(cfg: ModelConfig, source: str, gguf) -> list[tuple[str, str, object]]:
    """YaRN rope scaling, when the config has it (none otherwise)."""
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return []
    mscale, mscale_all = float(rs.get("mscale", 1.0)), float(rs.get("mscale_all_dim", 0.0))
    if mscale_all and mscale != mscale_all and mscale != 1.0:
        raise CheckpointError(f"{source}: rope_scaling mscale {mscale} with mscale_all_dim {mscale_all}: "
                              f"llama.cpp's deepseek2 assumes mscale 1.0")
    kv: list[tuple[str, str, object]] = [
        ("add_rope_scaling_type", "rope.scaling.type", gguf.RopeScalingType.YARN),
        ("add_rope_scaling_factor", "rope.scaling.factor", float(rs["factor"])),
        ("add_rope_scaling_orig_ctx_len", "rope.scaling.original_context_length",
         int(rs["original_max_position_embeddings"])),
    ]
    if "beta_fast" in rs:
        kv.append(("add_rope_scaling_yarn_beta_fast", "rope.scaling.yarn_beta_fast", float(rs["beta_fast"])))
    if "beta_slow" in rs:
        kv.append(("add_rope_scaling_yarn_beta_slow", "rope.scaling.yarn_beta_slow", float(rs["beta_slow"])))
    if mscale_all:
        # the converter's legacy encoding: llama.cpp divides this key by 0.1 again
        kv.append(("add_rope_scaling_yarn_log_mul", "rope.scaling.yarn_log_multiplier", 0.1 * mscale_all))
    return kv


# --------------------------------------------------------------------------------------------
# tensors

@dataclass
class _Tensor:
    """One GGUF tensor, produced piece by piece while the file is written (GGUFWriter calls tofile)."""
    name: str
    shape: tuple[int, ...]           # numpy order (GGUF's ne reversed)
    qtype: object                    # gguf.GGMLQuantizationType
    nbytes: int
    pieces: Callable[[], Iterator[np.ndarray]]
    on_write: Callable[[int, str], None] | None = None
    dtype = np.dtype(np.float32)     # never uint8: GGUFWriter would read shape as a byte shape

    def tofile(self, fout) -> None:
        written = 0
        for a in self.pieces():
            buf = np.ascontiguousarray(a).view(np.uint8)
            fout.write(buf.data)
            written += buf.nbytes
            if self.on_write is not None:
                self.on_write(buf.nbytes, self.name)
        if written != self.nbytes:
            raise RuntimeError(f"{self.name}: wrote {written} bytes, expected {self.nbytes}")


def _rows_step(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def _rows(lin, dtype: np.dtype) -> Iterator[np.ndarray]:
    """A Linear's weight as bf16 / f32, a block of rows at a time (same-dtype storage is copied as is)."""
    out_f, in_f = lin.shape
    step = _rows_step(4 * in_f)
    w = getattr(lin, "weight", None)
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        if w is not None and w.dtype == dtype:
            yield w[r0:r1]
        else:
            yield lin.dequantize(slice(r0, r1)).astype(dtype)


class _Exporter:
    def __init__(self, folder: Path, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, experts: str,
                 weights: str):
        import gguf

        self.gguf = gguf
        self.T = gguf.GGMLQuantizationType
        self.folder, self.cfg, self.ckpt, self.qcfg = folder, cfg, ckpt, qcfg
        self.experts = experts
        self.wtype, self.wdtype = ((self.T.F32, np.dtype(np.float32)) if weights == "f32"
                                   else (self.T.BF16, BF16))
        self.tensors: list[_Tensor] = []

    # -- helpers ------------------------------------------------------------------------------
    def add(self, name: str, shape, qtype, pieces) -> None:
        shape = tuple(int(s) for s in shape)
        if qtype == self.T.Q4_0:
            nbytes = math.prod(shape[:-1]) * (shape[-1] // QK4_0) * Q4_0_BLOCK_BYTES
        else:
            nbytes = math.prod(shape) * (4 if qtype == self.T.F32 else 2)
        self.tensors.append(_Tensor(name, shape, qtype, nbytes, pieces))

    def vector_f32(self, gname: str, hf_name: str, shape: tuple[int, ...]) -> None:
        self.ckpt.require(hf_name, ("BF16", "F16", "F32"), shape)
        self.add(gname, shape, self.T.F32, lambda: iter([self.ckpt.get(hf_name).astype(np.float32)]))

    def _where(self, name: str) -> str:
        if name in self.ckpt:
            return f"{self.ckpt.info(name).path}: tensor '{name}'"
        return f"{self.folder}: tensor '{name}'"

    def linear(self, prefix: str, shape: tuple[int, int]):
        return load_linear(self.ckpt, prefix, self.qcfg, shape)

    def matrix(self, gname: str, prefix: str, shape: tuple[int, int]) -> None:
        lin = self.linear(prefix, shape)
        self.add(gname, shape, self.wtype, lambda: _rows(lin, self.wdtype))

    def matrix_f32(self, gname: str, hf_name: str, shape: tuple[int, int]) -> None:
        self.ckpt.require(hf_name, ("BF16", "F16", "F32"), shape)
        w = self.ckpt.get(hf_name)
        step = _rows_step(4 * shape[1])
        self.add(gname, shape, self.T.F32,
                 lambda: (w[r:r + step].astype(np.float32) for r in range(0, shape[0], step)))

    # -- model --------------------------------------------------------------------------------
    def plan(self) -> None:
        c = self.cfg
        D, H, V = c.hidden_size, c.num_attention_heads, c.vocab_size
        C, P, Vh, R = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        E, I = c.n_routed_experts, c.moe_intermediate_size
        self.ckpt.require("model.embed_tokens.weight", ("BF16", "F16", "F32"), (V, D))
        emb = self.ckpt.get("model.embed_tokens.weight")
        step = _rows_step(4 * D)
        self.add("token_embd.weight", (V, D), self.wtype,
                 lambda: (emb[r:r + step].astype(self.wdtype, copy=False) for r in range(0, V, step)))
        for i in range(c.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            a = p + "self_attn."
            self.vector_f32(b + "attn_norm.weight", p + "input_layernorm.weight", (D,))
            if c.q_lora_rank is not None:
                Q = c.q_lora_rank
                self.matrix(b + "attn_q_a.weight", a + "q_a_proj", (Q, D))
                self.vector_f32(b + "attn_q_a_norm.weight", a + "q_a_layernorm.weight", (Q,))
                self.matrix(b + "attn_q_b.weight", a + "q_b_proj", (H * (C + P), Q))
            else:
                self.matrix(b + "attn_q.weight", a + "q_proj", (H * (C + P), D))
            self.matrix(b + "attn_kv_a_mqa.weight", a + "kv_a_proj_with_mqa", (R + P, D))
            self.vector_f32(b + "attn_kv_a_norm.weight", a + "kv_a_layernorm.weight", (R,))
            kv_b = self.linear(a + "kv_b_proj", (H * (C + Vh), R))

            def k_b(kv_b=kv_b):         # [H, R, C]: W_UK per head, transposed
                for h in range(H):
                    w = kv_b.dequantize(slice(h * (C + Vh), h * (C + Vh) + C))          # [C, R]
                    yield np.ascontiguousarray(w.T).astype(self.wdtype)[None]

            def v_b(kv_b=kv_b):         # [H, Vh, R]: W_UV per head
                for h in range(H):
                    yield kv_b.dequantize(slice(h * (C + Vh) + C, (h + 1) * (C + Vh))).astype(self.wdtype)[None]
            self.add(b + "attn_k_b.weight", (H, R, C), self.wtype, k_b)
            self.add(b + "attn_v_b.weight", (H, Vh, R), self.wtype, v_b)
            self.matrix(b + "attn_output.weight", a + "o_proj", (D, H * Vh))
            self.vector_f32(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (D,))
            m = p + "mlp."
            if not c.is_moe_layer(i):
                F = c.intermediate_size
                self.matrix(b + "ffn_gate.weight", m + "gate_proj", (F, D))
                self.matrix(b + "ffn_up.weight", m + "up_proj", (F, D))
                self.matrix(b + "ffn_down.weight", m + "down_proj", (D, F))
                continue
            self.matrix_f32(b + "ffn_gate_inp.weight", m + "gate.weight", (E, D))
            bias = m + "gate.e_score_correction_bias"
            if bias in self.ckpt:
                self.vector_f32(b + "exp_probs_b.bias", bias, (E,))
            for proj, shape in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
                self.experts_stack(b + f"ffn_{proj}_exps.weight", i, proj, shape)
            S = I * c.n_shared_experts
            self.matrix(b + "ffn_gate_shexp.weight", m + "shared_experts.gate_proj", (S, D))
            self.matrix(b + "ffn_up_shexp.weight", m + "shared_experts.up_proj", (S, D))
            self.matrix(b + "ffn_down_shexp.weight", m + "shared_experts.down_proj", (D, S))
        self.vector_f32("output_norm.weight", "model.norm.weight", (D,))
        if not c.tie_word_embeddings:
            self.matrix("output.weight", "lm_head", (V, D))

    def experts_stack(self, gname: str, layer: int, proj: str, shape: tuple[int, int]) -> None:
        E = self.cfg.n_routed_experts
        prefix = f"model.layers.{layer}.mlp.experts.{{}}.{proj}_proj"
        lins = [self.linear(prefix.format(e), shape) for e in range(E)]   # headers only
        out_f, in_f = shape
        kind = self.experts
        if kind == "auto":
            kind = "q4_0" if all(isinstance(x, Int4Linear) and x.group == QK4_0 for x in lins) else "bf16"
        if kind in ("bf16", "f32"):
            qtype, dtype = (self.T.F32, np.dtype(np.float32)) if kind == "f32" else (self.T.BF16, BF16)
            self.add(gname, (E, out_f, in_f), qtype, lambda: (blk for x in lins for blk in _rows(x, dtype)))
            return
        if in_f % QK4_0:
            raise CheckpointError(f"{self.folder}: {prefix.format(0)}: in_features {in_f} is not a multiple "
                                  f"of {QK4_0}; Q4_0 is impossible (use experts='bf16')")
        step = _rows_step(in_f * 4)

        def pieces():
            for e, x in enumerate(lins):
                where = self._where(prefix.format(e) + ".weight_scale")
                for r0 in range(0, out_f, step):
                    r1 = min(out_f, r0 + step)
                    if isinstance(x, Int4Linear) and x.group == QK4_0:
                        yield int4_to_q4_0(x.packed[r0:r1], x.scale[r0:r1], in_f, where)
                    else:
                        yield self.gguf.quants.quantize(x.dequantize(slice(r0, r1)), self.T.Q4_0)
        self.add(gname, (E, out_f, in_f), self.T.Q4_0, pieces)


# --------------------------------------------------------------------------------------------
# entry point

def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                progress: Progress | None = None, experts: str = "auto", weights: str = "bf16") -> Path:
    """Write `out_path` (a llama.cpp GGUF, arch deepseek2) from the checkpoint folder `model_dir`.

    experts: routed experts as "auto" (Q4_0 for INT4 group-32 checkpoints, exact; BF16 otherwise),
             "q4_0" (others quantized with gguf's Q4_0), "bf16" or "f32".
    weights: every other matrix (embeddings, attention, dense / shared MLPs, lm_head) as "bf16"
             (default) or "f32" (exact for every layout; for cross-checking llama.cpp's maths).
             Norms, router weight and bias are always F32.
    progress(bytes_written, total_bytes, tensor_name) is called as tensor data is written.
    The file appears atomically (written to OUT.partial, then renamed). Returns the path.
    """
    import gguf

    folder, out = Path(model_dir), Path(out_path)
    cfg, source = _checked_config(folder, experts, weights)
    kv = gguf_metadata(cfg, source)
    qcfg = QuantConfig.from_config(cfg.raw, source)
    vocab = _vocab(folder, cfg)
    tok_cfg = _tokenizer_config(folder)

    with Checkpoint(folder) as ckpt:
        ex = _Exporter(folder, cfg, ckpt, qcfg, experts, weights)
        ex.plan()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            w.add_name(folder.resolve().name or "kimi-k2")
            for method, _key, value in kv:
                getattr(w, method)(value)
            w.add_file_type(_file_type(gguf, ex.tensors))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_tokenizer(w, cfg, *vocab, tok_cfg)
            _add_tensors(w, ex.tensors, progress)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, out)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
    return out


def _checked_config(folder: Path, experts: str, weights: str) -> tuple[ModelConfig, str]:
    """The folder's config, after checking the options and that it is a model the GGUF can hold."""
    if experts not in EXPERT_TYPES:
        raise ValueError(f"experts must be one of {EXPERT_TYPES}, got {experts!r}")
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    cfg = load_config(folder)
    source = str(folder / "config.json")
    arch = (cfg.raw.get("architectures") or ["DeepseekV3ForCausalLM"])[0]
    if arch not in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"):
        raise CheckpointError(f"{source}: architectures[0] {arch!r} is not a Kimi K2 / DeepSeek-V3 model")
    return cfg, source


def _file_type(gguf, tensors: list[_Tensor]):
    """The file's nominal type: its coarsest tensor type."""
    T = gguf.GGMLQuantizationType
    qtypes = {t.qtype for t in tensors}
    return (gguf.LlamaFileType.MOSTLY_Q4_0 if T.Q4_0 in qtypes else
            gguf.LlamaFileType.MOSTLY_BF16 if T.BF16 in qtypes else gguf.LlamaFileType.ALL_F32)


def _add_tokenizer(w, cfg: ModelConfig, tokens, types, merges, tok, tok_cfg: dict) -> None:
    """The vocabulary as llama.cpp's gpt2 BPE (pre-tokenizer kimi-k2), special ids, the chat template."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, name, add in (("bos_token_id", "bos_token", w.add_bos_token_id),
                           ("eos_token_id", "eos_token", w.add_eos_token_id),
                           ("pad_token_id", "pad_token", w.add_pad_token_id)):
        tid = _special_id(cfg, tok, tok_cfg, key, name)
        if tid is not None:
            add(tid)
    unk = tok.special_ids.get("[UNK]")
    if unk is not None and unk < cfg.vocab_size:
        w.add_unk_token_id(unk)
    w.add_add_bos_token(False)            # K2's tokenizer adds no BOS
    w.add_add_eos_token(False)
    template = getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)


def _add_tensors(w, tensors: list[_Tensor], progress: Progress | None) -> None:
    """Queue the tensors on the writer; progress(bytes_written, total_bytes, name) as their data is written."""
    total = sum(t.nbytes for t in tensors)
    done = [0]

    def on_write(n: int, name: str) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total, name)

    for t in tensors:
        t.on_write = on_write
        w.add_tensor(t.name, t, raw_shape=t.shape, raw_dtype=t.qtype)


# --------------------------------------------------------------------------------------------
# command line

def _cmd_export(args) -> int:
    t0 = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"\r{done / 2**20:10.1f} / {total / 2**20:.1f} MiB  {name:<40.40}", end="",
                  file=sys.stderr, flush=True)

    out = export_gguf(args.model, args.out, progress=None if args.quiet else progress, experts=args.experts,
                      weights=args.weights)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"{out}  ({out.stat().st_size / 2**20:.1f} MiB, {time.monotonic() - t0:.1f} s)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `export-gguf MODEL OUT.gguf` to the CLI's subparsers (sets func=...)."""
    p = subparsers.add_parser("export-gguf", help="write a llama.cpp GGUF (arch deepseek2) of a checkpoint",
                              description="Convert a Kimi K2 checkpoint folder to one GGUF file for "
                                          "llama.cpp. INT4 routed experts become Q4_0 exactly; other "
                                          "weights BF16, norms and the router F32.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (config.json, safetensors, tokenizer)")
    p.add_argument("out", metavar="OUT.gguf", help="output file")
    p.add_argument("--experts", choices=EXPERT_TYPES, default="auto",
                   help="routed expert type: auto = Q4_0 for INT4 checkpoints, else BF16 (default)")
    p.add_argument("--weights", choices=WEIGHT_TYPES, default="bf16",
                   help="type of the other matrices (default bf16; f32 for exact cross-checks)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_export)
    return p
