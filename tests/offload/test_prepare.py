"""prepare_checkpoint: one aligned block per expert, identical weights, atomic, stale packs ignored."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from kimi_desktop.offload.experts import ExpertGeometry, ExpertStore
from kimi_desktop.offload.formats import load_linear
from kimi_desktop.offload.prepare import PACK_DATA, PACK_INDEX, PackError, prepare_checkpoint, register
from kimi_desktop.offload.safetensors import Checkpoint

MODULES = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["int4", "fp8", "bf16"])
def packed(request, make_ckpt, tmp_path_factory):
    src = make_ckpt(layout=request.param, shards=2)
    out = tmp_path_factory.mktemp(f"pack-{request.param}")
    return src, prepare_checkpoint(src, out_dir=out)


def test_pack_round_trip_identical(packed):
    src, index = packed
    info = json.loads(index.read_text())
    assert info["block_bytes"] % 4096 == 0 and all(p["offset"] % 64 == 0 for p in info["parts"])
    assert (index.parent / PACK_DATA).stat().st_size == info["data_bytes"]
    assert not [p for p in index.parent.iterdir() if p.name.endswith(".tmp")]
    geom, qcfg = ExpertGeometry.from_folder(src)
    ck = Checkpoint(src)
    x = np.random.default_rng(0).standard_normal((2, geom.hidden)).astype(np.float32)
    with ExpertStore.open(src, n_slots=4, pack=index.parent) as store:
        assert store.source == "pack" and store.slot_bytes == info["block_bytes"]
        for layer, e in geom.keys():
            got = store.get(layer, e)
            for lin, m in zip(got, MODULES):
                want = load_linear(ck, f"model.layers.{layer}.mlp.experts.{e}.{m}", qcfg, geom.shape(m))
                assert type(lin) is type(want)
                np.testing.assert_array_equal(lin.dequantize(), want.dequantize())
                xi = x[:, : lin.shape[1]]
                np.testing.assert_array_equal(lin.matmul(xi), want.matmul(xi))
        s = store.stats()
        n = sum(geom.n_experts.values())
        assert s["misses"] == n and s["read_ops"] == n        # one aligned read per expert


def test_pack_in_model_folder_same_logits(tiny_int4, tmp_path):
    from kimi_desktop.runtime import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_int4, folder)
    index = prepare_checkpoint(folder)
    assert index == folder / PACK_INDEX
    ids = [9, 8, 7, 300, 1, 2, 3]
    want = load_model(tiny_int4).logits(ids)
    with ExpertStore.open(folder, n_slots=3, policy="lfu", direct_io=True) as store:
        assert store.source == "pack"                          # found next to the checkpoint
        np.testing.assert_array_equal(load_model(folder, experts=store).logits(ids), want)
    prepare_checkpoint(folder)                                 # again: replaced atomically
    assert sorted(p.name for p in folder.iterdir() if "kdpack" in p.name) == [PACK_DATA, PACK_INDEX]


def test_stale_or_truncated_pack_is_ignored(make_ckpt, tiny_int4, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_int4, folder)
    out = tmp_path / "pack"
    prepare_checkpoint(make_ckpt(layout="int4", shards=1), out_dir=out)   # other shard layout
    with ExpertStore.open(folder, n_slots=2, pack="auto") as store:
        assert store.source == "checkpoint"                    # nothing in the folder
    shutil.copy(out / PACK_INDEX, folder / PACK_INDEX)
    shutil.copy(out / PACK_DATA, folder / PACK_DATA)
    with ExpertStore.open(folder, n_slots=2) as store:
        assert store.source == "checkpoint" and "stale" in store.stats()["pack_note"]
    with pytest.raises(PackError, match="stale"):
        ExpertStore.open(folder, n_slots=2, pack=folder)
    prepare_checkpoint(folder)
    with open(folder / PACK_DATA, "r+b") as f:
        f.truncate(4096)
    with ExpertStore.open(folder, n_slots=2) as store:
        assert store.source == "checkpoint" and "truncated" in store.stats()["pack_note"]


def test_cli_register(tiny_int4, tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="kimi-desktop")
    register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["prepare", str(tiny_int4), "--out-dir", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / PACK_INDEX)
    with pytest.raises(SystemExit):
        ap.parse_args(["prepare", str(tiny_int4), "--format", "nope"])


def test_pack_without_preadv_is_the_same_pack_read_the_same(packed, tmp_path, monkeypatch):
    """Where os.preadv is missing (Windows), prepare and the store read with the portable fallback:
    the pack's bytes are the same, and so is what the store serves from it."""
    import os

    src, index = packed
    monkeypatch.delattr(os, "preadv")
    other = prepare_checkpoint(src, out_dir=tmp_path / "portable")
    assert (other.parent / PACK_DATA).read_bytes() == (index.parent / PACK_DATA).read_bytes()
    geom, _ = ExpertGeometry.from_folder(src)
    with ExpertStore.open(src, n_slots=2, pack=other.parent) as store:
        assert store.stats()["reads"] == "portable" and store.source == "pack"
        for i, (layer, e) in enumerate(geom.keys()):            # blocks are layer-major
            with open(index.parent / PACK_DATA, "rb") as f:
                f.seek(i * store.slot_bytes)
                block = np.frombuffer(f.read(store.slot_bytes), np.uint8)
            for lin, want in zip(store.get(layer, e), store.catalog.triple(block, store.catalog.plan((layer, e)))):
                np.testing.assert_array_equal(lin.dequantize(), want.dequantize())
