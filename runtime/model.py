"""Kimi K2 / DeepSeek-V3 forward pass in numpy, over weights that stay in their stored format.

The architecture only, in forward order: attention (MLA), MLP, routing, MoE, decoder layer, model.
Weight products go through `dispatch.linear()` and MLA's core through `dispatch.attend()`, which
choose between the numba kernels and the numpy references from the model's `Options` (both tested
against transformers). Loading lives in loading.py, the KV cache and sessions in session.py.
References: DeepSeek-V3 inference/model.py and HF transformers' modeling_deepseek_v3.py.

Shapes: T = tokens in this call, N = tokens in the cache (incl. these), D = hidden_size,
H = heads, R = kv_lora_rank, P = qk_rope_head_dim, C = qk_nope_head_dim, V = v_head_dim,
E = routed experts, K = experts per token.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import numpy as np

from kimi_desktop.offload.formats import Linear, PlainLinear, QuantConfig
from kimi_desktop.offload.safetensors import Checkpoint

from . import kernels
from .config import ModelConfig
from .dispatch import Options, attend, linear
from .generate import generate_step
from .prefetch import PrefetchGate
from .profile import StageTimer
from .rope import Rope, softmax_scale
from .sampling import Sampler, SamplerConfig
from .session import LatentCache, Session
from .weights import CheckpointExperts, Lazy, as_f32, lazy_linear, vector

# The kernels release the GIL (so the expert store's reader threads run during compute); numba's
# workqueue threading layer, its fallback where neither OpenMP nor TBB loads, aborts the process on
# parallel launches from two threads at once. Forward passes of all models in a process take turns.
_FORWARD_LOCK = threading.Lock()
PREFETCH_MAX_TOKENS = 4         # decode-sized calls; prefill reads every expert of a layer anyway


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


class Attention:
    """Multi-head latent attention: projections here, the attention core in dispatch.attend()."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, rope: Rope, opts: Options):
        p = f"model.layers.{i}.self_attn."
        self.cfg, self.rope, self.layer, self.opts = cfg, rope, i, opts
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

    def __call__(self, x: np.ndarray, cache: LatentCache, start: int) -> np.ndarray:
        cfg, k = self.cfg, self.opts.kernels
        T = x.shape[0]
        H, R, C, V = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        eps = cfg.rms_norm_eps
        pos = np.arange(start, start + T)
        if cfg.q_lora_rank:
            q = linear(self.q_b_proj(), rms_norm(linear(self.q_a_proj(), x, k), self.q_a_layernorm(), eps), k)
        else:
            q = linear(self.q_proj(), x, k)
        q = q.reshape(T, H, C + cfg.qk_rope_head_dim)                 # [T, H, C+P]
        q[..., C:] = self.rope.apply(q[..., C:], pos)                 # q_pe rotated in place
        ckv = linear(self.kv_a_proj_with_mqa(), x, k)                  # [T, R+P]
        cache.write(self.layer, start, rms_norm(ckv[:, :R], self.kv_a_layernorm(), eps),
                    self.rope.apply(ckv[:, R:], pos))                 # rounded to the storage dtype
        N = start + T
        kv, pe = cache.kv[self.layer][:N], cache.pe[self.layer][:N]  # [N, R], [N, P], storage dtype
        out = attend(q, kv, pe, self.kv_b_proj(), start, self.scale, self.opts)   # [T, H, V]
        return linear(self.o_proj(), np.ascontiguousarray(out.reshape(T, H * V), dtype=np.float32), k)


class MLP:
    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, prefix: str, hidden: int, inter: int,
                 opts: Options, timer: StageTimer):
        self.stage = "shared_expert" if "shared_experts" in prefix else "dense_mlp"
        self.kernels, self.timer = opts.kernels, timer
        self.gate_proj = lazy_linear(ckpt, prefix + "gate_proj", qcfg, (inter, hidden))
        self.up_proj = lazy_linear(ckpt, prefix + "up_proj", qcfg, (inter, hidden))
        self.down_proj = lazy_linear(ckpt, prefix + "down_proj", qcfg, (hidden, inter))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.timer.stage(self.stage):
            return expert_mlp(self.gate_proj(), self.up_proj(), self.down_proj(), x, self.kernels)


