"""The disk KV store: round trip, each damaged or foreign file rejected (logged, never used), budget, clear."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from kimi_desktop.kv_store import SUFFIX, KVStore, clear_kv_cache, model_fingerprint

LAYOUT = (2, 8, 4, "bf16")          # layers, R, P, dtype


def state(n, seed=0, layout=LAYOUT):
    layers, r, p, dtype = layout
    rng = np.random.default_rng(seed)
    dt = np.uint16 if dtype == "bf16" else np.float32
    make = (lambda k: rng.integers(0, 1 << 16, (n, k)).astype(np.uint16)) if dtype == "bf16" else \
        (lambda k: rng.standard_normal((n, k)).astype(dt))
    return list(range(100, 100 + n)), [make(r) for _ in range(layers)], [make(p) for _ in range(layers)]


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    return d


def store_at(tmp_path, fp, budget=1 << 30, layout=LAYOUT):
    return KVStore(fp, layout, tmp_path / "kv", budget_bytes=budget)


def test_round_trip_and_restart(tmp_path, model_dir):
    fp = model_fingerprint(model_dir)
    s = store_at(tmp_path, fp)
    toks, kv, pe = state(20)
    path = s.save(toks, kv, pe)
    assert path.name.endswith(SUFFIX) and path.exists()
    again = store_at(tmp_path, fp)                    # a new process reads the folder
    n, entry = again.best(toks + [5, 6])
    assert n == 20
    t2, kv2, pe2 = again.load(entry)
    assert t2 == toks and all(np.array_equal(a, b) and b.dtype == np.uint16 for a, b in zip(kv, kv2))
    assert all(np.array_equal(a, b) for a, b in zip(pe, pe2))


def test_fingerprint_reads_headers_not_data(tmp_path, model_dir):
    from kimi_desktop.offload.safetensors import write_safetensors
    write_safetensors(model_dir / "model.safetensors", {"w": np.zeros(4, np.float32)})
    a = model_fingerprint(model_dir)
    with open(model_dir / "model.safetensors", "r+b") as f:      # tensor data changes: same fingerprint
        f.seek(-4, 2)
        f.write(b"\1\1\1\1")
    assert model_fingerprint(model_dir) == a
    (model_dir / "config.json").write_text('{"a": 2}')
    assert model_fingerprint(model_dir) != a


def test_later_turn_replaces_earlier_file(tmp_path):
    s = store_at(tmp_path, "fp")
    toks, kv, pe = state(30)
    first = s.save(toks[:10], [a[:10] for a in kv], [a[:10] for a in pe])
    second = s.save(toks, kv, pe)
    assert not first.exists() and second.exists() and len(s.entries) == 1


def _written(tmp_path, fp="fp"):
    s = store_at(tmp_path, fp)
    toks, kv, pe = state(16)
    return s.save(toks, kv, pe), toks


def _rejected(tmp_path, caplog, path, toks, fp="fp", layout=LAYOUT):
    with caplog.at_level(logging.WARNING, logger="kimi_desktop"):
        s = store_at(tmp_path, fp, layout=layout)
        n, entry = s.best(toks)
        assert entry is None and n == 0                  # never offered
        store_at(tmp_path, fp, layout=layout) if path.exists() else None
    warnings = [r for r in caplog.records if "ignoring a KV cache file" in r.getMessage()]
    assert warnings and str(path) in warnings[0].getMessage()
    return s


def test_other_models_file_is_skipped_and_kept(tmp_path, caplog):
    path, toks = _written(tmp_path, fp="other-model")
    _rejected(tmp_path, caplog, path, toks)
    assert path.exists()                                 # it is that model's cache


def test_truncated_file_is_rejected_and_deleted(tmp_path, caplog):
    path, toks = _written(tmp_path)
    os.truncate(path, path.stat().st_size - 7)
    _rejected(tmp_path, caplog, path, toks)
    assert not path.exists()


def test_garbage_header_is_rejected(tmp_path, caplog):
    path, toks = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff" * 32
    path.write_bytes(bytes(raw))
    _rejected(tmp_path, caplog, path, toks)
    assert not path.exists()


def test_token_mismatch_is_rejected(tmp_path, caplog):
    path, toks = _written(tmp_path)
    raw = path.read_bytes()
    from kimi_desktop.offload.safetensors import SafetensorsFile
    with SafetensorsFile(path) as f:
        start = f.tensors["tokens"].start
    raw = raw[:start] + (999).to_bytes(8, "little") + raw[start + 8:]     # first token id changed
    path.write_bytes(raw)
    _rejected(tmp_path, caplog, path, [999] + toks[1:])
    assert not path.exists()


def test_wrong_layout_is_rejected(tmp_path, caplog):
    path, toks = _written(tmp_path)                    # bf16, R=8
    _rejected(tmp_path, caplog, path, toks, layout=(2, 8, 4, "fp32"))
    _rejected(tmp_path, caplog, path, toks, layout=(2, 16, 4, "bf16"))


def test_wrong_tensor_shape_is_rejected_at_load(tmp_path, caplog):
    s = store_at(tmp_path, "fp")
    toks, kv, pe = state(12)
    kv[1] = kv[1][:, :6]                              # metadata says R=8
    path = s.save(toks, kv, pe)
    again = store_at(tmp_path, "fp")
    n, entry = again.best(toks)
    with caplog.at_level(logging.WARNING, logger="kimi_desktop"):
        assert again.load(entry) is None
    assert "kv.1" in caplog.text and not path.exists()


def test_budget_evicts_least_recently_used(tmp_path):
    one = store_at(tmp_path, "fp")
    p0 = one.save(*state(16, 0))
    size = p0.stat().st_size
    s = store_at(tmp_path, "fp", budget=int(size * 2.5))
    toks1, kv1, pe1 = state(16, 1)
    p1 = s.save([7] + toks1[1:], kv1, pe1)
    os.utime(p0, (1, 1))                              # p0 is the oldest
    s.load(s.entries[p1])
    p2 = s.save([8] + toks1[1:], kv1, pe1)
    assert not p0.exists() and p1.exists() and p2.exists() and s.disk_bytes <= s.budget


def test_clear(tmp_path):
    s = store_at(tmp_path, "fp")
    path = s.save(*state(16))
    size = path.stat().st_size
    assert clear_kv_cache(tmp_path / "kv") == size and not path.exists()
    assert clear_kv_cache(tmp_path / "nothing") == 0


def test_cache_clear_cli(tmp_path, capsys, monkeypatch):
    from kimi_desktop.cli import main
    s = store_at(tmp_path, "fp")
    path = s.save(*state(16))
    size = path.stat().st_size
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["cache", "clear", "--kv-dir", str(tmp_path / "kv")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(size) in out[0] and not path.exists()
