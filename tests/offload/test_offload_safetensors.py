"""Safetensors reader/writer: round trips, zero-copy views, header-only opening, malformed files."""
import json
import mmap
import os
import re

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.offload import safetensors as st
from kimi_desktop.offload.safetensors import (
    DTYPES, Checkpoint, CheckpointError, SafetensorsFile, TensorSpec, write_checkpoint,
    write_safetensors,
)

rng = np.random.default_rng(1234)


def random_array(code: str, shape) -> np.ndarray:
    """Random bits of the dtype (NaNs included: the round trip must be bit-exact)."""
    dt = DTYPES[code]
    n = int(np.prod(shape, dtype=np.int64))
    if code == "BOOL":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def mmap_base(a: np.ndarray):
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.base if isinstance(a, np.ndarray) else getattr(a, "obj", None)
    return a


def msg(*parts) -> str:
    """Regex matching all parts, in order, anywhere in an error message."""
    return ".*".join(re.escape(str(p)) for p in parts)


def raw_file(path, header: dict | bytes, data: bytes = b"") -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


@pytest.fixture
def sharded(tmp_path):
    """A 3-shard checkpoint of mixed dtypes; returns (folder, {name: array})."""
    arrays = {
        "model.embed_tokens.weight": random_array("BF16", (64, 32)),
        "model.layers.0.self_attn.q_a_proj.weight": random_array("F8_E4M3", (40, 64)),
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": random_array("F32", (1, 1)),
        "model.layers.1.mlp.experts.0.gate_proj.weight_packed": random_array("I32", (16, 8)),
        "model.layers.1.mlp.experts.0.gate_proj.weight_scale": random_array("BF16", (16, 2)),
        "model.layers.1.mlp.experts.0.gate_proj.weight_shape": np.array([16, 64], dtype=np.int64),
        "model.norm.weight": random_array("F32", (32,)),
        "lm_head.weight": random_array("BF16", (64, 32)),
    }
    specs = [TensorSpec(k, st.dtype_code(a.dtype), a.shape, lambda a=a: a) for k, a in arrays.items()]
    write_checkpoint(tmp_path, specs, shards=3)
    return tmp_path, arrays


# --------------------------------------------------------------------------- round trips

def test_roundtrip_every_dtype_single_file(tmp_path):
    arrays = {f"t.{code}": random_array(code, (3, 5)) for code in DTYPES}
    arrays["scalar"] = np.array(2.5, dtype=np.float32)
    arrays["empty"] = np.zeros((0, 7), dtype=ml_dtypes.bfloat16)
    arrays["odd"] = random_array("BF16", (3,))  # leaves the next tensor unaligned: still readable
    arrays["after_odd"] = random_array("F64", (2, 2))
    path = write_safetensors(tmp_path / "model.safetensors", arrays, metadata={"format": "pt"})

    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert f.data_start % 8 == 0
        assert list(f.tensors) == list(arrays)
        for name, a in arrays.items():
            v = f.get(name)
            assert same_bits(v, a), name
            assert f.tensors[name].dtype == st.dtype_code(a.dtype)
            assert f.tensors[name].nbytes == a.nbytes
            assert not v.flags.writeable and not v.flags.owndata
            assert isinstance(mmap_base(v), mmap.mmap), name
        a, b = f.get("t.BF16"), f.get("t.BF16")
        assert np.shares_memory(a, b)  # two views of the same mapped bytes, no copy
        with pytest.raises(ValueError):
            a[0, 0] = 1

    with Checkpoint(tmp_path) as ckpt:  # no index: every *.safetensors in the folder
        assert sorted(ckpt.names()) == sorted(arrays)
        assert same_bits(ckpt.get("t.F8_E4M3"), arrays["t.F8_E4M3"])


