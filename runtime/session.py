"""A conversation's state: the MLA latent KV cache and the session that feeds tokens through it.

Shapes: R = kv_lora_rank, P = qk_rope_head_dim; per layer the cache holds [capacity, R] and
[capacity, P] rows, of which the first `len` are filled. Storage is bf16 by default (np.uint16 arrays
of bf16 bits, what the attention kernels read; half of float32: K2 keeps 61 x 576 x 2 = 70 KB per
token) or float32, the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from .model import Model

KV_DTYPES = {"bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32)}
# prefill chunk: the largest chunk whose per-chunk activations stay near this many bytes (MoE and
# attention temporaries scale with tokens x hidden); at least 16 tokens, at most 512
CHUNK_BYTES = 64 << 20


class PrefillCancelled(Exception):
    """A prefill stopped between chunks because the caller asked; the session holds the chunks done."""


def to_storage(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 rows -> the cache's storage: bf16 bits (round to nearest even) or float32."""
    if dtype == np.float32:
        return x.astype(np.float32, copy=False)
    return x.astype(ml_dtypes.bfloat16).view(np.uint16)


def as_f32(rows: np.ndarray) -> np.ndarray:
    """Cache rows in either storage -> float32 (a copy for bf16, the rows themselves for float32)."""
    if rows.dtype == np.uint16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows


class LatentCache:
    """Per layer, per token: the normalised latent c_kv [R] and the rotated shared k_pe [P]."""

    def __init__(self, n_layers: int, r: int, p: int, capacity: int = 256, dtype: str = "bf16"):
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv dtype must be one of {tuple(KV_DTYPES)}, got {dtype!r}")
        self.len, self.dtype_name = 0, dtype
        self.dtype = KV_DTYPES[dtype]
        self.kv = [np.zeros((capacity, r), self.dtype) for _ in range(n_layers)]
        self.pe = [np.zeros((capacity, p), self.dtype) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[0] if self.kv else 0

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for store in (self.kv, self.pe):
            for i, a in enumerate(store):
                grown = np.zeros((cap, a.shape[1]), self.dtype)
                grown[: self.len] = a[: self.len]
                store[i] = grown

    def write(self, layer: int, start: int, kv: np.ndarray, pe: np.ndarray) -> None:
        """Rows start.. of one layer from float32 kv [T, R] and pe [T, P] (rounded to the storage)."""
        self.kv[layer][start:start + kv.shape[0]] = to_storage(kv, self.dtype)
        self.pe[layer][start:start + pe.shape[0]] = to_storage(pe, self.dtype)

    @property
    def bytes_per_token(self) -> int:
        return sum(a.shape[1] for a in self.kv + self.pe) * self.dtype.itemsize

    @property
    def used_bytes(self) -> int:
        return self.len * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv) + sum(a.nbytes for a in self.pe)


def default_chunk(cfg) -> int:
    """Prefill chunk size by memory: per token the forward holds a few hidden-, expert- and
    head-wide float32 rows (D, top_k x moe_inter, H x (C+P)); 16..512 tokens."""
    per_token = 4 * (8 * cfg.hidden_size + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size
                     + 4 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim))
    return int(min(512, max(16, CHUNK_BYTES // max(per_token, 1) // 16 * 16)))


class Session:
    """A conversation's latent KV cache; `feed` appends tokens, `truncate` keeps a prefix."""

    def __init__(self, model: Model, chunk: int | None = None, kv_dtype: str | None = None):
        cfg = model.cfg
        self.model = model
        self.chunk = int(chunk) if chunk else default_chunk(cfg)
        self.cache = LatentCache(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                 dtype=kv_dtype or getattr(model, "kv_dtype", "bf16"))
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def feed(self, token_ids, all_logits: bool = False, progress=None, cancelled=None) -> np.ndarray:
        """Append tokens (prefill in chunks of `chunk`) -> float32 logits of the last position
        [vocab], or of every fed position [n, vocab] with all_logits.

        progress(done, total) is called after each chunk; cancelled() before each chunk (the first
        too), and True raises PrefillCancelled (the session then holds the chunks done)."""
        ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids, np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("feed() needs a non-empty 1-D sequence of token ids")
        vocab = self.model.cfg.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token id out of range 0..{vocab - 1}: {int(ids.min())}..{int(ids.max())}")
        limit = self.model.cfg.context_limit
        if limit and len(self.tokens) + ids.size > limit:
            raise ValueError(f"context limit: {len(self.tokens)} + {ids.size} tokens exceed the model's "
                             f"{limit} (max_position_embeddings)")
        self.cache.reserve(len(self.tokens) + ids.size)
        outs = []
        for c in range(0, ids.size, self.chunk):
            if cancelled is not None and cancelled():
                raise PrefillCancelled(f"prefill cancelled after {c} of {ids.size} tokens")
            part = ids[c:c + self.chunk]
            last = c + self.chunk >= ids.size
            want = "all" if all_logits else ("last" if last else "none")
            out = self.model.forward(part, self.cache, len(self.tokens), want)
            if out is not None:
                outs.append(out)
            self.tokens.extend(int(t) for t in part)
            self.cache.len = len(self.tokens)
            if progress is not None:
                progress(c + part.size, ids.size)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"truncate({n}): session holds {len(self.tokens)} tokens")
        del self.tokens[n:]
        self.cache.len = n

    # -- moving a cache between sessions, and to disk --------------------------------------------
    def state(self) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
        """(tokens, kv per layer [n, R], pe per layer [n, P]): views of the filled rows, storage dtype."""
        n = len(self.tokens)
        return list(self.tokens), [a[:n] for a in self.cache.kv], [a[:n] for a in self.cache.pe]

    def restore(self, tokens, kv, pe) -> None:
        """Replace the contents with a state() of a session of the same model and storage."""
        c, n = self.cache, len(tokens)
        if len(kv) != len(c.kv) or len(pe) != len(c.pe):
            raise ValueError(f"restore: {len(kv)} / {len(pe)} layers given, the model has {len(c.kv)}")
        for name, given, like in (("kv", kv, c.kv), ("pe", pe, c.pe)):
            for l, (a, b) in enumerate(zip(given, like)):
                if a.dtype != c.dtype or a.shape != (n, b.shape[1]):
                    raise ValueError(f"restore: {name}[{l}] is {a.dtype} {a.shape}, expected {c.dtype} "
                                     f"({n}, {b.shape[1]})")
        c.reserve(n)
        for store, given in ((c.kv, kv), (c.pe, pe)):
            for l, a in enumerate(given):
                store[l][:n] = a
        self.tokens = [int(t) for t in tokens]
        c.len = n

    def fork(self, n: int) -> Session:
        """A new session holding a copy of this one's first n tokens."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"fork({n}): session holds {len(self.tokens)} tokens")
        other = Session(self.model, self.chunk, self.cache.dtype_name)
        tokens, kv, pe = self.state()
        other.restore(tokens[:n], [a[:n] for a in kv], [a[:n] for a in pe])
        return other

