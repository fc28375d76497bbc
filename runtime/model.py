"""Kimi K2 / DeepSeek-V3 forward pass in numpy, over weights that stay in their stored format.

Weight products go through `linear()`, which sends the stored formats to the numba kernels;
`KERNELS = False` runs the plain-numpy reference products instead (both tested against transformers).

Shapes: T = tokens in this call, N = tokens in the cache (incl. these), D = hidden_size,
H = heads, R = kv_lora_rank, P = qk_rope_head_dim, C = qk_nope_head_dim, V = v_head_dim,
E = routed experts, K = experts per token.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from kimi_desktop.offload.formats import (Fp8BlockLinear, Int4Linear, Linear, PlainLinear, QuantConfig,
                                         linear_tensors, load_linear)
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError

from . import kernels
from .config import ModelConfig, load_config
from .kernels.absorb import absorb_out, absorb_q
from .profile import timer
from .rope import Rope, softmax_scale

BF16 = np.dtype(ml_dtypes.bfloat16)
KERNELS = True                  # False: numpy reference products only (kept for tests and debugging)
ATTN_IMPLS = ("auto", "naive", "absorb")
# The kernels release the GIL (so the expert store's reader threads run during compute); numba's
# workqueue threading layer, its fallback where neither OpenMP nor TBB loads, aborts the process on
# parallel launches from two threads at once. Forward passes of all models in a process take turns.
_FORWARD_LOCK = threading.Lock()
PREFETCH_MAX_TOKENS = 4         # decode-sized calls; prefill reads every expert of a layer anyway
# "auto" attention: the naive form (GEMMs, fastest for prompts) expands the latent cache into
# per-head keys and values, N x H x (C+V) float32 (K2: 64 KiB per cached token, 1.3 GB at 20K);
# beyond this, prefill chunks use the absorbed form, which reads the latent cache as it is
NAIVE_MAX_BYTES = 256 << 20


def linear(w: Linear, x: np.ndarray) -> np.ndarray:
    """x [T, in] float32 -> [T, out] float32: the single dispatch point for weight products.

    Stored formats go to the numba kernels (dequantized on the fly, never a float copy of the
    matrix); anything else to the numpy path of the weight class.
    """
    if not KERNELS:
        return w.matmul(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    one = x.shape[0] == 1
    if isinstance(w, Int4Linear) and w.group == 32:
        return (kernels.int4_gemv(w.packed, w.scale, x[0])[None] if one else kernels.int4_gemm(w.packed, w.scale, x))
    if isinstance(w, PlainLinear) and w.weight.dtype == BF16:
        return kernels.bf16_gemv(w.weight, x[0])[None] if one else kernels.bf16_gemm(w.weight, x)
    if isinstance(w, Fp8BlockLinear):
        if one:
            return kernels.fp8_gemv(w.weight, w.scale_inv, x[0], block=w.block)[None]
        return kernels.fp8_gemm(w.weight, w.scale_inv, x, block=w.block)
    return w.matmul(x)


def as_f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class Lazy:
    """A weight checked at open (headers only) and mapped on first use, so opening reads no data."""

    def __init__(self, make: Callable):
        self._make, self._value = make, None

    def __call__(self):
        if self._value is None:
            self._value = self._make()
        return self._value


def vector(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
    """A small tensor (norm weight, router bias) as float32."""
    ckpt.require(name, shape=shape)
    return Lazy(lambda: as_f32(ckpt.read(name)))


def lazy_linear(ckpt: Checkpoint, prefix: str, qcfg: QuantConfig, shape: tuple[int, int]) -> Lazy:
    """A weight every token uses: read into resident memory on first use (routed experts are not)."""
    linear_tensors(ckpt, prefix, qcfg, shape)
    return Lazy(lambda: load_linear(ckpt, prefix, qcfg, shape, resident=True))


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))) * w


def causal_mask(pos: np.ndarray, N: int) -> np.ndarray:
    """[T, N] True where key n is later than query t's position (query t sees keys 0..pos[t])."""
    return np.arange(N)[None, :] > pos[:, None]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


