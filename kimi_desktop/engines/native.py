"""The native engine: this project's runtime on a K2 checkpoint folder, behind the chat API.

One model session (latent KV cache) serves every request; a request reuses the longest common token
prefix with what the session holds (truncate, then prefill only the new tokens). One generation runs at
a time (FifoLock); each stream gets a worker thread that waits its turn, prefills, and decodes token
by token: sampler -> constraint (tool_choice / response_format) -> K2 output parser -> stop strings ->
events. Cancellation is checked before every forward pass, so at most the token in flight follows a
cancel. That request path and decode loop are shared with the llama.cpp engine (engines/common.py,
engines/generation.py, runtime/generate.py).
"""

from __future__ import annotations

from pathlib import Path

from kimi_desktop.notices import log, warm_up

from .common import LocalEngine, read_generation_config

__all__ = ["NativeEngine", "expert_cache_stats"]


class NativeEngine(LocalEngine):
    kind = "native"
    thread_name = "kimi-native-gen"

    def __init__(self, model_path: str | Path, ctx: int | None = None, *, model=None, tokenizer=None,
                 expert_cache_gb: float | None = None, expert_cache=None, expert_cache_bytes: int | None = None,
                 direct_io: bool | None = None):
        """Routed experts: `expert_cache_bytes` (0: the page cache) as given; else `expert_cache`, a
        planner.ExpertCacheChoice made already (the CLI checks its flag that way); else
        planner.choose_expert_cache(expert_cache_gb): None = sized to this machine, 0 = the page
        cache, > 0 = a store of that many GiB (ValueError in the user's terms when it cannot be)."""
        from kimi_desktop.runtime import load_model, load_tokenizer

        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2):
            raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
        self.path = Path(model_path)
        self.expert_cache_choice = None
        if model is None:
            if expert_cache_bytes is None:
                from kimi_desktop.planner import choose_expert_cache
                c = expert_cache or choose_expert_cache(self.path, expert_cache_gb, ctx=ctx)
                self.expert_cache_choice = c
                log.info(c.line())
                expert_cache_bytes, direct_io = c.budget_bytes, c.direct_io if direct_io is None else direct_io
            model = load_model(self.path, expert_cache_bytes=expert_cache_bytes or None,
                               direct_io=bool(direct_io))
        self.model = model
        warm_up(self.model)
        tok = tokenizer if tokenizer is not None else load_tokenizer(self.path)
        cfg = self.model.cfg
        max_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self._init_local(tok, self.model.session(), ctx or max_ctx or 4096, int(cfg.vocab_size),
                         end_ids=self.model.end_ids)
        self._generation_defaults = read_generation_config(self.path)     # the checkpoint's recommendation

    def _engine_stats(self) -> dict:
        s = {"kv_cache_bytes": int(getattr(getattr(self.session, "cache", None), "nbytes", 0) or 0)}
        s.update(expert_cache_stats(self.model.experts))
        c = self.expert_cache_choice
        s.update(c.as_stats() if c is not None else
                 {"expert_cache_mode": "expert store" if s["expert_cache_budget"] else "page cache",
                  "expert_cache_auto": False, "expert_cache_direct_io": None,
                  "expert_cache_reason": "given by the caller"})
        return s


def expert_cache_stats(experts) -> dict:
    """The UI's view of the routed-expert cache (zeros when experts come straight from the mmap)."""
    st = experts.stats() if callable(getattr(experts, "stats", None)) else {}
    return {
        "expert_cache_hits": st.get("hits", 0), "expert_cache_misses": st.get("misses", 0),
        "expert_cache_hit_rate": st.get("hit_rate"), "expert_cache_bytes": st.get("resident_bytes", 0),
        "expert_cache_budget": st.get("budget_bytes"),
        "disk_read_bytes": st.get("bytes_read_demand", 0) + st.get("bytes_read_prefetch", 0),
        "disk_read_mb_s": st["read_gbps"] * 1000 if st.get("read_gbps") else None,
    }
