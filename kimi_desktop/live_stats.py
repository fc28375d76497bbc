"""The status row's figures, from engine.stats() and psutil; Qt-free (the app polls it on a timer).

    live = LiveStats()
    live.token()                          # the answer being streamed produced a token
    snap = live.sample(engine)            # dict: tok_s, ttft_s, hit_rate, disk_mb_s, ram_bytes,
                                          # context_used, context_size, generating, model, engine
Rates are over the interval since the previous sample: tokens/s is live while an answer streams
(the engine's own decode_tok_s only changes when a generation ends), the hit rate is that interval's
expert-cache hits / lookups, disk MB/s is what this process read from storage (psutil io_counters;
the engine's expert-store figure when psutil cannot tell).
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["LiveStats"]


class LiveStats:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._proc = None
        try:
            import psutil
            self._proc = psutil.Process(os.getpid())
        except Exception:                           # pragma: no cover - psutil missing
            pass
        self._last_t = clock()
        self._tokens = 0
        self._last_tokens = 0
        self._last_hits = self._last_misses = None
        self._last_read = self._read_bytes()
        self.generating = False
        self.started_at: float | None = None
        self.first_token_at: float | None = None

    def begin(self) -> None:
        self.generating = True
        self.started_at = self.clock()
        self.first_token_at = None

    def token(self, n: int = 1) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.clock()
        self._tokens += n

    def end(self) -> None:
        self.generating = False

    def _read_bytes(self) -> int | None:
        if self._proc is None:
            return None
        try:
            return int(self._proc.io_counters().read_bytes)
        except Exception:                           # not on every platform
            return None

    def sample(self, engine) -> dict[str, Any]:
        now = self.clock()
        dt = max(now - self._last_t, 1e-6)
        st: dict[str, Any] = {}
        if engine is not None:
            try:
                st = dict(engine.stats())
            except Exception:
                st = {}
        out: dict[str, Any] = {"generating": self.generating, "engine": st.get("engine"), "model": st.get("model"),
                               "context_used": st.get("context_used"), "context_size": st.get("context_size")}
        n = self._tokens - self._last_tokens
        if self.generating:
            out["tok_s"] = n / dt if self.first_token_at is not None else 0.0
            out["ttft_s"] = (self.first_token_at - self.started_at) if self.first_token_at else None
        else:
            out["tok_s"] = st.get("decode_tok_s")
            out["ttft_s"] = st.get("ttft_s")
        hits, misses = st.get("expert_cache_hits"), st.get("expert_cache_misses")
        out["hit_rate"] = None
        if isinstance(hits, int) and isinstance(misses, int):
            if self._last_hits is not None:
                dh, dm = hits - self._last_hits, misses - self._last_misses
                out["hit_rate"] = dh / (dh + dm) if dh + dm > 0 else None
            if out["hit_rate"] is None:
                out["hit_rate"] = st.get("expert_cache_hit_rate")
            self._last_hits, self._last_misses = hits, misses
        read = self._read_bytes()
        if read is not None and self._last_read is not None:
            out["disk_mb_s"] = max(read - self._last_read, 0) / dt / 1e6
        else:
            out["disk_mb_s"] = st.get("disk_read_mb_s")
        self._last_read = read
        ram = None
        if self._proc is not None:
            try:
                ram = int(self._proc.memory_info().rss)
            except Exception:
                ram = None
        out["ram_bytes"] = ram if ram is not None else st.get("resident_bytes")
        out["expert_cache_mode"] = st.get("expert_cache_mode")
        # the KV session pool and the disk store, for the status row (None where the engine keeps none)
        out.update({k: st.get(k) for k in ("kv_sessions", "kv_ram_bytes", "kv_disk_bytes")})
        self._last_t, self._last_tokens = now, self._tokens
        return out
