"""`kimi-desktop bench` end to end on the tiny model (correct plumbing, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_runs_both_engines_in_both_regimes(tiny_int4, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "kimi_desktop", "bench", "--model", str(tiny_int4), "--gguf",
           str(tmp_path / "tiny.gguf"), "--prompt-len", "8", "--decode", "4", "--threads", "1",
           "--balloon-gb", "0.25", "--expert-cache-gb", "0.001", "--traces", "--trace-prompt", "40",
           "--trace-decode", "8", "--repeats", "2", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["regimes"]) == {"ram", "pressure"}
    for regime in res["regimes"].values():
        nat, ll = regime["runs"]["native"], regime["runs"]["llama.cpp"]
        assert "error" not in nat and "error" not in ll, regime
        assert len(nat["tokens"]) == len(ll["tokens"]) == 4
        assert nat["prefill_tok_s"] > 0 and ll["decode_tok_s"] > 0 and nat["peak_rss"] > 0
        assert regime["ratios"]["decode_tok_s"] > 0
        assert len(nat["decode_tok_s_runs"]) == len(ll["prefill_tok_s_runs"]) == 2
    pressure = res["regimes"]["pressure"]["runs"]["native"]
    assert pressure["expert_cache"]["budget_bytes"] == int(0.001 * 2**30)
    assert pressure["expert_cache"]["misses"] > 0
    assert res["ceilings"]["dram_read_gbps"] > 0
    assert set(res["policies"]["recorded"]["hit_rate"]) >= {"lru", "lfu", "belady"}
    assert "native / llama.cpp" in r.stdout
    assert res["prefill_gflop"] > 0 and "odirect_read_gbps_qd8" in res["ceilings"]   # None where O_DIRECT is refused


def test_median_run_keeps_one_runs_details():
    from kimi_desktop.bench.run import median_run

    runs = [{"decode_tok_s": d, "prefill_tok_s": p, "stages": i}
            for i, (d, p) in enumerate([(3, 10), (1, 30), (2, 20)])]
    m = median_run(runs + [{"error": ["failed"]}])
    assert m["stages"] == 2 and m["decode_tok_s"] == 2 and m["prefill_tok_s"] == 20
    assert m["decode_tok_s_runs"] == [3, 1, 2]


def test_decode_read_amplification():
    from kimi_desktop.bench.worker import decode_read_amplification

    keys = ("misses", "prefetch_used", "prefetch_issued", "prefetch_wasted", "bytes_read_demand", "bytes_read_prefetch")
    before = dict.fromkeys(keys, 10)
    after = dict(misses=13, prefetch_used=12, prefetch_issued=14, prefetch_wasted=11,
                 bytes_read_demand=10 + 3 * 100, bytes_read_prefetch=10 + 4 * 100)
    d = decode_read_amplification(before, after, 100)
    assert d["needed_bytes"] == 500 and d["read_bytes"] == 700 and d["ratio"] == 1.4
    assert decode_read_amplification(before, before, 100)["ratio"] is None


def test_cache_variants_run_the_engine_default_beside_fixed_budgets(tiny_int4, tmp_path):
    """--cache-variants auto,0,N: the native engine with no cache flag (its own choice, labelled
    "native"), the page cache and a fixed store, alternating, in the pressure regime."""
    import argparse

    from kimi_desktop.bench.run import _cache_variants, cache_variant

    args = argparse.Namespace(policy="lru", direct_io=True)
    got = [cache_variant(v, tiny_int4, args) for v in _cache_variants("auto,0,3")]
    assert [g[0] for g in got] == ["native", "native-pagecache", "native-3gib"]
    assert got[0][3] == ["--auto-expert-cache"] and got[1][3] == []
    assert got[2][3] == ["--expert-budget-gb", "3", "--policy", "lru", "--direct-io"]
    with pytest.raises(argparse.ArgumentTypeError, match="auto, 0 or GiB"):
        _cache_variants("auto,-1")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "kimi_desktop", "bench", "--model", str(tiny_int4), "--prompt-len", "4",
           "--decode", "2", "--threads", "1", "--regimes", "pressure", "--balloon-gb", "0",
           "--cache-variants", "auto,0,0.001", "--repeats", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    runs = json.loads(out.read_text())["regimes"]["pressure"]["runs"]
    assert set(runs) == {"native", "native-pagecache", "native-0.001gib"}
    assert all("error" not in run for run in runs.values()), runs
    assert "fit in" in runs["native"]["expert_cache_choice"]["reason"]      # a tiny model: the page cache
    assert runs["native-0.001gib"]["expert_cache"]["budget_bytes"] > 0
    assert "expert_cache" not in runs["native-pagecache"]
    assert "Native default (pressure): expert cache: OS page cache" in r.stdout
