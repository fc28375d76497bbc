"""Persistent KV: a conversation's latent cache on disk, so a restart continues it without a re-prefill.

One safetensors file per conversation in user_cache_dir("kimi-desktop")/kv, named by a hash of the
token ids it covers; a later turn that extends a file's tokens replaces it. Tensors: "tokens" I64 [n],
"kv.{l}" [n, R] and "pe.{l}" [n, P] (BF16 for a bf16 cache, F32 for fp32). Metadata: format version,
the model's fingerprint (config.json, shard index, each shard's name, size and header: no tensor data),
dtype, layers, ranks, token count and the token ids' sha256. Files are untrusted on the way in: any
defect (foreign model, truncation, bad header, shape / dtype / token mismatch) is a KVFileError, which
the store logs once and answers by skipping the file (foreign model) or deleting it (damaged).
Writes are atomic (temp file in the same folder, fsync, os.replace); a byte budget evicts the least
recently used files (mtime, touched on every restore).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from kimi_desktop.notices import log
from kimi_desktop.offload.safetensors import CheckpointError, SafetensorsFile, write_safetensors

__all__ = ["KVFileError", "KVStore", "KVEntry", "default_kv_dir", "model_fingerprint", "clear_kv_cache",
           "read_kv_file", "FORMAT_VERSION", "SUFFIX"]

FORMAT_VERSION = "1"
SUFFIX = ".kv.safetensors"
_HEADER_LIMIT = 100 * 1024 * 1024           # as the safetensors reader's: real headers are a few MB
_CODES = {"bf16": "BF16", "fp32": "F32"}    # cache dtype -> safetensors code of its tensors


class KVFileError(ValueError):
    """A KV file that cannot be used: damaged, from another model, or not what the cache expects."""


def default_kv_dir() -> Path:
    import platformdirs
    return Path(platformdirs.user_cache_dir("kimi-desktop")) / "kv"


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over config.json, the shard index and every shard's name, size and header bytes."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        p = folder / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"-") + b"\0")
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            header = raw + f.read(min(n, _HEADER_LIMIT))
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode() + header)
    return h.hexdigest()


def tokens_hash(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).hexdigest()


@dataclass
class KVEntry:
    path: Path
    tokens: np.ndarray          # int64 [n]
    nbytes: int                 # file size


def _check_meta(meta: dict, path: Path, fingerprint: str, shape: tuple[int, int, int, str] | None) -> None:
    if meta.get("format") != "kimi-desktop-kv" or meta.get("version") != FORMAT_VERSION:
        raise KVFileError(f"{path}: not a kimi-desktop KV file of format version {FORMAT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise KVFileError(f"{path}: written for another model (fingerprint differs)")
    if shape is not None:
        want = dict(zip(("layers", "r", "p", "dtype"), (str(x) for x in shape)))
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise KVFileError(f"{path}: cache layout {got} does not match this model's {want}")


def _read_tokens(f: SafetensorsFile, meta: dict, path: Path) -> np.ndarray:
    info = f.tensors.get("tokens")
    if info is None or info.dtype != "I64" or len(info.shape) != 1:
        raise KVFileError(f"{path}: no 1-D I64 'tokens' tensor")
    tokens = np.array(f.get("tokens"))
    if str(tokens.size) != meta.get("n_tokens") or tokens_hash(tokens) != meta.get("tokens_sha256"):
        raise KVFileError(f"{path}: token ids do not match the file's metadata")
    if not path.name.startswith(meta["tokens_sha256"][:32]):
        raise KVFileError(f"{path}: file name does not match its token ids")
    return tokens


def read_kv_file(path: str | os.PathLike, fingerprint: str, layout: tuple[int, int, int, str] | None = None,
                 tensors: bool = True):
    """Validate a KV file -> (tokens int64 [n], kv list [n, R], pe list [n, P]) in the storage dtype
    (bf16 as uint16 bits), copies; with tensors=False only (tokens, None, None). layout: (layers, r, p,
    dtype) the cache expects. Any defect raises KVFileError (never another exception)."""
    path = Path(path)
    try:
        with SafetensorsFile(path) as f:
            meta = f.metadata
            _check_meta(meta, path, fingerprint, layout)
            tokens = _read_tokens(f, meta, path)
            if not tensors:
                return tokens, None, None
            return (tokens,) + _read_tensors(f, meta, path, tokens.size)
    except CheckpointError as e:
        raise KVFileError(str(e)) from None
    except (OSError, MemoryError) as e:
        raise KVFileError(f"{path}: cannot read: {e}") from None


def _read_tensors(f: SafetensorsFile, meta: dict, path: Path, n: int):
    try:
        layers, r, p = int(meta["layers"]), int(meta["r"]), int(meta["p"])
        code = _CODES[meta["dtype"]]
    except (KeyError, ValueError):
        raise KVFileError(f"{path}: metadata lacks a valid layers / r / p / dtype") from None
    out = ([], [])
    for name, width, store in (("kv", r, out[0]), ("pe", p, out[1])):
        for layer in range(layers):
            info = f.tensors.get(f"{name}.{layer}")
            if info is None or info.dtype != code or info.shape != (n, width):
                found = None if info is None else f"{info.dtype} {info.shape}"
                raise KVFileError(f"{path}: tensor {name}.{layer}: expected {code} {(n, width)}, found {found}")
            a = np.array(f.get(f"{name}.{layer}"))
            store.append(a.view(np.uint16) if code == "BF16" else a)
    if len(f.tensors) != 1 + 2 * layers:
        raise KVFileError(f"{path}: unexpected tensors besides tokens, kv.* and pe.*")
    return out


class KVStore:
    """The KV files of one model in one folder, within a byte budget (see the module docstring)."""

    def __init__(self, fingerprint: str, layout: tuple[int, int, int, str], folder: str | os.PathLike | None = None,
                 budget_bytes: int = 8 << 30):
        self.fingerprint, self.layout = fingerprint, tuple(layout)
        self.folder = Path(folder) if folder is not None else default_kv_dir()
        self.budget = int(budget_bytes)
        self._reported: set[str] = set()
        self.entries: dict[Path, KVEntry] = {}
        self._scan()

    def _report(self, e: Exception, path: Path) -> None:
        if str(path) not in self._reported:
            self._reported.add(str(path))
            log.warning(f"ignoring a KV cache file: {e}")

    def _scan(self) -> None:
        if not self.folder.is_dir():
            return
        for p in sorted(self.folder.glob("*" + SUFFIX)):
            self._index(p)

    def _index(self, p: Path) -> None:
        try:
            tokens, _, _ = read_kv_file(p, self.fingerprint, self.layout, tensors=False)
        except KVFileError as e:
            self._reject(p, e)
            return
        self.entries[p] = KVEntry(p, tokens, p.stat().st_size)

    def _reject(self, p: Path, e: KVFileError) -> None:
        """Log once; a file of another model (or layout) stays for that model, a damaged one goes."""
        self._report(e, p)
        self.entries.pop(p, None)
        if "another model" not in str(e) and "does not match this model" not in str(e):
            _unlink(p)

    @property
    def disk_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def best(self, prompt) -> tuple[int, KVEntry | None]:
        """The file sharing the longest token prefix with `prompt`: (common tokens, entry)."""
        from kimi_desktop.runtime.generate import common_prefix

        best, found = 0, None
        for e in self.entries.values():
            n = common_prefix(e.tokens, prompt)
            if n > best:
                best, found = n, e
        return best, found

    def load(self, entry: KVEntry):
        """(tokens list, kv, pe) of an entry, fully validated; None (logged, file handled) if unusable."""
        try:
            tokens, kv, pe = read_kv_file(entry.path, self.fingerprint, self.layout)
            if not np.array_equal(tokens, entry.tokens):
                raise KVFileError(f"{entry.path}: token ids changed since the folder was read")
        except KVFileError as e:
            self._reject(entry.path, e)
            return None
        try:
            os.utime(entry.path)                # most recently used
        except OSError:
            pass
        return [int(t) for t in tokens], kv, pe

    def save(self, tokens, kv, pe) -> Path | None:
        """Write a cache state atomically, drop the files it extends, evict to the budget."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size == 0 or self.budget <= 0:
            return None
        layers, r, p, dtype = self.layout
        digest = tokens_hash(tokens)
        path = self.folder / f"{digest[:32]}{SUFFIX}"
        tensors = {"tokens": tokens}
        for name, store in (("kv", kv), ("pe", pe)):
            for layer, a in enumerate(store):
                a = np.ascontiguousarray(a)
                tensors[f"{name}.{layer}"] = a.view(ml_dtypes.bfloat16) if dtype == "bf16" else a
        meta = {"format": "kimi-desktop-kv", "version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "layers": str(layers), "r": str(r), "p": str(p), "dtype": dtype,
                "n_tokens": str(tokens.size), "tokens_sha256": digest}
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_safetensors(path, tensors, meta)
        from kimi_desktop.runtime.generate import common_prefix
        for other in list(self.entries.values()):      # the same conversation's earlier turns
            if other.path != path and common_prefix(other.tokens, tokens) == other.tokens.size:
                self._drop(other.path)
        self.entries[path] = KVEntry(path, tokens, path.stat().st_size)
        self.evict(keep=path)
        return path if path in self.entries else None

    def _drop(self, p: Path) -> None:
        self.entries.pop(p, None)
        _unlink(p)

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used files until the store fits its budget."""
        def mtime(e):
            try:
                return e.path.stat().st_mtime
            except OSError:
                return 0.0
        order = sorted(self.entries.values(), key=lambda e: (e.path == keep, mtime(e)))   # keep goes last
        for e in order:
            if self.disk_bytes <= self.budget:
                break
            self._drop(e.path)

    def clear(self) -> int:
        freed = clear_kv_cache(self.folder)
        self.entries.clear()
        return freed


def _atomic_safetensors(path: Path, tensors: dict, meta: dict) -> None:
    """write_safetensors to a temp name in the same folder, fsync it, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_safetensors(tmp, tensors, meta)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)                    # the rename itself survives a power cut
        finally:
            os.close(fd)
    except OSError:
        pass


def _unlink(p: Path) -> int:
    try:
        size = p.stat().st_size
        p.unlink()
        return size
    except OSError:
        return 0


def clear_kv_cache(folder: str | os.PathLike | None = None) -> int:
    """Delete every KV file (and leftover temp file) in the folder (default: the user's); bytes freed."""
    folder = Path(folder) if folder is not None else default_kv_dir()
    if not folder.is_dir():
        return 0
    freed = 0
    for p in folder.iterdir():
        if p.is_file() and (p.name.endswith(SUFFIX) or p.name.endswith(".tmp")):
            freed += _unlink(p)
    return freed