class LatentCache:
    """Per layer, per token: the normalised latent c_kv [R] and the rotated shared k_pe [P]."""

    def __init__(self, n_layers: int, r: int, p: int, capacity: int = 256):
        self.len = 0
        self.kv = [np.zeros((capacity, r), np.float32) for _ in range(n_layers)]
        self.pe = [np.zeros((capacity, p), np.float32) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[0] if self.kv else 0

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for store in (self.kv, self.pe):
            for i, a in enumerate(store):
                grown = np.zeros((cap, a.shape[1]), np.float32)
                grown[: self.len] = a[: self.len]
                store[i] = grown

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv) + sum(a.nbytes for a in self.pe)


class Attention:
    """Multi-head latent attention; `naive` expands the latent, `absorb` folds kv_b into q and out."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, rope: Rope):
        p = f"model.layers.{i}.self_attn."
        self.cfg, self.rope, self.layer = cfg, rope, i
        D, H = cfg.hidden_size, cfg.num_attention_heads
        R, P, C, V = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = lazy_linear(ckpt, p + "q_a_proj", qcfg, (cfg.q_lora_rank, D))
            self.q_a_layernorm = vector(ckpt, p + "q_a_layernorm.weight", (cfg.q_lora_rank,))
            self.q_b_proj = lazy_linear(ckpt, p + "q_b_proj", qcfg, (H * (C + P), cfg.q_lora_rank))
        else:
            self.q_proj = lazy_linear(ckpt, p + "q_proj", qcfg, (H * (C + P), D))
        self.kv_a_proj_with_mqa = lazy_linear(ckpt, p + "kv_a_proj_with_mqa", qcfg, (R + P, D))
        self.kv_a_layernorm = vector(ckpt, p + "kv_a_layernorm.weight", (R,))
        self.kv_b_proj = lazy_linear(ckpt, p + "kv_b_proj", qcfg, (H * (C + V), R))
        self.o_proj = lazy_linear(ckpt, p + "o_proj", qcfg, (D, H * V))
        self.scale = np.float32(softmax_scale(cfg))

    def __call__(self, x: np.ndarray, cache: LatentCache, start: int, impl: str) -> np.ndarray:
        cfg = self.cfg
        T = x.shape[0]
        H, R, P, C, V = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                         cfg.qk_nope_head_dim, cfg.v_head_dim)
        eps = cfg.rms_norm_eps
        pos = np.arange(start, start + T)
        if cfg.q_lora_rank:
            q = linear(self.q_b_proj(), rms_norm(linear(self.q_a_proj(), x), self.q_a_layernorm(), eps))
        else:
            q = linear(self.q_proj(), x)
        q = q.reshape(T, H, C + P)                                   # [T, H, C+P]
        q_nope, q_pe = q[..., :C], self.rope.apply(q[..., C:], pos)
        ckv = linear(self.kv_a_proj_with_mqa(), x)                     # [T, R+P]
        cache.kv[self.layer][start:start + T] = rms_norm(ckv[:, :R], self.kv_a_layernorm(), eps)
        cache.pe[self.layer][start:start + T] = self.rope.apply(ckv[:, R:], pos)
        N = start + T
        kv, pe = cache.kv[self.layer][:N], cache.pe[self.layer][:N]  # [N, R], [N, P]
        if impl == "auto":       # naive (GEMMs) for prefill while its expanded latent stays small
            impl = "naive" if T > 1 and N * H * (C + V) * 4 <= NAIVE_MAX_BYTES else "absorb"
        if impl == "naive" and KERNELS:
            q[..., C:] = q_pe                                         # [T, H, C+P], rotated
            kvb = linear(self.kv_b_proj(), kv).reshape(N, H, C + V)    # [N, H, C+V]
            out = kernels.mla_prefill(q, kvb, pe, start, float(self.scale), C)   # [T, H, V]
        elif impl == "naive":
            kvb = linear(self.kv_b_proj(), kv).reshape(N, H, C + V)    # [N, H, C+V]
            k_nope = kvb[..., :C].transpose(1, 2, 0)                 # [H, C, N]
            v = kvb[..., C:].transpose(1, 0, 2)                      # [H, N, V]
            # the numpy reference: batched matmuls (BLAS)
            scores = (q_nope.transpose(1, 0, 2) @ k_nope
                      + q_pe.transpose(1, 0, 2) @ pe.T) * self.scale   # [H, T, N]
            scores[:, causal_mask(pos, N)] = -np.inf
            out = (softmax(scores) @ v).transpose(1, 0, 2)           # [T, H, V]
        elif impl == "absorb":
            kvb_w = self.kv_b_proj()
            if KERNELS and isinstance(kvb_w, PlainLinear) and kvb_w.weight.dtype == BF16:
                # per query: W_UK into the query, attention over the latent cache up to its own
                # position (causal), W_UV per head
                out = np.empty((T, H, V), np.float32)
                for t in range(T):
                    n = start + t + 1
                    q_lat = absorb_q(kvb_w.weight, q_nope[t], C, V)                # [H, R]
                    q_pe1 = np.ascontiguousarray(q_pe[t], dtype=np.float32)
                    o_lat = kernels.mla_decode_absorbed(q_lat, q_pe1, kv[:n], pe[:n], float(self.scale))
                    out[t] = absorb_out(kvb_w.weight, o_lat, C, V)                 # [H, V]
            else:
                w = kvb_w.dequantize().reshape(H, C + V, R)                        # [H, C+V, R] temporary
                q_lat = np.einsum("thc,hcr->thr", q_nope, w[:, :C])                # [T, H, R]
                scores = (np.einsum("thr,nr->htn", q_lat, kv)
                          + np.einsum("thp,np->htn", q_pe, pe)) * self.scale
                scores[:, causal_mask(pos, N)] = -np.inf
                o_lat = np.einsum("htn,nr->thr", softmax(scores), kv)              # [T, H, R]
                out = np.einsum("thr,hvr->thv", o_lat, w[:, C:])                   # [T, H, V]
        else:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        return linear(self.o_proj(), np.ascontiguousarray(out.reshape(T, H * V), dtype=np.float32))


class MLP:
    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, prefix: str, hidden: int, inter: int):
        self.stage = "shared_expert" if "shared_experts" in prefix else "dense_mlp"
        self.gate_proj = lazy_linear(ckpt, prefix + "gate_proj", qcfg, (inter, hidden))
        self.up_proj = lazy_linear(ckpt, prefix + "up_proj", qcfg, (inter, hidden))
        self.down_proj = lazy_linear(ckpt, prefix + "down_proj", qcfg, (hidden, inter))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with timer.stage(self.stage):
            return expert_mlp(self.gate_proj(), self.up_proj(), self.down_proj(), x)


def expert_mlp(gate: Linear, up: Linear, down: Linear, x: np.ndarray) -> np.ndarray:
    return linear(down, silu(linear(gate, x)) * linear(up, x))


def route(logits: np.ndarray, bias: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """noaux_tc routing. logits [T, E] -> (expert ids int64 [T, K], weights float32 [T, K])."""
    T, E = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits))                          # [T, E]
    choice = scores + bias                                          # bias only picks, never weighs
    if cfg.n_group > 1:
        grouped = choice.reshape(T, cfg.n_group, E // cfg.n_group)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)  # [T, G]: sum of top-2 per group
        keep = np.argsort(-group_scores, axis=-1, kind="stable")[:, : cfg.topk_group]
        group_mask = np.zeros((T, cfg.n_group), bool)
        np.put_along_axis(group_mask, keep, True, axis=-1)
        choice = np.where(np.repeat(group_mask, E // cfg.n_group, axis=-1), choice, -np.inf)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
    w = np.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + np.float32(1e-20))
    return idx, (w * np.float32(cfg.routed_scaling_factor)).astype(np.float32)


ExpertTriple = tuple[Linear, Linear, Linear]


class CheckpointExperts:
    """Routed experts read straight from the checkpoint (mmap); the expert store replaces this."""

    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, cfg: ModelConfig):
        self.ckpt, self.qcfg, self.cfg = ckpt, qcfg, cfg

    def get(self, layer: int, e: int) -> ExpertTriple:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        D, I = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        return (load_linear(self.ckpt, p + "gate_proj", self.qcfg, (I, D)),
                load_linear(self.ckpt, p + "up_proj", self.qcfg, (I, D)),
                load_linear(self.ckpt, p + "down_proj", self.qcfg, (D, I)))


class PrefetchGate:
    """Whether a MoE layer reads its guess of the next layer's experts ahead of time.

    The guess (the next layer's router on this layer's hidden state) is good on some models and
    near chance on others, and a wasted read costs disk time and a slot. So guesses are scored in
    the shadow: when the next layer routes, each guessed expert that was not resident at guess time
    counts as used or not. Reads are issued only while the share used over the last `window` scored
    guesses is at least `min_precision` (at 0.75, at most one wasted read per three used ones).
    While off, a guess is made (and scored) every `probe_every` steps only: it costs a router GEMV.
    """

    def __init__(self, min_precision: float = 0.75, window: int = 32, min_samples: int = 8,
                 probe_every: int = 4):
        self.min_precision, self.min_samples, self.probe_every = min_precision, min_samples, probe_every
        self.scores: deque[bool] = deque(maxlen=window)
        self.pending: list[int] | None = None
        self.steps = 0

    @property
    def precision(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None

    @property
    def active(self) -> bool:
        n = len(self.scores)
        return n >= self.min_samples and (n == 0 or sum(self.scores) >= self.min_precision * n)

    def wants_guess(self) -> bool:
        self.steps += 1
        return self.active or self.steps % self.probe_every == 0

    def guessed(self, missing: list[int]) -> None:
        self.pending = missing

    def observe(self, routed) -> None:
        """The experts the layer actually routes to (this step)."""
        if self.pending is not None:
            routed = set(int(e) for e in routed)
            self.scores.extend(e in routed for e in self.pending)
            self.pending = None


class MoE:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, experts):
        p = f"model.layers.{i}.mlp."
        D, E = cfg.hidden_size, cfg.n_routed_experts
        self.cfg, self.layer, self.experts = cfg, i, experts
        self.next_moe: MoE | None = None          # set when the store can prefetch
        self.prefetch_gate = PrefetchGate()       # scores the previous layer's guesses of ours
        self.recorder = None                      # a routing-trace recorder (offload.traces.TraceRecorder)
        ckpt.require(p + "gate.weight", shape=(E, D))
        self.gate = Lazy(lambda: PlainLinear(ckpt.read(p + "gate.weight")))              # [E, D], stored dtype
        self.bias = vector(ckpt, p + "gate.e_score_correction_bias", (E,))
        self.shared_experts = (MLP(ckpt, qcfg, p + "shared_experts.", D,
                                   cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        return linear(self.gate(), x)                                 # [T, E]

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return route(self.router_logits(x), self.bias(), self.cfg)

    def fetch(self, ids: np.ndarray):
        """(expert id, Linear triple) for each id; a store reads all of a layer's misses at once."""
        get_many = getattr(self.experts, "get_many", None)
        if get_many is not None:
            return get_many(self.layer, ids)
        return ((int(e), self.experts.get(self.layer, int(e))) for e in ids)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with timer.stage("router"):
            idx, w = self.route(x)                                    # [T, K]
            if self.recorder is not None:
                self.recorder.record(self.layer, idx)
            decode = x.shape[0] <= PREFETCH_MAX_TOKENS
            if decode:
                self.prefetch_gate.observe(np.unique(idx))
            nxt = self.next_moe
            if nxt is not None and decode and nxt.prefetch_gate.wants_guess():
                # the next layer's router on this hidden state guesses its experts: read the
                # missing ones while this layer computes, if such guesses have been paying
                missing = self.experts.missing(nxt.layer, np.unique(nxt.route(x)[0]).tolist())
                nxt.prefetch_gate.guessed(missing)
                if nxt.prefetch_gate.active:
                    self.experts.prefetch(nxt.layer, missing)
        # group tokens by expert so each expert's weights are touched once per call; experts
        # arrive in load order (hits first), results are summed in expert order so the output
        # is the same bits whatever the cache held
        parts = {}
        fetched = self.fetch(np.unique(idx))
        while True:
            with timer.stage("expert_fetch"):
                item = next(fetched, None)
            if item is None:
                break
            e, triple = item
            with timer.stage("experts"):
                rows, k = np.nonzero(idx == e)
                parts[e] = rows, w[rows, k, None] * expert_mlp(*triple, x[rows])
            del item, triple                                          # unpin the slot at once
        out = np.zeros_like(x)
        for e in sorted(parts):
            rows, y = parts[e]
            out[rows] += y
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return out


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, rope: Rope, experts):
        p = f"model.layers.{i}."
        D = cfg.hidden_size
        self.input_layernorm = vector(ckpt, p + "input_layernorm.weight", (D,))
        self.post_attention_layernorm = vector(ckpt, p + "post_attention_layernorm.weight", (D,))
        self.self_attn = Attention(cfg, ckpt, qcfg, i, rope)
        self.mlp = (MoE(cfg, ckpt, qcfg, i, experts) if cfg.is_moe_layer(i)
                    else MLP(ckpt, qcfg, p + "mlp.", D, cfg.intermediate_size))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: np.ndarray, cache: LatentCache, start: int, impl: str) -> np.ndarray:
        with timer.stage("attention"):
            h = x + self.self_attn(rms_norm(x, self.input_layernorm(), self.eps), cache, start, impl)
        return h + self.mlp(rms_norm(h, self.post_attention_layernorm(), self.eps))


