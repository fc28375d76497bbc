"""find_models over a fake Hugging Face cache built here (models--org--name/{blobs,refs,snapshots/REV})."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import gguf
import pytest

from kimi_desktop.model_finder import FoundModel, find_models, gguf_architecture

REV = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache, repo_id: str, files: dict[str, bytes], rev: str = REV, kind: str = "models"):
    """One cached repo the way huggingface_hub lays it out: blobs by hash, snapshot files linking to them."""
    folder = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def config(model_type: str) -> bytes:
    return json.dumps({"model_type": model_type, "architectures": ["DeepseekV3ForCausalLM"]}).encode()


def index(*shards: str) -> bytes:
    return json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}}).encode()


def gguf_bytes(tmp_path, arch: str) -> bytes:
    p = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(p), arch)
    w.add_name("test")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


def gguf_with_arch_late(arch: str) -> bytes:
    """general.architecture after a string and an array (the reader must skip values it does not want)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()
    kv = s("general.name") + struct.pack("<I", 8) + s("late")
    kv += s("tokenizer.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.5, 1.5, 2.5)
    kv += s("tokenizer.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("bc")
    kv += s("general.architecture") + struct.pack("<I", 8) + s(arch)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 4) + kv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    return c


def test_finds_checkpoints_and_ggufs(cache, tmp_path):
    k2 = add_repo(cache, "moonshotai/Kimi-K2-Thinking", {
        "config.json": config("kimi_k2"), "model.safetensors.index.json": index("a.safetensors", "b.safetensors"),
        "a.safetensors": b"A" * 1000, "b.safetensors": b"B" * 500, "tiktoken.model": b"t"})
    v3 = add_repo(cache, "deepseek-ai/DeepSeek-V3", {"config.json": config("deepseek_v3"),
                                                     "model.safetensors": b"x" * 10})
    add_repo(cache, "meta/llama", {"config.json": config("llama"), "model.safetensors": b"y" * 10})
    add_repo(cache, "moonshotai/partial", {"config.json": config("kimi_k2"),
                                           "model.safetensors.index.json": index("a.safetensors", "b.safetensors"),
                                           "a.safetensors": b"only one"})
    add_repo(cache, "someone/no-weights", {"config.json": config("kimi_k2")})
    add_repo(cache, "org/data", {"config.json": config("kimi_k2"), "model.safetensors": b"z"}, kind="datasets")
    ds2 = gguf_bytes(tmp_path, "deepseek2")
    g = add_repo(cache, "unsloth/Kimi-K2-GGUF", {
        "Q2/Kimi-K2-Q2-00001-of-00002.gguf": ds2, "Q2/Kimi-K2-Q2-00002-of-00002.gguf": b"rest" * 10,
        "Kimi-K2-IQ1.gguf": gguf_with_arch_late("deepseek2"), "README.md": b"hi"})
    add_repo(cache, "other/Llama-GGUF", {"llama.gguf": gguf_bytes(tmp_path, "llama")})

    found = find_models()
    assert all(isinstance(m, FoundModel) for m in found)
    by = {(m.repo_id, m.path.name): m for m in found}
    assert set(by) == {("moonshotai/Kimi-K2-Thinking", REV), ("deepseek-ai/DeepSeek-V3", REV),
                       ("unsloth/Kimi-K2-GGUF", "Kimi-K2-Q2-00001-of-00002.gguf"),
                       ("unsloth/Kimi-K2-GGUF", "Kimi-K2-IQ1.gguf")}
    m = by[("moonshotai/Kimi-K2-Thinking", REV)]
    repo_id, revision, path, size, kind = m
    assert (revision, path, kind) == (REV, k2, "native")
    assert size == 1000 + 500 + len(config("kimi_k2")) + len(index("a.safetensors", "b.safetensors")) + 1
    assert by[("deepseek-ai/DeepSeek-V3", REV)].path == v3
    split = by[("unsloth/Kimi-K2-GGUF", "Kimi-K2-Q2-00001-of-00002.gguf")]
    assert split.kind == "llama.cpp" and split.path == g / "Q2" / "Kimi-K2-Q2-00001-of-00002.gguf"
    assert split.size_bytes == len(ds2) + 40                        # both parts


def test_gguf_architecture(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(gguf_bytes(tmp_path, "deepseek2"))
    assert gguf_architecture(p) == "deepseek2"
    p.write_bytes(gguf_with_arch_late("llama"))
    assert gguf_architecture(p) == "llama"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 8)                  # cut short
    assert gguf_architecture(p) is None
    p.write_bytes(b"not a gguf at all")
    assert gguf_architecture(p) is None
    assert gguf_architecture(tmp_path / "missing.gguf") is None


def test_empty_or_missing_cache(tmp_path, monkeypatch):
    assert find_models(tmp_path / "nowhere") == []
    (tmp_path / "empty").mkdir()
    assert find_models(tmp_path / "empty") == []
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert find_models() == []
    add_repo(tmp_path / "home" / "hub", "moonshotai/K2", {"config.json": config("kimi_k2"),
                                                         "model.safetensors": b"w"})
    assert [m.repo_id for m in find_models()] == ["moonshotai/K2"]      # $HF_HOME/hub, read at call time
