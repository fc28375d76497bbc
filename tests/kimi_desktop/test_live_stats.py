"""LiveStats.sample: the figures the app's status row shows, from an engine's stats()."""
from __future__ import annotations

from kimi_desktop.live_stats import LiveStats


class _Engine:
    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


def test_kv_pool_figures_reach_the_status_row():
    st = {"engine": "native", "kv_sessions": 3, "kv_ram_bytes": 7 << 20, "kv_disk_bytes": 11 << 20}
    out = LiveStats(clock=lambda: 1.0).sample(_Engine(st))
    assert (out["kv_sessions"], out["kv_ram_bytes"], out["kv_disk_bytes"]) == (3, 7 << 20, 11 << 20)


def test_engines_without_a_kv_pool_report_none():
    out = LiveStats(clock=lambda: 1.0).sample(_Engine({"engine": "remote"}))
    assert out["kv_sessions"] is None and out["kv_ram_bytes"] is None and out["kv_disk_bytes"] is None
