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
                 direct_io: bool | None = None, kv_ram_gb: float | None = None, kv_disk_gb: float = 8.0,
                 kv_dir: str | Path | None = None):
        """Routed experts: `expert_cache_bytes` (0: the page cache) as given; else `expert_cache`, a
        planner.ExpertCacheChoice made already (the CLI checks its flag that way); else
        planner.choose_expert_cache(expert_cache_gb): None = sized to this machine, 0 = the page
        cache, > 0 = a store of that many GiB (ValueError in the user's terms when it cannot be).
        KV: conversations' latent caches held in RAM within kv_ram_gb (None: twice the KV of a
        32K-token context, or of ctx if smaller) and saved to disk in kv_dir (default: the user cache
        folder's kv/) within kv_disk_gb (0: not saved)."""
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
        ctx = ctx or max_ctx or 4096
        pool = self._kv_pool(ctx, kv_ram_gb, kv_disk_gb, kv_dir)
        self._init_local(tok, pool.sessions[0], ctx, int(cfg.vocab_size), end_ids=self.model.end_ids, pool=pool)
        self._generation_defaults = read_generation_config(self.path)     # the checkpoint's recommendation

    def _kv_pool(self, ctx: int, kv_ram_gb: float | None, kv_disk_gb: float, kv_dir):
        from kimi_desktop.kv_store import KVStore, model_fingerprint

        from .kv_pool import SessionPool

        for name, v in (("kv_ram_gb", kv_ram_gb), ("kv_disk_gb", kv_disk_gb)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        probe = self.model.session()
        per_token = probe.cache.bytes_per_token
        ram = int(kv_ram_gb * 2**30) if kv_ram_gb is not None else 2 * per_token * min(ctx, 32768)
        store = None
        if kv_disk_gb:
            cfg = self.model.cfg
            layout = (cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, probe.cache.dtype_name)
            store = KVStore(model_fingerprint(self.path), layout, kv_dir, budget_bytes=int(kv_disk_gb * 2**30))
        return SessionPool(self.model.session, ram, store)

    def _engine_stats(self) -> dict:
        pool, cache = self.pool, getattr(self.session, "cache", None)
        ram = pool.ram_bytes if pool is not None else int(getattr(cache, "nbytes", 0) or 0)
        s = {"kv_cache_bytes": ram, "kv_ram_bytes": ram, "kv_sessions": len(pool.sessions) if pool is not None else 1,
             "kv_ram_budget": pool.budget if pool is not None else None,
             "kv_disk_bytes": pool.store.disk_bytes if pool is not None and pool.store is not None else 0,
             "kv_bytes_per_token": getattr(cache, "bytes_per_token", None)}
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
