"""K2-family models already in the Hugging Face cache, found offline (huggingface_hub.scan_cache_dir).

    for m in find_models():              # or find_models(cache_dir)
        m.repo_id, m.revision, m.path, m.size_bytes, m.kind     # kind: "native" | "llama.cpp"

- "native": a snapshot folder with config.json whose model_type (or text_config.model_type) is kimi_k2
  or deepseek_v3, and its safetensors shards; a snapshot missing a shard its index names (a download
  in progress) is left out. size_bytes is the snapshot's size on disk.
- "llama.cpp": a .gguf file whose header says general.architecture deepseek2 (how llama.cpp names
  K2 / DeepSeek-V3); of a split GGUF (NAME-00001-of-00013.gguf) only the first part is listed, with
  the size of all parts.
The cache folder is $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default, read at call time.
An empty or missing cache is an empty list; unreadable entries are skipped. No network, ever.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import NamedTuple

__all__ = ["FoundModel", "find_models", "hf_cache_dir", "gguf_architecture", "K2_MODEL_TYPES"]

K2_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
GGUF_ARCHS = ("deepseek2",)
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class FoundModel(NamedTuple):
    repo_id: str
    revision: str
    path: Path              # the snapshot folder (native) or the .gguf file (llama.cpp)
    size_bytes: int
    kind: str               # "native" | "llama.cpp"


def hf_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env)
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def _is_k2_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict):
        return False
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return cfg.get("model_type") in K2_MODEL_TYPES or text.get("model_type") in K2_MODEL_TYPES


def _shards_complete(folder: Path, present: set[str]) -> bool:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return True
    try:
        wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return wanted <= present


def gguf_architecture(path: str | os.PathLike, max_kv: int = 64) -> str | None:
    """general.architecture from a GGUF header (reads a few KB; None if not a readable GGUF)."""
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # type -> bytes

    def read(f, n):
        b = f.read(n)
        if len(b) != n:
            raise EOFError
        return b

    def string(f):
        (n,) = struct.unpack("<Q", read(f, 8))
        if n > 1 << 20:
            raise ValueError("absurd string length")
        return read(f, n).decode("utf-8", "replace")

    def skip(f, t):
        if t in scalar:
            read(f, scalar[t])
        elif t == 8:
            string(f)
        elif t == 9:
            et, count = struct.unpack("<IQ", read(f, 12))
            if et in scalar:
                f.seek(scalar[et] * count, 1)
            else:
                for _ in range(count):
                    skip(f, et)
        else:
            raise ValueError(f"unknown GGUF value type {t}")

    try:
        with open(path, "rb") as f:
            if read(f, 4) != b"GGUF":
                return None
            (version,) = struct.unpack("<I", read(f, 4))
            if version < 2:
                return None
            _, n_kv = struct.unpack("<QQ", read(f, 16))
            for _ in range(min(n_kv, max_kv)):
                key = string(f)
                (t,) = struct.unpack("<I", read(f, 4))
                if key == "general.architecture" and t == 8:
                    return string(f)
                skip(f, t)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def find_models(cache_dir: str | os.PathLike | None = None) -> list[FoundModel]:
    """Every K2-family model in the Hugging Face cache (see the module docstring), sorted by repo."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    root = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    try:
        info = scan_cache_dir(root)
    except (CacheNotFound, OSError, ValueError):
        return []
    found: list[FoundModel] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            snap = Path(rev.snapshot_path)
            rel = {str(Path(f.file_path).relative_to(snap)): f for f in rev.files}
            shards = {n for n in rel if n.endswith(".safetensors") and "/" not in n}
            if "config.json" in rel and shards and _is_k2_config(snap / "config.json") \
                    and _shards_complete(snap, shards):
                found.append(FoundModel(repo.repo_id, rev.commit_hash, snap, int(rev.size_on_disk), "native"))
            for n, f in sorted(rel.items()):
                if not n.endswith(".gguf"):
                    continue
                m = SPLIT_RE.search(n)
                if m and int(m.group(1)) != 1:
                    continue
                size = int(f.size_on_disk)
                if m:
                    stem = n[:m.start()]
                    size = sum(int(g.size_on_disk) for k, g in rel.items()
                               if k.startswith(stem) and SPLIT_RE.search(k))
                if gguf_architecture(f.file_path) in GGUF_ARCHS:
                    found.append(FoundModel(repo.repo_id, rev.commit_hash, Path(f.file_path), size, "llama.cpp"))
    found.sort(key=lambda m: (m.repo_id, m.kind, str(m.path)))
    return found
