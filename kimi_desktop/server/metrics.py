"""`GET /metrics`: Prometheus text exposition (format 0.0.4) of the server's counters and the engine's stats.

    kimi_desktop_requests_total{endpoint,status}   counter  every answer, guards' refusals included;
                                                            endpoint: the route's path ("other" for no route)
    kimi_desktop_prompt_tokens_total               counter  prompt tokens of the generations this server ran
    kimi_desktop_cached_prompt_tokens_total        counter  of those, reused from the engine's prefix cache
    kimi_desktop_generated_tokens_total            counter  completion tokens
    kimi_desktop_decode_tokens_per_second          gauge    last generation's decode speed (engine)
    kimi_desktop_prefill_tokens_per_second         gauge    last generation's prefill speed (engine)
    kimi_desktop_queue_waiting                     gauge    requests waiting behind the running one
    kimi_desktop_busy                              gauge    1 while a generation runs
    kimi_desktop_expert_cache_hits_total / _misses_total    counter, and _hit_rate gauge (routed experts)
    kimi_desktop_expert_cache_bytes                gauge    experts resident in the cache
    kimi_desktop_disk_read_bytes_total             counter  expert bytes read from disk
    kimi_desktop_resident_bytes                    gauge    the process's resident memory
    kimi_desktop_context_size / _context_used      gauge    tokens

The token counters are the server's own (from each generation's usage), so they count only API
traffic; the rest come from engine.stats() at scrape time, and a key the engine does not report
(the remote engine has no expert cache, no context size) leaves its metric without a sample.
Like the API, /metrics needs the key when the server has one (as llama-server); /health does not.
"""

from __future__ import annotations

import math
import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "kimi_desktop_"

# (metric, type, engine.stats() key, help)
ENGINE_METRICS = (
    ("decode_tokens_per_second", "gauge", "decode_tok_s", "Decode speed of the last generation."),
    ("prefill_tokens_per_second", "gauge", "prefill_tok_s", "Prefill speed of the last generation."),
    ("queue_waiting", "gauge", "waiting", "Requests waiting behind the running one."),
    ("busy", "gauge", "busy", "1 while a generation runs."),
    ("expert_cache_hits_total", "counter", "expert_cache_hits", "Routed-expert cache hits."),
    ("expert_cache_misses_total", "counter", "expert_cache_misses", "Routed-expert cache misses."),
    ("expert_cache_hit_rate", "gauge", "expert_cache_hit_rate", "Routed-expert cache hit rate (0..1)."),
    ("expert_cache_bytes", "gauge", "expert_cache_bytes", "Bytes of routed experts held in the cache."),
    ("disk_read_bytes_total", "counter", "disk_read_bytes", "Expert bytes read from disk."),
    ("resident_bytes", "gauge", "resident_bytes", "Resident memory of the server process."),
    ("context_size", "gauge", "context_size", "Context length in tokens."),
    ("context_used", "gauge", "context_used", "Tokens held in the engine's context now."),
    ("prefill_done", "gauge", "prefill_done", "Prompt tokens of the running prefill computed (0 when idle)."),
    ("prefill_total", "gauge", "prefill_total", "Prompt tokens the running prefill computes (0 when idle)."),
    ("kv_sessions", "gauge", "kv_sessions", "Conversations whose KV cache the engine holds in RAM."),
    ("kv_ram_bytes", "gauge", "kv_ram_bytes", "Bytes of KV cache held in RAM."),
    ("kv_disk_bytes", "gauge", "kv_disk_bytes", "Bytes of KV cache files on disk."),
)


class Metrics:
    """The server's own counters (thread-safe: the engine's pump threads report usage)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def add_usage(self, usage) -> None:
        with self._lock:
            self.prompt_tokens += int(usage.prompt_tokens)
            self.cached_tokens += int(usage.cached_prompt_tokens)
            self.generated_tokens += int(usage.completion_tokens)

    def render(self, stats: dict, waiting_fallback: int = 0) -> str:
        """The exposition text: these counters plus `stats` (an engine.stats() snapshot, maybe partial)."""
        with self._lock:
            requests = sorted(self.requests.items())
            tokens = (self.prompt_tokens, self.cached_tokens, self.generated_tokens)
        out: list[str] = []
        family(out, "requests_total", "counter", "API requests answered, by endpoint and status.",
               [(f'{{endpoint="{label(e)}",status="{s}"}}', n) for (e, s), n in requests])
        for (name, text), v in zip((("prompt_tokens_total", "Prompt tokens of the generations served."),
                                    ("cached_prompt_tokens_total", "Prompt tokens reused from the prefix cache."),
                                    ("generated_tokens_total", "Tokens generated.")), tokens):
            family(out, name, "counter", text, [("", v)])
        stats = {"waiting": waiting_fallback, **stats}
        for name, kind, key, text in ENGINE_METRICS:
            v = number(stats.get(key))
            family(out, name, kind, text, [] if v is None else [("", v)])
        return "\n".join(out) + "\n"


def family(out: list[str], name: str, kind: str, text: str, samples) -> None:
    out += [f"# HELP {P}{name} {text}", f"# TYPE {P}{name} {kind}"]
    out += [f"{P}{name}{labels} {fmt(v)}" for labels, v in samples]


def number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return v
    return None


def fmt(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    return ("+Inf" if v > 0 else "-Inf") if math.isinf(v) else repr(v)


def label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class CountRequests:
    """ASGI middleware (outermost): counts every answer's status under its route's path."""

    def __init__(self, app, metrics: Metrics, known_paths):
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(msg):
            if msg["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None)
                path = scope.get("path", "")
                self.metrics.count_request(route or (path if path in self.known() else "other"), msg["status"])
            await send(msg)
        return await self.app(scope, receive, counted)
