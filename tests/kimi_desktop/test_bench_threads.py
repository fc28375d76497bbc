"""`kimi-desktop bench --compete N --thread-variants ...`: the thread study's plumbing (not speed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from kimi_desktop.bench.compete import Competitors, thread_variants, with_thread_variants

REPO = Path(__file__).resolve().parents[2]


def test_thread_variants_parse_and_expand():
    assert thread_variants("default, 1,2") == ["default", "1", "2"]
    for bad in ("0", "two", "", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="default or"):
            thread_variants(bad)
    engines = [("native", "native", "m", ["--x"]), ("llama.cpp", "llama.cpp", "g", [])]
    got = with_thread_variants(engines, ["default", "1"])
    assert got == [("native", "native", "m", ["--x"]), ("native-t1", "native", "m", ["--x", "--threads", "1"]),
                   ("llama.cpp", "llama.cpp", "g", [])]
    assert with_thread_variants(engines, None) == engines


def test_competitors_run_for_the_block_only():
    with Competitors(2) as c:
        pids = [p.pid for p in c.procs]
        assert len(pids) == 2 and all(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert not any(psutil.pid_exists(p) for p in pids)
    with Competitors(0) as c:
        assert c.procs == []


def test_bench_on_the_demo_model_with_a_competitor(tmp_path):
    """--demo without llama.cpp: the native engine with its own thread choice and with --threads 1,
    beside one busy process; the per-token table lists both."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))     # the demo model is made here
    cmd = [sys.executable, "-m", "kimi_desktop", "bench", "--demo", "--regimes", "ram", "--prompt-len", "4",
           "--decode", "2", "--repeats", "1", "--compete", "1", "--thread-variants", "default,1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    runs = res["regimes"]["ram"]["runs"]
    assert set(runs) == {"native", "native-t1"} and not any("error" in v for v in runs.values()), runs
    assert res["compete"] == 1 and res["gguf"] is None
    assert "| ram | native-t1 |" in r.stdout and "1 competing" in r.stdout