def expert_mlp(gate: Linear, up: Linear, down: Linear, x: np.ndarray, kernels: bool = True) -> np.ndarray:
    return linear(down, silu(linear(gate, x, kernels)) * linear(up, x, kernels), kernels)


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


class MoE:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, experts,
                 opts: Options, timer: StageTimer, recorder=None):
        p = f"model.layers.{i}.mlp."
        D, E = cfg.hidden_size, cfg.n_routed_experts
        self.cfg, self.layer, self.experts = cfg, i, experts
        self.kernels, self.timer = opts.kernels, timer
        self.next_moe: MoE | None = None          # set when the store can prefetch
        self.prefetch_gate = PrefetchGate()       # scores the previous layer's guesses of ours
        self.recorder = recorder                  # a routing-trace recorder (offload.traces.TraceRecorder)
        ckpt.require(p + "gate.weight", shape=(E, D))
        self.gate = Lazy(lambda: PlainLinear(ckpt.read(p + "gate.weight")))              # [E, D], stored dtype
        self.bias = vector(ckpt, p + "gate.e_score_correction_bias", (E,))
        self.shared_experts = (MLP(ckpt, qcfg, p + "shared_experts.", D,
                                   cfg.moe_intermediate_size * cfg.n_shared_experts, opts, timer)
                               if cfg.n_shared_experts else None)

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        return linear(self.gate(), x, self.kernels)                   # [T, E]

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return route(self.router_logits(x), self.bias(), self.cfg)

    def fetch(self, ids: np.ndarray):
        """(expert id, Linear triple) for each id; a store reads all of a layer's misses at once."""
        get_many = getattr(self.experts, "get_many", None)
        if get_many is not None:
            return get_many(self.layer, ids)
        return ((int(e), self.experts.get(self.layer, int(e))) for e in ids)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.timer.stage("router"):
            idx, w = self.route(x)                                    # [T, K]
            if self.recorder is not None:
                self.recorder.record(self.layer, idx)
            if x.shape[0] <= PREFETCH_MAX_TOKENS:
                self.prefetch_next(x, idx)
        # group tokens by expert so each expert's weights are touched once per call; experts
        # arrive in load order (hits first), results are summed in expert order so the output
        # is the same bits whatever the cache held
        parts = {}
        fetched = self.fetch(np.unique(idx))
        while True:
            with self.timer.stage("expert_fetch"):
                item = next(fetched, None)
            if item is None:
                break
            e, triple = item
            with self.timer.stage("experts"):
                rows, k = np.nonzero(idx == e)
                parts[e] = rows, w[rows, k, None] * expert_mlp(*triple, x[rows], self.kernels)
            del item, triple                                          # unpin the slot at once
        out = np.zeros_like(x)
        for e in sorted(parts):
            rows, y = parts[e]
            out[rows] += y
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return out

    def prefetch_next(self, x: np.ndarray, idx: np.ndarray) -> None:
        """Decode: score the previous layer's guess of ours (idx [T, K]); guess the next layer's."""
        self.prefetch_gate.observe(np.unique(idx))
        nxt = self.next_moe
        if nxt is not None and nxt.prefetch_gate.wants_guess():
            # the next layer's router on this hidden state guesses its experts: read the
            # missing ones while this layer computes, if such guesses have been paying
            missing = self.experts.missing(nxt.layer, np.unique(nxt.route(x)[0]).tolist())
            nxt.prefetch_gate.guessed(missing)
            if nxt.prefetch_gate.active:
                self.experts.prefetch(nxt.layer, missing)


class DecoderLayer:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, i: int, rope: Rope, experts,
                 opts: Options, timer: StageTimer, recorder=None):
        p = f"model.layers.{i}."
        D = cfg.hidden_size
        self.timer = timer
        self.input_layernorm = vector(ckpt, p + "input_layernorm.weight", (D,))
        self.post_attention_layernorm = vector(ckpt, p + "post_attention_layernorm.weight", (D,))
        self.self_attn = Attention(cfg, ckpt, qcfg, i, rope, opts)
        self.mlp = (MoE(cfg, ckpt, qcfg, i, experts, opts, timer, recorder) if cfg.is_moe_layer(i)
                    else MLP(ckpt, qcfg, p + "mlp.", D, cfg.intermediate_size, opts, timer))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: np.ndarray, cache: LatentCache, start: int) -> np.ndarray:
        with self.timer.stage("attention"):
            h = x + self.self_attn(rms_norm(x, self.input_layernorm(), self.eps), cache, start)
        return h + self.mlp(rms_norm(h, self.post_attention_layernorm(), self.eps))


