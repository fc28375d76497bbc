"""The forward pass's two dispatch points: `linear()` for weight products, `attend()` for MLA's core.

Each has plain-numpy reference forms and numba fast paths, and chooses between them here only, from
the model's `Options` (no module-level switches). References: DeepSeek-V3 inference/model.py
(`linear()`, attn_impl "naive" | "absorb") and HF transformers' DeepseekV3Attention.

Shapes: T = tokens in this call, N = tokens in the cache (incl. these), H = heads,
R = kv_lora_rank, P = qk_rope_head_dim, C = qk_nope_head_dim, V = v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from kimi_desktop.offload.formats import Fp8BlockLinear, Int4Linear, Linear, PlainLinear

from .kernels import (absorb_out, absorb_q, bf16_gemm, bf16_gemv, fp8_gemm, fp8_gemv, int4_gemm, int4_gemv,
                      mla_absorbed_chunk, mla_decode_absorbed, mla_prefill)
from .session import as_f32

BF16 = np.dtype(ml_dtypes.bfloat16)
ATTN_IMPLS = ("auto", "naive", "absorb")
# "auto" attention: the naive form (GEMMs, fastest for prompts) expands the latent cache into
# per-head keys and values, N x H x (C+V) float32 (K2: 64 KiB per cached token, 1.3 GB at 20K);
# beyond this, prefill chunks use the absorbed form, which reads the latent cache as it is
NAIVE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class Options:
    """How the forward pass computes (never what): every choice gives the same function.

    kernels: numba kernels for the stored formats (False: the numpy reference products only,
        kept for tests and debugging); attn_impl: "auto" | "naive" | "absorb";
    naive_max_bytes: the largest expanded latent (N x H x (C+V) float32) "auto" lets prefill build.
    """
    kernels: bool = True
    attn_impl: str = "auto"
    naive_max_bytes: int = NAIVE_MAX_BYTES

    def __post_init__(self):
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not isinstance(self.naive_max_bytes, int) or self.naive_max_bytes < 0:
            raise ValueError(f"naive_max_bytes must be a non-negative integer, got {self.naive_max_bytes!r}")


def linear(w: Linear, x: np.ndarray, kernels: bool = True) -> np.ndarray:
    """x [T, in] float32 -> [T, out] float32: the single dispatch point for weight products.

    Stored formats go to the numba kernels (dequantized on the fly, never a float copy of the
    matrix); anything else, or kernels=False, to the numpy path of the weight class.
    """
    if not kernels:
        return w.matmul(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    one = x.shape[0] == 1
    if isinstance(w, Int4Linear) and w.group == 32:
        return int4_gemv(w.packed, w.scale, x[0])[None] if one else int4_gemm(w.packed, w.scale, x)
    if isinstance(w, PlainLinear) and w.weight.dtype == BF16:
        return bf16_gemv(w.weight, x[0])[None] if one else bf16_gemm(w.weight, x)
    if isinstance(w, Fp8BlockLinear):
        if one:
            return fp8_gemv(w.weight, w.scale_inv, x[0], block=w.block)[None]
        return fp8_gemm(w.weight, w.scale_inv, x, block=w.block)
    return w.matmul(x)


def causal_mask(pos: np.ndarray, N: int) -> np.ndarray:
    """[T, N] True where key n is later than query t's position (query t sees keys 0..pos[t])."""
    return np.arange(N)[None, :] > pos[:, None]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention_form(opts: Options, T: int, N: int, H: int, C: int, V: int, kv_b: Linear) -> str:
    """Which form computes one call's attention: "naive_kernel" | "naive_ref" | "absorb_kernel" |
    "absorb_ref". T queries over N cached keys; kv_b [H*(C+V), R] as stored."""
    impl = opts.attn_impl
    if impl == "auto":       # naive (GEMMs) for prefill while its expanded latent stays small
        impl = "naive" if T > 1 and N * H * (C + V) * 4 <= opts.naive_max_bytes else "absorb"
    if impl == "naive":
        return "naive_kernel" if opts.kernels else "naive_ref"
    # the absorbed kernels read kv_b's bf16 rows in place; other formats dequantize it (a temporary)
    bf16 = isinstance(kv_b, PlainLinear) and kv_b.weight.dtype == BF16
    return "absorb_kernel" if opts.kernels and bf16 else "absorb_ref"


