"""Untrusted files: random headers and truncations raise only the readers' own errors (hypothesis)."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_desktop.kv_store import KVFileError, KVStore, read_kv_file
from kimi_desktop.offload.safetensors import CheckpointError, SafetensorsFile

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "I64", "U16", "X", 3]) | _json,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _json,
    "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | _json})
_header = st.dictionaries(st.text(max_size=10), _entry | _json, max_size=5) | _json


def _file(tmp_path, header_bytes: bytes, declared: int | None, tail: bytes):
    p = tmp_path / "f.kv.safetensors"
    n = len(header_bytes) if declared is None else declared
    p.write_bytes(n.to_bytes(8, "little", signed=False) + header_bytes + tail)
    return p


def _both_readers(p):
    try:
        SafetensorsFile(p).close()
    except CheckpointError:
        pass
    try:
        read_kv_file(p, "fp", (2, 8, 4, "bf16"))
    except KVFileError:
        pass


@FUZZ
@given(header=_header, declared=st.none() | st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_random_json_headers(tmp_path, header, declared, tail):
    _both_readers(_file(tmp_path, json.dumps(header).encode(), declared, tail))


@FUZZ
@given(raw=st.binary(max_size=300), declared=st.none() | st.integers(0, 400))
def test_random_bytes(tmp_path, raw, declared):
    _both_readers(_file(tmp_path, raw, declared, b""))


def test_pathological_json(tmp_path):
    for text in ("[" * 100_000, '{"a":' * 50_000, "1" * 5000, '{"__metadata__": {"x": ' + "9" * 5000 + "}}"):
        _both_readers(_file(tmp_path, text.encode(), None, b""))


@FUZZ
@given(data=st.data())
def test_truncations_and_flipped_bytes_of_a_real_kv_file(tmp_path, data):
    folder = tmp_path / "kv"
    if not folder.exists():
        rng = np.random.default_rng(0)
        s = KVStore("fp", (2, 8, 4, "bf16"), folder)
        s.save(list(range(12)), [rng.integers(0, 65535, (12, 8)).astype(np.uint16) for _ in range(2)],
               [rng.integers(0, 65535, (12, 4)).astype(np.uint16) for _ in range(2)])
    good = next(folder.glob("*.kv.safetensors"))
    raw = bytearray(good.read_bytes())
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4))
    for i, b in flips:
        raw[i] = b
    p = tmp_path / "bad.kv.safetensors"
    p.write_bytes(bytes(raw[:cut]))
    _both_readers(p)