def test_roundtrip_sharded(sharded):
    folder, arrays = sharded
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((folder / st.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert set(index["weight_map"]) == set(arrays)
    assert set(index["weight_map"].values()) == set(shards)
    with Checkpoint(folder) as ckpt:
        assert len(ckpt.files) == 3
        for name, a in arrays.items():
            assert same_bits(ckpt.get(name), a), name
            assert ckpt.info(name).path.name == index["weight_map"][name]
        assert ckpt.stats.tensors_viewed == len(arrays)
        assert ckpt.stats.bytes_viewed == index["metadata"]["total_size"]


def test_safetensors_library_reads_our_files(tmp_path):
    """The official reader agrees (transformers may load what we write)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch
    arrays = {"a": random_array("F32", (4, 3)), "b": random_array("I64", (5,)),
              "c": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3)}
    write_checkpoint(tmp_path, [TensorSpec(k, st.dtype_code(a.dtype), a.shape, lambda a=a: a)
                                for k, a in arrays.items()], shards=2)
    loaded = {}
    for p in sorted(tmp_path.glob("*.safetensors")):
        loaded.update(safetensors_torch.load_file(p))
    assert loaded["a"].numpy().tobytes() == arrays["a"].tobytes()
    assert loaded["b"].numpy().tobytes() == arrays["b"].tobytes()
    assert loaded["c"].dtype == torch.bfloat16
    assert loaded["c"].view(torch.int16).numpy().tobytes() == arrays["c"].tobytes()


def test_write_checkpoint_streams_in_order_and_balances(tmp_path):
    calls = []

    def maker(i):
        def make():
            calls.append(i)
            return np.full((256,), i, dtype=np.float32)
        return make

    specs = [TensorSpec(f"t{i}", "F32", (256,), maker(i)) for i in range(8)]
    paths = write_checkpoint(tmp_path, specs, shards=4)
    assert calls == list(range(8))  # each produced once, one at a time, in order
    assert [len(SafetensorsFile(p).tensors) for p in paths] == [2, 2, 2, 2]
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path / "x", specs, shards=9)


def test_write_checkpoint_one_shard_still_has_index(tmp_path):
    paths = write_checkpoint(tmp_path, [TensorSpec("x", "U8", (3,), lambda: np.arange(3, dtype=np.uint8))])
    assert [p.name for p in paths] == ["model-00001-of-00001.safetensors"]
    index = json.loads((tmp_path / st.INDEX_NAME).read_text())
    assert index == {"metadata": {"total_size": 3},
                     "weight_map": {"x": "model-00001-of-00001.safetensors"}}


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.float16), np.zeros((3, 2), np.float32), [1.0]])
def test_write_checkpoint_rejects_wrong_make_result(tmp_path, bad):
    specs = [TensorSpec("ok", "F32", (1,), lambda: np.zeros(1, np.float32)),
             TensorSpec("layer.bad", "F32", (2, 3), lambda: bad)]
    with pytest.raises(CheckpointError, match=msg("model-00001-of-00001.safetensors", "layer.bad",
                                                  "(2, 3)", "found")):
        write_checkpoint(tmp_path, specs)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind


# --------------------------------------------------------------------------- opening reads no data

def test_open_reads_only_headers(tmp_path, monkeypatch):
    """A 256 GiB sparse data region: reading any of it would take minutes and fail the counters."""
    huge = TensorSpec("model.layers.1.mlp.experts.0.up_proj.weight_packed", "I32", (1 << 30, 64), None)
    small = TensorSpec("model.norm.weight", "F32", (4,), None)
    header = st._header_bytes([small, huge], {"format": "pt"})
    path = tmp_path / "model.safetensors"
    path.write_bytes(header)
    os.truncate(path, len(header) + small.nbytes + huge.nbytes)  # a hole: no blocks on disk
    assert os.path.getsize(path) > 256 << 30

    read_bytes = []
    real_open = open

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            b = self.f.read(n)
            read_bytes.append(len(b))
            return b

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(st, "open", lambda *a, **k: CountingFile(real_open(*a, **k)), raising=False)
    ckpt = Checkpoint(tmp_path)
    assert sum(read_bytes) == len(header)  # the 8-byte length + the JSON, nothing more
    assert ckpt.stats.bytes_viewed == 0 and ckpt.stats.tensors_viewed == 0
    assert ckpt.info(huge.name).nbytes == 256 << 30
    monkeypatch.undo()

    v = ckpt.get(huge.name)  # a view: mapping 256 GiB reads nothing either
    assert v.shape == (1 << 30, 64) and int(v[123_456_789, 7]) == 0
    assert ckpt.stats.tensors_viewed == 1 and ckpt.stats.bytes_viewed == 256 << 30
    del v
    ckpt.close()


# --------------------------------------------------------------------------- malformed files

def test_truncated_shard(sharded):
    folder, arrays = sharded
    last = folder / "model-00003-of-00003.safetensors"
    last_tensor = list(SafetensorsFile(last).tensors)[-1]
    os.truncate(last, os.path.getsize(last) - 5)
    with pytest.raises(CheckpointError, match=msg(last, "truncated", last_tensor)):
        Checkpoint(folder)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=msg(path, "absurd header length")):
        SafetensorsFile(path)
    path.write_bytes((1000).to_bytes(8, "little") + b"{}      ")  # longer than the file
    with pytest.raises(CheckpointError, match=msg(path, "absurd header length 1000")):
        Checkpoint(tmp_path)


def test_file_too_short(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=msg(path, "too short")):
        SafetensorsFile(path)


@pytest.mark.parametrize("header", [b"{not json}", b"[1, 2]   ", b"\xff\xfe{}    "])
def test_header_not_json(tmp_path, header):
    path = tmp_path / "model.safetensors"
    raw_file(path, header)
    with pytest.raises(CheckpointError, match=msg(path, "header")):
        SafetensorsFile(path)


def test_offsets_inconsistent_with_shape(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24))
    with pytest.raises(CheckpointError, match=msg(path, "'w'", "20 bytes", "expected 24")):
        SafetensorsFile(path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, {"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 1]}}, bytes(8))
    with pytest.raises(CheckpointError, match=msg(path, "'w'", "unknown dtype 'Q4_K'")):
        SafetensorsFile(path)


def test_overlapping_and_out_of_region_entries(tmp_path):
    path = tmp_path / "model.safetensors"
    raw_file(path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(8))
    with pytest.raises(CheckpointError, match=msg(path, "'b'", "overlap", "'a'")):
        SafetensorsFile(path)
    raw_file(path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 0]}}, bytes(8))
    with pytest.raises(CheckpointError, match=msg(path, "'a'", "out of order")):
        SafetensorsFile(path)
    raw_file(path, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [100, 104]}}, bytes(8))
    with pytest.raises(CheckpointError, match=msg(path, "truncated", "'a'")):
        SafetensorsFile(path)


def test_missing_shard_named_by_index(sharded):
    folder, _ = sharded
    index = json.loads((folder / st.INDEX_NAME).read_text())
    gone = "model-00002-of-00003.safetensors"
    a_tensor = next(k for k, v in index["weight_map"].items() if v == gone)
    (folder / gone).unlink()
    with pytest.raises(CheckpointError, match=msg(st.INDEX_NAME, gone, a_tensor, "missing")):
        Checkpoint(folder)


def test_tensor_in_index_but_absent_from_shard(sharded):
    folder, _ = sharded
    path = folder / st.INDEX_NAME
    index = json.loads(path.read_text())
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00003.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=msg(folder / "model-00001-of-00003.safetensors",
                                                  "model.layers.9.ghost.weight", "absent")):
        Checkpoint(folder)


@pytest.mark.parametrize("text", ["not json", '{"metadata": {}}', "[]"])
def test_bad_index(sharded, text):
    folder, _ = sharded
    (folder / st.INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=msg(st.INDEX_NAME)):
        Checkpoint(folder)


def test_same_tensor_in_two_files(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=msg("'x'", "two files", "a.safetensors", "b.safetensors")):
        Checkpoint(tmp_path)


def test_no_safetensors_files(tmp_path):
    with pytest.raises(CheckpointError, match=msg(tmp_path, "no *.safetensors")):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=msg(tmp_path / "nope")):
        Checkpoint(tmp_path / "nope")


def test_tensor_missing(sharded):
    folder, _ = sharded
    ckpt = Checkpoint(folder)
    assert "model.layers.5.mlp.gate.weight" not in ckpt
    for call in (ckpt.get, ckpt.require, ckpt.info):
        with pytest.raises(CheckpointError, match=msg(folder, "'model.layers.5.mlp.gate.weight'", "missing")):
            call("model.layers.5.mlp.gate.weight")


@pytest.mark.parametrize("name, asked, found", [
    ("model.norm.weight", dict(dtype=("BF16", "F16")), ("expected dtype BF16 or F16", "found F32")),
    ("lm_head.weight", dict(dtype="BF16", shape=(163840, 7168)), ("expected shape (163840, 7168)", "found (64, 32)")),
])
def test_require_names_the_mismatch(sharded, name, asked, found):
    folder, _ = sharded
    ckpt = Checkpoint(folder)
    info = ckpt.info(name)
    with pytest.raises(CheckpointError, match=msg(info.path, f"'{name}'", *found)):
        ckpt.require(name, **asked)
    assert ckpt.require("model.norm.weight", dtype="F32", shape=(32,)) == ckpt.info("model.norm.weight")
    assert ckpt.stats.bytes_viewed == 0  # require looks at headers only


def test_read_and_read_rows_copy_by_pread(tmp_path):
    emb = random_array("BF16", (50, 24))
    write_safetensors(tmp_path / "model.safetensors", {"emb": emb, "v": random_array("F32", (7,))})
    ckpt = Checkpoint(tmp_path)
    rows = [3, 0, 49, 3]
    got = ckpt.read_rows("emb", rows)
    assert got.dtype == emb.dtype and got.shape == (4, 24)
    assert same_bits(got, emb[rows])
    assert same_bits(ckpt.read("emb"), emb) and mmap_base(ckpt.read("v")) is None
    with pytest.raises(IndexError, match="row out of range"):
        ckpt.read_rows("emb", [50])
    with pytest.raises(CheckpointError, match="needs a 2-D tensor"):
        ckpt.read_rows("v", [0])
