"""Safetensors reading (header-only validation, zero-copy mmap views) and writing.

File layout: 8-byte little-endian header length N, N bytes of JSON header, then the data region.
The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} with offsets
relative to the start of the data region; "__metadata__" holds str -> str.

Opening a file or a checkpoint folder reads only headers; tensor bytes are touched only when a
caller reads from a view returned by get(). The project assumes a little-endian host (the views
reinterpret the file's little-endian bytes directly).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

def _umask_mode() -> int:
    """0o666 less the process umask: what a plain open() would have created."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Write `path` through a temp file in its folder, renamed into place on success: readers never
    see a torn file, and a failure leaves nothing behind. Created with the umask's usual mode."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)                    # mkstemp makes it private; weights are not
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

__all__ = [
    "CheckpointError", "TensorInfo", "SafetensorsFile", "Checkpoint", "ReadStats",
    "TensorSpec", "write_safetensors", "write_checkpoint", "specs_from_arrays", "dtype_code",
    "DTYPES", "INDEX_NAME",
]

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few MB at most

# safetensors dtype code -> numpy dtype (explicitly little-endian, as stored)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or not what the model expects."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str               # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    start: int               # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def dtype_code(dtype: np.dtype) -> str:
    """Inverse of DTYPES; big-endian numpy dtypes map to their little-endian code."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
    for code, dt in DTYPES.items():
        if dt == dtype:
            return code
    raise ValueError(f"numpy dtype {dtype} has no safetensors code")


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    return DTYPES[dtype].itemsize * math.prod(shape)


# --------------------------------------------------------------------------- reading

def _read_exactly(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class SafetensorsFile:
    """One .safetensors file. Construction reads and validates the header only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        self._lock = threading.Lock()  # get() may be called from reader threads
        try:
            f = open(self.path, "rb", buffering=0)  # unbuffered: no read-ahead into the data
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror}") from None
        # The file is closed again at once; the mmap (if ever needed) is made from a fresh fd,
        # so 62 open shards cost no file descriptors.
        with f:
            size = os.fstat(f.fileno()).st_size  # the data region's length, without reading it
            header = self._read_header(f, size)
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise CheckpointError(f"{self.path}: __metadata__ must map str to str")
        self.tensors: dict[str, TensorInfo] = self._parse_entries(header, size)

    def _read_header(self, f, size: int) -> dict:
        if size < 8:
            raise CheckpointError(f"{self.path}: file is {size} bytes, too short for the 8-byte header length")
        n = int.from_bytes(_read_exactly(f, 8), "little")
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{self.path}: absurd header length {n} (limit {MAX_HEADER_BYTES}); "
                                  "not a safetensors file?")
        if 8 + n > size:
            raise CheckpointError(f"{self.path}: absurd header length {n}: exceeds the file's {size} bytes "
                                  "(truncated, or not a safetensors file)")
        self.data_start = 8 + n
        raw = _read_exactly(f, n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: short read of header ({len(raw)} of {n} bytes)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:       # bad UTF-8 / JSON, a 5000-digit int, deep nesting
            raise CheckpointError(f"{self.path}: header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is a JSON {type(header).__name__}, expected an object")
        return header

    def _parse_entries(self, header: dict, size: int) -> dict[str, TensorInfo]:
        data_len = size - self.data_start
        spans = []  # (begin, end, name), relative to data start
        parsed = {}  # name -> (dtype, shape)
        for name, entry in header.items():
            where = f"{self.path}: tensor '{name}'"
            if not isinstance(entry, dict):
                raise CheckpointError(f"{where}: header entry is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if not isinstance(dtype, str) or dtype not in DTYPES:     # a list is unhashable
                raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise CheckpointError(f"{where}: shape must be a list of non-negative ints, found {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(type(o) is int and o >= 0 for o in offsets)):
                raise CheckpointError(f"{where}: data_offsets must be [begin, end], found {offsets!r}")
            begin, end = offsets
            if end < begin:
                raise CheckpointError(f"{where}: data_offsets out of order: begin {begin} > end {end}")
            expected = _nbytes(dtype, shape)
            if end - begin != expected:
                raise CheckpointError(
                    f"{where}: data_offsets {offsets} span {end - begin} bytes, expected {expected} "
                    f"for {dtype} {tuple(shape)}")
            spans.append((begin, end, name))
            parsed[name] = (dtype, tuple(shape))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(
                    f"{self.path}: tensor '{n1}' bytes [{b1}, {e1}) overlap tensor '{n0}' bytes [{b0}, {e0})")
        if spans:
            b, e, name = max(spans, key=lambda s: s[1])
            if e > data_len:
                raise CheckpointError(
                    f"{self.path}: file is truncated: tensor '{name}' ends at data byte {e} "
                    f"but the data region has only {data_len} bytes ({size} bytes in the file)")
        tensors = {}
        for begin, end, name in spans:  # file order
            dtype, shape = parsed[name]
            tensors[name] = TensorInfo(name, dtype, shape, self.path,
                                       self.data_start + begin, self.data_start + end)
        return tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        """Zero-copy, read-only view of a tensor (maps the file on first use; reads nothing)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        mm = self._map()
        if info.end > len(mm):  # the file shrank after the header was validated
            raise CheckpointError(f"{self.path}: file is truncated: tensor '{name}' ends at byte "
                                  f"{info.end} but the file now has {len(mm)} bytes")
        count = math.prod(info.shape)
        arr = np.frombuffer(mm, dtype=info.np_dtype, count=count, offset=info.start)
        return arr.reshape(info.shape)

    def _map(self) -> mmap.mmap:
        with self._lock:
            if self._mmap is None:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._mmap

    def close(self) -> None:
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still alive: the map is unmapped when the last one goes

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


@dataclass
class ReadStats:
    """What get() has handed out: proves opening a checkpoint reads no tensor data."""
    tensors_viewed: int = 0
    bytes_viewed: int = 0


class Checkpoint:
    """A checkpoint folder: model.safetensors.index.json + shards, or every *.safetensors in it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.stats = ReadStats()
        self.files: dict[str, SafetensorsFile] = {}  # shard file name -> file
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder (no such directory)")
        index_path = self.folder / INDEX_NAME
        try:
            if index_path.exists():
                weight_map = self._read_index(index_path)
                shard_names = sorted(set(weight_map.values()))
            else:
                weight_map = None
                shard_names = sorted(p.name for p in self.folder.glob("*.safetensors") if p.is_file())
                if not shard_names:
                    raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX_NAME}")
            for shard in shard_names:
                self.files[shard] = SafetensorsFile(self.folder / shard)
            self._tensors = self._collect(weight_map, index_path)
        except BaseException:
            self.close()
            raise

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: expected an object with a 'weight_map' object")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CheckpointError(
                    f"{index_path}: tensor '{name}' maps to {shard!r}, expected a file name in the folder")
            if not (self.folder / shard).is_file():
                raise CheckpointError(
                    f"{index_path}: shard file '{shard}' (holding tensor '{name}') is missing from {self.folder}")
        return weight_map

    def _collect(self, weight_map: dict[str, str] | None, index_path: Path) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for f in self.files.values():
            for name, info in f.tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{self.folder}: tensor '{name}' is in two files: {tensors[name].path.name} "
                        f"and {f.path.name}")
                tensors[name] = info
        for name, shard in (weight_map or {}).items():
            info = tensors.get(name)
            if info is None or info.path.name != shard:
                found = f"found in {info.path.name}" if info else "absent from every shard"
                raise CheckpointError(
                    f"{self.folder / shard}: tensor '{name}' listed in {index_path.name} is not in "
                    f"this shard ({found})")
        return tensors

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        return info

    def require(self, name: str, dtype: str | tuple[str, ...] | None = None,
                shape: tuple[int, ...] | None = None) -> TensorInfo:
        """Check a tensor exists with an allowed dtype and the given shape (header only)."""
        info = self.info(name)
        allowed = (dtype,) if isinstance(dtype, str) else dtype
        if allowed is not None and info.dtype not in allowed:
            raise CheckpointError(f"{info.path}: tensor '{name}': expected dtype {' or '.join(allowed)}, "
                                  f"found {info.dtype}")
        if shape is not None and info.shape != tuple(shape):
            raise CheckpointError(f"{info.path}: tensor '{name}': expected shape {tuple(shape)}, "
                                  f"found {info.shape}")
        return info

    def get(self, name: str) -> np.ndarray:
        info = self.info(name)
        arr = self.files[info.path.name].get(name)
        self.stats.tensors_viewed += 1
        self.stats.bytes_viewed += info.nbytes
        return arr

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Rows of a 2-D tensor (embedding lookups) by pread: [len(rows), cols], a fresh array.

        Faulting one row through the mapping would make the kernel read around it by the
        device's whole read-ahead window (8 MiB on the bench disk) for every new token.
        """
        info = self.info(name)
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.path}: tensor '{name}': read_rows needs a 2-D tensor, found {info.shape}")
        n_rows, cols = info.shape
        row_bytes = info.nbytes // n_rows if n_rows else 0
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise IndexError(f"{info.path}: tensor '{name}': row out of range 0..{n_rows - 1}")
        out = np.empty((rows.size, cols), dtype=info.np_dtype)
        buf = out.view(np.uint8).reshape(rows.size, row_bytes)
        with open(info.path, "rb", buffering=0) as f:
            for i, r in enumerate(rows):
                f.seek(info.start + int(r) * row_bytes)         # a private file: portable, no preadv
                if f.readinto(buf[i]) != row_bytes:
                    raise CheckpointError(f"{info.path}: tensor '{name}': file ends inside row {int(r)}")
        self.stats.tensors_viewed += 1
        self.stats.bytes_viewed += rows.size * row_bytes
        return out

    def read(self, name: str) -> np.ndarray:
        """A resident copy in anonymous memory (huge pages where the kernel allows), filled by preadv.

        For weights used by every token: file-backed mmap pages can't use transparent huge pages,
        and their TLB misses cost ~20% of read bandwidth in GEMV; reading with preadv (not through
        the mapping) also keeps the file's pages out of this process's RSS. Also for tiny tensors
        inside expert data (weight_shape): a fault on the mapping reads around it by the device's
        whole read-ahead window (8 MiB on the bench disk), a pread only the pages it needs.
        """
        info = self.info(name)
        # small tensors (weight_shape, norms) in ordinary memory; a mapping per tensor is for big ones
        buf = bytearray(info.nbytes) if info.nbytes < SMALL_READ else anonymous_buffer(info.nbytes)
        with open(info.path, "rb", buffering=0) as f:
            done = 0
            view = memoryview(buf)
            while done < info.nbytes:
                f.seek(info.start + done)                        # a private file: portable, no preadv
                n = f.readinto(view[done:info.nbytes])
                if n <= 0:
                    raise CheckpointError(f"{info.path}: tensor '{name}': file ends inside its data")
                done += n
        self.stats.tensors_viewed += 1
        self.stats.bytes_viewed += info.nbytes
        arr = np.frombuffer(buf, dtype=info.np_dtype, count=math.prod(info.shape)).reshape(info.shape)
        arr.flags.writeable = False
        return arr

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.folder)!r}, {len(self._tensors)} tensors in {len(self.files)} files)"


SMALL_READ = 1 << 20


def anonymous_buffer(nbytes: int, populate: bool = False) -> mmap.mmap:
    """Page-aligned anonymous memory, advised to use transparent huge pages.

    populate: fault every page in now. A read into never-touched memory faults (and zeroes) its
    pages inside the read: O_DIRECT into fresh memory measured 1.3 GB/s and 0.6 s of system CPU
    per GB here, into populated memory 2.3 GB/s and 0.03 s per GB.
    """
    buf = (mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
           if hasattr(mmap, "MAP_ANONYMOUS") else mmap.mmap(-1, max(nbytes, 1)))     # Windows: no flags
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    if populate:
        np.frombuffer(buf, np.uint8)[::mmap.PAGESIZE] = 0     # one write per page faults it in
    return buf


# --------------------------------------------------------------------------- writing

@dataclass
class TensorSpec:
    """A tensor to write: declared up front (for the header), produced by make() when written."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data region starts 8-aligned
    return len(raw).to_bytes(8, "little") + raw