def attend(q: np.ndarray, kv: np.ndarray, pe: np.ndarray, kv_b: Linear, start: int, scale: np.float32,
           opts: Options) -> np.ndarray:
    """Causal MLA over the latent cache: q [T, H, C+P] (q_nope | rotated q_pe), at positions
    start..start+T-1, kv [N, R] (normalised c_kv), pe [N, P] (rotated k_pe), N = start + T, in the
    cache's storage (float32, or uint16 bf16 bits) -> out [T, H, V] float32 (before o_proj)."""
    T, H = q.shape[:2]
    N, P = pe.shape
    C = q.shape[2] - P
    V = kv_b.shape[0] // H - C
    form = attention_form(opts, T, N, H, C, V, kv_b)
    if form == "naive_kernel":
        kvb = linear(kv_b, as_f32(kv), opts.kernels).reshape(N, H, C + V)      # [N, H, C+V]
        return mla_prefill(q, kvb, as_f32(pe), start, float(scale), C)        # [T, H, V]
    q_nope, q_pe = q[..., :C], np.ascontiguousarray(q[..., C:])          # [T, H, C], [T, H, P]
    if form == "naive_ref":
        return naive_attention_ref(q_nope, q_pe, linear(kv_b, as_f32(kv), opts.kernels).reshape(N, H, C + V),
                                   as_f32(pe), start, scale)
    if form == "absorb_kernel":
        # W_UK into the queries, one causal pass over the latent cache for the whole chunk (each
        # query up to its own position), W_UV per head
        q_lat = np.stack([absorb_q(kv_b.weight, q_nope[t], C, V) for t in range(T)])      # [T, H, R]
        if T == 1:
            o_lat = mla_decode_absorbed(q_lat[0], q_pe[0], kv, pe, float(scale))[None]   # [1, H, R]
        else:
            o_lat = mla_absorbed_chunk(q_lat, q_pe, kv, pe, start, float(scale))         # [T, H, R]
        return np.stack([absorb_out(kv_b.weight, o_lat[t], C, V) for t in range(T)])     # [T, H, V]
    return absorbed_attention_ref(q_nope, q_pe, as_f32(kv), as_f32(pe), kv_b.dequantize().reshape(H, C + V, -1),
                                  start, scale)


def naive_attention_ref(q_nope, q_pe, kvb, pe, start, scale) -> np.ndarray:
    """The numpy reference of the naive form: the latent expanded by kv_b, batched matmuls (BLAS).
    q_nope [T, H, C], q_pe [T, H, P], kvb [N, H, C+V] (k_nope | v), pe [N, P] -> [T, H, V]."""
    T, C, N = q_nope.shape[0], q_nope.shape[2], kvb.shape[0]
    pos = np.arange(start, start + T)
    k_nope = kvb[..., :C].transpose(1, 2, 0)                                 # [H, C, N]
    v = kvb[..., C:].transpose(1, 0, 2)                                      # [H, N, V]
    scores = (q_nope.transpose(1, 0, 2) @ k_nope
              + q_pe.transpose(1, 0, 2) @ pe.T) * scale                      # [H, T, N]
    scores[:, causal_mask(pos, N)] = -np.inf
    return (softmax(scores) @ v).transpose(1, 0, 2)                          # [T, H, V]


def absorbed_attention_ref(q_nope, q_pe, kv, pe, w, start, scale) -> np.ndarray:
    """The numpy reference of the absorbed form: attention in latent space, kv_b folded into the
    query (W_UK) and the output (W_UV). q_nope [T, H, C], q_pe [T, H, P], kv [N, R], pe [N, P],
    w [H, C+V, R] float32 (kv_b dequantized, a temporary) -> [T, H, V]."""
    T, C, N = q_nope.shape[0], q_nope.shape[2], kv.shape[0]
    pos = np.arange(start, start + T)
    q_lat = np.einsum("thc,hcr->thr", q_nope, w[:, :C])                      # [T, H, R]
    scores = (np.einsum("thr,nr->htn", q_lat, kv)
              + np.einsum("thp,np->htn", q_pe, pe)) * scale                  # [H, T, N]
    scores[:, causal_mask(pos, N)] = -np.inf
    o_lat = np.einsum("htn,nr->thr", softmax(scores), kv)                    # [T, H, R]
    return np.einsum("thr,hvr->thv", o_lat, w[:, C:])                        # [T, H, V]