def _im_end_id(folder: Path) -> int | None:
    """<|im_end|> from tokenizer_config.json if the folder has one (chat turns end there)."""
    try:
        tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for k, v in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and v.get("content") == "<|im_end|>":
                return int(k)
    except (OSError, ValueError):
        pass
    return None


class Model:
    def __init__(self, folder: Path, cfg: ModelConfig, ckpt: Checkpoint, attn_impl: str = "auto",
                 experts=None):
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.folder, self.cfg, self.ckpt, self.attn_impl = folder, cfg, ckpt, attn_impl
        self.qcfg = QuantConfig.from_config(cfg.raw, str(folder / "config.json"))
        self.experts = experts or CheckpointExperts(ckpt, self.qcfg, cfg)
        D, Vocab = cfg.hidden_size, cfg.vocab_size
        self.rope = Rope(cfg)
        ckpt.require("model.embed_tokens.weight", shape=(Vocab, D))
        self.layers = [DecoderLayer(cfg, ckpt, self.qcfg, i, self.rope, self.experts)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = vector(ckpt, "model.norm.weight", (D,))
        if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt:
            self.lm_head = lazy_linear(ckpt, "model.embed_tokens", self.qcfg, (Vocab, D))
        else:
            self.lm_head = lazy_linear(ckpt, "lm_head", self.qcfg, (Vocab, D))
        if callable(getattr(self.experts, "prefetch", None)):
            moes = [l.mlp for l in self.layers if isinstance(l.mlp, MoE)]
            for a, b in zip(moes, moes[1:]):
                a.next_moe = b
        im_end = _im_end_id(folder)
        self.end_ids = frozenset(cfg.eos_ids + ((im_end,) if im_end is not None else ()))
        self._check_experts()

    def _check_experts(self) -> None:
        """Every routed expert's tensors exist with the right shapes (headers only, no data)."""
        cfg, qcfg, ckpt = self.cfg, self.qcfg, self.ckpt
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        for i in range(cfg.num_hidden_layers):
            if not cfg.is_moe_layer(i):
                continue
            for e in range(cfg.n_routed_experts):
                p = f"model.layers.{i}.mlp.experts.{e}."
                for name, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                    linear_tensors(ckpt, p + name, qcfg, shape)

    def materialize(self) -> None:
        """Read every resident weight now (as loading a model in llama.cpp does), not on first use."""
        for layer in self.layers:
            for obj in (layer, layer.self_attn, layer.mlp, getattr(layer.mlp, "shared_experts", None)):
                for v in vars(obj).values() if obj is not None else ():
                    if isinstance(v, Lazy):
                        v()
        self.norm(), self.lm_head()

    def warmup(self) -> float:
        """Ready the numba kernels this checkpoint's formats use now (compile or cache load), not
        in the first request; seconds."""
        if not KERNELS:
            return 0.0
        quantized = {"compressed-tensors": "int4", "fp8": "fp8"}.get(self.qcfg.method)
        return kernels.warmup(("bf16",) + ((quantized,) if quantized else ()))

    def session(self) -> "Session":
        return Session(self)

    def forward(self, ids: np.ndarray, cache: LatentCache, start: int, logits: str = "last") -> np.ndarray | None:
        """ids [T] at positions start.. -> logits [T, vocab] ("all"), [1, vocab] ("last") or None ("none")."""
        with _FORWARD_LOCK:
            kernels.policy.before_forward()     # threads for this pass, on this thread (numba's is per thread)
            return self._forward(ids, cache, start, logits)

    def _forward(self, ids, cache, start, logits):
        x = as_f32(self.ckpt.read_rows("model.embed_tokens.weight", ids))              # [T, D]
        for layer in self.layers:
            x = layer(x, cache, start, self.attn_impl)
        if logits == "none":
            return None
        if logits == "last":
            x = x[-1:]
        with timer.stage("lm_head"):
            return linear(self.lm_head(), rms_norm(x, self.norm(), self.cfg.rms_norm_eps))

    def logits(self, token_ids) -> np.ndarray:
        return self.session().feed(token_ids, all_logits=True)

    def generate(self, token_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Iterator[int]:
        rng = np.random.default_rng(seed)
        s = self.session()
        logits = s.feed(token_ids)
        for _ in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            yield tok
            if tok in self.end_ids:
                return
            logits = s.feed([tok])


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    p = softmax(logits.astype(np.float64) / temperature)
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


class Session:
    """A conversation's latent KV cache; `feed` appends tokens, `truncate` keeps a prefix."""

    def __init__(self, model: Model, chunk: int = 512):
        cfg = model.cfg
        self.model, self.chunk = model, chunk
        self.cache = LatentCache(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def feed(self, token_ids, all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids, np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("feed() needs a non-empty 1-D sequence of token ids")
        vocab = self.model.cfg.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token id out of range 0..{vocab - 1}: {int(ids.min())}..{int(ids.max())}")
        self.cache.reserve(len(self.tokens) + ids.size)
        outs = []
        for c in range(0, ids.size, self.chunk):
            part = ids[c:c + self.chunk]
            last = c + self.chunk >= ids.size
            want = "all" if all_logits else ("last" if last else "none")
            out = self.model.forward(part, self.cache, len(self.tokens), want)
            if out is not None:
                outs.append(out)
            self.tokens.extend(int(t) for t in part)
            self.cache.len = len(self.tokens)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"truncate({n}): session holds {len(self.tokens)} tokens")
        del self.tokens[n:]
        self.cache.len = n


def load_model(path: str | Path, attn_impl: str = "auto", experts=None, expert_cache_bytes: int | None = None,
               expert_policy: str = "lru", direct_io: bool = False) -> Model:
    """Open a checkpoint folder by mmap; reads headers and config, no tensor data.

    With `expert_cache_bytes`, routed experts are served from a budgeted slot cache filled by
    preadv (offload.experts.ExpertStore); without it, straight from the mmap (the OS page cache).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    if experts is None and expert_cache_bytes is not None:
        from kimi_desktop.offload.experts import ExpertStore
        experts = ExpertStore.open(folder, budget_bytes=expert_cache_bytes, policy=expert_policy,
                                   direct_io=direct_io)
    return Model(folder, cfg, ckpt, attn_impl=attn_impl, experts=experts)