def _write_file(path: Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> None:
    """Header from the specs, then each tensor's bytes, through atomic_file (no torn files)."""
    with atomic_file(path) as f:
        f.write(_header_bytes(specs, metadata))
        for s in specs:
            arr = s.make()
            want = DTYPES[s.dtype]
            if not isinstance(arr, np.ndarray) or arr.dtype != want or arr.shape != tuple(s.shape):
                found = (f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray)
                         else type(arr).__name__)
                raise CheckpointError(f"{path}: tensor '{s.name}': make() must return {want} "
                                      f"{tuple(s.shape)} ({s.dtype}), found {found}")
            if arr.size:
                # uint8 view: the buffer protocol cannot export ml_dtypes' bf16 / fp8
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write in-memory arrays to one safetensors file, in mapping order."""
    path = Path(path)
    specs = specs_from_arrays(tensors)
    _check_specs(specs, path)
    _write_file(path, specs, metadata)
    return path


def _check_specs(specs: Sequence[TensorSpec], where: Path) -> None:
    seen = set()
    for s in specs:
        if s.name in seen or s.name == "__metadata__":
            raise CheckpointError(f"{where}: tensor name '{s.name}' is duplicated or reserved")
        seen.add(s.name)
        if s.dtype not in DTYPES:
            raise CheckpointError(f"{where}: tensor '{s.name}': unknown dtype {s.dtype!r}")
        s.shape = tuple(int(d) for d in s.shape)
        if any(d < 0 for d in s.shape):
            raise CheckpointError(f"{where}: tensor '{s.name}': negative dimension in {s.shape}")


def _split(sizes: Sequence[int], shards: int) -> list[int]:
    """Boundaries [0, b1, ..., n] cutting sizes (in order) into `shards` non-empty runs of ~equal bytes."""
    n = len(sizes)
    cum = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    total = int(cum[-1])
    bounds = [0]
    for k in range(1, shards):
        target = total * k / shards
        i = int(np.searchsorted(cum, target))  # first cut with cum >= target
        if i > 0 and target - cum[i - 1] < cum[min(i, n)] - target:
            i -= 1
        bounds.append(min(max(i, bounds[-1] + 1), n - (shards - k)))
    bounds.append(n)
    return bounds


def write_checkpoint(folder: str | os.PathLike, specs: Sequence[TensorSpec], shards: int = 1,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write specs as `shards` files model-0000i-of-0000N.safetensors plus the index.

    Holds at most one tensor in memory at a time (make() is called as each tensor is written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    if not 1 <= shards <= max(1, len(specs)):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(specs)}), got {shards}")
    _check_specs(specs, folder)
    bounds = _split([s.nbytes for s in specs], shards)
    paths, weight_map = [], {}
    for k in range(shards):
        path = folder / f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = specs[bounds[k]:bounds[k + 1]]
        _write_file(path, part, metadata)
        weight_map.update((s.name, path.name) for s in part)
        paths.append(path)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    with atomic_file(folder / INDEX_NAME, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return paths


def specs_from_arrays(tensors: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    """TensorSpecs for arrays already in memory (dtype code taken from the array)."""
    specs = []
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        code = dtype_code(arr.dtype)
        arr = arr.astype(DTYPES[code], copy=False)  # to little-endian if it was not
        specs.append(TensorSpec(name, code, arr.shape, lambda a=arr: a))
    return specs
