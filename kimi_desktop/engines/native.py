"""The native engine: this project's runtime on a K2 checkpoint folder, behind the chat API.

One model session (latent KV cache) serves every request; a request reuses the longest common token
prefix with what the session holds (truncate, then prefill only the new tokens). One generation runs at
a time (FifoLock); each stream gets a worker thread that waits its turn, prefills, and decodes token
by token: sampler -> constraint (tool_choice / response_format) -> K2 output parser -> stop strings ->
events. Cancellation is checked before every forward pass, so at most the token in flight follows a
cancel. That request path and decode loop are shared with the llama.cpp engine (engines/common.py).
"""

from __future__ import annotations

from pathlib import Path

from .common import Emitter, LocalEngine, common_prefix

_Emitter = Emitter                  # the name this module used before the shared loop moved to .common

__all__ = ["NativeEngine", "common_prefix", "expert_cache_stats"]


class NativeEngine(LocalEngine):
    kind = "native"
    thread_name = "kimi-native-gen"

    def __init__(self, model_path: str | Path, ctx: int | None = None, *, model=None, tokenizer=None,
                 expert_cache_bytes: int | None = None, direct_io: bool = False):
        from kimi_desktop.runtime import load_model, load_tokenizer

        self.path = Path(model_path)
        self.model = model if model is not None else load_model(
            self.path, expert_cache_bytes=expert_cache_bytes, direct_io=direct_io)
        self.model.warmup()
        tok = tokenizer if tokenizer is not None else load_tokenizer(self.path)
        cfg = self.model.cfg
        max_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2):
            raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
        self._init_local(tok, self.model.session(), ctx or max_ctx or 4096, int(cfg.vocab_size),
                         end_ids=self.model.end_ids)

    def _engine_stats(self) -> dict:
        s = {"kv_cache_bytes": int(getattr(getattr(self.session, "cache", None), "nbytes", 0) or 0)}
        s.update(expert_cache_stats(self.model.experts))
        return s


def expert_cache_stats(experts) -> dict:
    """The UI's view of the routed-expert cache (zeros when experts come straight from the mmap)."""
    st = experts.stats() if callable(getattr(experts, "stats", None)) else {}
    return {
        "expert_cache_hits": st.get("hits", 0), "expert_cache_misses": st.get("misses", 0),
        "expert_cache_hit_rate": st.get("hit_rate"), "expert_cache_bytes": st.get("resident_bytes", 0),
        "expert_cache_budget": st.get("budget_bytes"), "disk_read_mb_s": (st["read_gbps"] * 1000
                                                                          if st.get("read_gbps") else None),
    }