class Model:
    """The network over one opened checkpoint; build it with loading.load_model.

    experts: the routed-expert provider (get(layer, e) -> (gate, up, down); a store adds get_many,
    missing, prefetch); timer: a StageTimer to time the stages (default: off); recorder: a
    routing-trace recorder that every MoE layer tells its choices (offload.traces.TraceRecorder).
    """

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig, experts=None,
                 options: Options | None = None, timer: StageTimer | None = None, recorder=None,
                 end_ids=()):
        self.cfg, self.ckpt, self.qcfg = cfg, ckpt, qcfg
        self.options = options = options if options is not None else Options()
        self.timer = timer if timer is not None else StageTimer(enabled=False)
        self.experts = experts or CheckpointExperts(ckpt, qcfg, cfg)
        self.end_ids = frozenset(end_ids)
        D, Vocab = cfg.hidden_size, cfg.vocab_size
        self.rope = Rope(cfg)
        ckpt.require("model.embed_tokens.weight", shape=(Vocab, D))
        self.layers = [DecoderLayer(cfg, ckpt, qcfg, i, self.rope, self.experts, options, self.timer, recorder)
                       for i in range(cfg.num_hidden_layers)]
        self.norm = vector(ckpt, "model.norm.weight", (D,))
        if cfg.tie_word_embeddings and "lm_head.weight" not in ckpt:
            self.lm_head = lazy_linear(ckpt, "model.embed_tokens", qcfg, (Vocab, D))
        else:
            self.lm_head = lazy_linear(ckpt, "lm_head", qcfg, (Vocab, D))
        if callable(getattr(self.experts, "prefetch", None)):
            moes = [l.mlp for l in self.layers if isinstance(l.mlp, MoE)]
            for a, b in zip(moes, moes[1:]):
                a.next_moe = b

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
        if not self.options.kernels:
            return 0.0
        quantized = {"compressed-tensors": "int4", "fp8": "fp8"}.get(self.qcfg.method)
        return kernels.warmup(("bf16",) + ((quantized,) if quantized else ()))

    kv_dtype = "bf16"           # the latent cache's storage in new sessions (load_model's kv_dtype)

    def session(self, kv_dtype: str | None = None) -> Session:
        return Session(self, kv_dtype=kv_dtype)

    def forward(self, ids: np.ndarray, cache: LatentCache, start: int, logits: str = "last") -> np.ndarray | None:
        """ids [T] at positions start.. -> logits [T, vocab] ("all"), [1, vocab] ("last") or None ("none")."""
        with _FORWARD_LOCK:
            kernels.policy.before_forward()     # threads for this pass, on this thread (numba's is per thread)
            return self._forward(ids, cache, start, logits)

    def _forward(self, ids, cache, start, logits):
        x = as_f32(self.ckpt.read_rows("model.embed_tokens.weight", ids))              # [T, D]
        for layer in self.layers:
            x = layer(x, cache, start)
        if logits == "none":
            return None
        if logits == "last":
            x = x[-1:]
        with self.timer.stage("lm_head"):
            return linear(self.lm_head(), rms_norm(x, self.norm(), self.cfg.rms_norm_eps), self.options.kernels)

    def logits(self, token_ids) -> np.ndarray:
        return self.session().feed(token_ids, all_logits=True)

    def generate(self, token_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Iterator[int]:
        """New token ids, up to max_new_tokens or through the first end id (runtime/generate.py)."""
        sampler = Sampler(SamplerConfig(temperature=temperature, top_p=top_p, seed=seed))
        steps = generate_step(self.session(), list(token_ids), sampler)
        for draw in itertools.islice(steps, max_new_tokens):
            yield draw.token
            if draw.token in self.end_ids:
                return
