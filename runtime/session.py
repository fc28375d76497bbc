"""A conversation's state: the MLA latent KV cache and the session that feeds tokens through it.

Shapes: R = kv_lora_rank, P = qk_rope_head_dim; per layer the cache holds [capacity, R] and
[capacity, P] float32, of which the first `len` rows are filled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import Model


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
        """Append tokens (prefill in chunks of `chunk`) -> float32 logits of the last position
        [vocab], or of every fed position [n, vocab] with all_logits."""
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
