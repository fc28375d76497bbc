"""The console script: demo generation on a fresh cache, make-test-model, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "kimi_desktop", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, **kw)


def test_help_lists_the_commands():
    r = run(["--help"])                  # the bare command opens the app (tests/ui/test_launch.py)
    assert r.returncode == 0 and "make-test-model" in r.stdout


def test_demo_generate_and_the_random_model_on_a_fresh_cache_with_concurrent_first_runs(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    gen = [sys.executable, "-m", "kimi_desktop", "generate", "--demo", "--prompt-ids", "1,2,3",
           "--max-new-tokens", "4"]
    make = [sys.executable, "-c", "from kimi_desktop.demo import random_demo_model_path as p; print(p())"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in (gen, gen, make, make)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    for out, _ in outs[:2]:
        ids = [int(t) for t in out.split()]
        assert 1 <= len(ids) <= 4
    assert outs[0][0] == outs[1][0]                       # same demo model, greedy
    assert outs[2][0] == outs[3][0]                       # both found the one random model
    demo = next((tmp_path / "kimi-desktop").iterdir())
    assert (demo / "config.json").exists() and (demo / "tiktoken.model").exists()
    assert [p.name for p in (tmp_path / "kimi-desktop").iterdir()] == [demo.name]   # no temp leftovers


def test_make_test_model_writes_a_complete_folder(tmp_path):
    out = tmp_path / "m"
    r = run(["make-test-model", str(out), "--preset", "tiny", "--layout", "fp8", "--shards", "3",
             "--n-group", "4", "--topk-group", "2"])
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8" and cfg["n_group"] == 4
    r = run(["make-test-model", str(out)])
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_bad_prompt_ids_and_missing_model_are_clear_errors(tmp_path):
    r = run(["generate", "--model", str(tmp_path / "none"), "--prompt-ids", "1,2"])
    assert r.returncode == 2 and "--model" in r.stderr and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = run(["generate", "--demo", "--prompt-ids", "1,x"], env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode != 0 and "comma-separated" in r.stderr
