"""`kimi-desktop prepare MODEL`: an optional repack of the routed experts, one aligned block each.

Files (written into the checkpoint folder, or out_dir):
  experts.kdpack       raw data: expert blocks back to back, block i at byte i * block_bytes
  experts.kdpack.json  the index (below); written last, so its presence means a complete pack

Block layout (format "kimi-desktop-expert-pack", version 1): the modules gate_proj, up_proj,
down_proj in that order; within a module its tensors in the order int4: weight_packed,
weight_scale | fp8: weight, weight_scale_inv | plain: weight. Each tensor starts at a multiple of
PART_ALIGN (64) bytes from the block start; gaps are zero; block_bytes is the total rounded up to
4 KiB. Blocks are ordered layer-major: index = layer_index * n_experts + e, layer_index over the
MoE layers in ascending order. Every tensor's offset, dtype and shape is listed in the index.

Byte format (the index's "byte_format"; pluggable via BYTE_FORMATS): "stored" = each tensor's bytes
exactly as in the checkpoint (compressed-tensors nibble order: nibble j of each int32 is column
8k+j). A kernel-friendly repacked order (e.g. Q4_0-style halves per group) is added as another
ByteFormat with its own encode (checkpoint bytes -> block bytes) and build (block views -> Linear).

Staleness: the index records a fingerprint of the source experts (tensor names, dtypes, shapes,
file names and byte offsets, shard sizes, quantization settings). ExpertStore uses the pack only
when the fingerprint matches the checkpoint it opened; otherwise it reads the checkpoint
(pack="auto") and says why in stats()["pack_note"]. The original checkpoint is never modified.
The pack duplicates the expert bytes (~571 GB for K2): use out_dir for another disk.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np

from .expert_io import SourceFile, read_exact
from .expert_layout import MODULES, PACK_INDEX, PAGE, ExpertGeometry, PartSpec, expert_parts, round_up
from .formats import QuantConfig, build_linear
from .safetensors import DTYPES, Checkpoint, CheckpointError

__all__ = ["prepare_checkpoint", "open_pack", "PackInfo", "PackError", "ByteFormat", "BYTE_FORMATS",
           "PACK_DATA", "PACK_INDEX", "PART_ALIGN", "pack_layout", "expert_fingerprint", "register"]

PACK_DATA = "experts.kdpack"
FORMAT = "kimi-desktop-expert-pack"
VERSION = 1
PART_ALIGN = 64


class PackError(CheckpointError):
    """An expert pack is missing, stale, truncated or of an unknown format."""


@dataclass(frozen=True)
class ByteFormat:
    """How tensors are stored in a block. encode: (spec, stored bytes as uint8) -> uint8 of spec.nbytes;
    build: ({role: view}, (out, in), qcfg) -> Linear."""
    name: str
    description: str
    encode: Callable[[PartSpec, np.ndarray], np.ndarray] = field(repr=False)
    build: Callable = field(repr=False)


BYTE_FORMATS: dict[str, ByteFormat] = {
    "stored": ByteFormat("stored", "checkpoint bytes unchanged (compressed-tensors nibble order)",
                         lambda spec, raw: raw, build_linear),
}


def pack_layout(specs: list[PartSpec]) -> tuple[list[tuple[PartSpec, int]], int]:
    """(spec, offset) in block order, and block_bytes."""
    order = {m: i for i, m in enumerate(MODULES)}
    role_order = {"weight_packed": 0, "weight": 0, "weight_scale": 1, "weight_scale_inv": 1}
    parts, off = [], 0
    for spec in sorted(specs, key=lambda s: (order[s.module], role_order[s.role])):
        off = round_up(off, PART_ALIGN)
        parts.append((spec, off))
        off += spec.nbytes
    return parts, round_up(max(off, 1), PAGE)


def _all_parts(ckpt: Checkpoint, qcfg: QuantConfig, geom: ExpertGeometry):
    """{key: [(spec, info)]}, checking that every expert is stored like the first."""
    out, template = {}, None
    for layer, e in geom.keys():
        parts = expert_parts(ckpt, qcfg, layer, e, geom)
        specs = [p for p, _ in parts]
        if template is None:
            template = specs
        elif specs != template:
            raise CheckpointError(f"{ckpt.folder}: expert {e} of layer {layer} is stored as {specs}, "
                                  f"unlike the first expert ({template})")
        out[(layer, e)] = parts
    return out


def expert_fingerprint(ckpt: Checkpoint, qcfg: QuantConfig, geom: ExpertGeometry) -> str:
    """sha256 of where and how every routed expert tensor is stored (headers only)."""
    h = hashlib.sha256()
    h.update(json.dumps([qcfg.method, qcfg.group_size, qcfg.block_size, geom.hidden, geom.moe_inter,
                         list(geom.layers), [geom.n_experts[x] for x in geom.layers]]).encode())
    pat = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.")
    layers = {str(x) for x in geom.layers}
    lines, paths = [], set()
    for name in ckpt.names():
        m = pat.match(name)
        if m and m.group(1) in layers:
            info = ckpt.info(name)
            lines.append(f"{name}|{info.dtype}|{info.shape}|{info.path.name}|{info.start}|{info.end}\n")
            paths.add(info.path)
    for line in sorted(lines):
        h.update(line.encode())
    for p in sorted(paths):
        h.update(f"{p.name}={os.stat(p).st_size}\n".encode())
    return h.hexdigest()


def _check_weight_shapes(ckpt: Checkpoint, geom: ExpertGeometry, key, parts) -> None:
    layer, e = key
    for spec, _ in parts:
        if spec.role != "weight_packed":
            continue
        name = f"model.layers.{layer}.mlp.experts.{e}.{spec.module}.weight_shape"
        stored = tuple(int(v) for v in ckpt.get(name))
        if stored != geom.shape(spec.module):
            raise CheckpointError(f"{ckpt.info(name).path}: tensor '{name}': expected "
                                  f"{geom.shape(spec.module)} (from config.json), found {stored}")


def prepare_checkpoint(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       byte_format: str = "stored",
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Write experts.kdpack + experts.kdpack.json for a checkpoint folder; returns the index path.

    Atomic: both files are written under temporary names and renamed at the end (the index last),
    so a crash leaves either the previous pack or none. Reads the experts once, sequentially.
    """
    if byte_format not in BYTE_FORMATS:
        raise ValueError(f"unknown byte format {byte_format!r} (known: {', '.join(BYTE_FORMATS)})")
    fmt = BYTE_FORMATS[byte_format]
    model_dir = Path(model_dir)
    geom, qcfg = ExpertGeometry.from_folder(model_dir)
    if not geom.layers:
        raise CheckpointError(f"{model_dir / 'config.json'}: the model has no routed experts to pack")
    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    with Checkpoint(model_dir) as ckpt:
        parts = _all_parts(ckpt, qcfg, geom)
        keys = list(geom.keys())
        layout, block_bytes = pack_layout([p for p, _ in parts[keys[0]]])
        _check_free_space(out, len(keys) * block_bytes)
        fingerprint = expert_fingerprint(ckpt, qcfg, geom)
        mode = os.stat(parts[keys[0]][0][1].path).st_mode & 0o666 | 0o400   # readable like the checkpoint
        fd_out, tmp_data = tempfile.mkstemp(prefix=f".{PACK_DATA}.", suffix=".tmp", dir=out)
        tmp_index = None
        try:
            try:
                _write_blocks(ckpt, geom, fmt, parts, layout, block_bytes, fd_out, progress)
                os.fchmod(fd_out, mode)                      # not mkstemp's 0600
                os.fsync(fd_out)
            finally:
                os.close(fd_out)
            index = _index_record(geom, fmt, layout, block_bytes, len(keys) * block_bytes,
                                  model_dir, fingerprint)
            tmp_index = _write_index(out, index, mode)
            _commit(out, tmp_data, tmp_index)
            tmp_data = tmp_index = None
        finally:
            for t in (tmp_data, tmp_index):
                if t is not None:
                    try:
                        os.unlink(t)
                    except FileNotFoundError:
                        pass
    return out / PACK_INDEX


def _check_free_space(out: Path, total: int) -> None:
    free = shutil.disk_usage(out).free
    if free < total + (64 << 20):
        raise CheckpointError(f"{out}: the expert pack needs {total / 1e9:.2f} GB, only "
                              f"{free / 1e9:.2f} GB free")


def _write_blocks(ckpt: Checkpoint, geom: ExpertGeometry, fmt: ByteFormat, parts, layout, block_bytes: int,
                  fd_out: int, progress) -> None:
    """Every expert's block, in index order, read from the checkpoint and written to fd_out."""
    files: dict[Path, SourceFile] = {}
    buf = mmap.mmap(-1, block_bytes)                     # zeroed, page-aligned
    mv = memoryview(buf)
    block = np.frombuffer(mv, np.uint8)
    keys = list(geom.keys())
    try:
        for i, key in enumerate(keys):
            if any(p.role == "weight_packed" for p, _ in layout):
                _check_weight_shapes(ckpt, geom, key, parts[key])
            by_spec = {(s.module, s.role): info for s, info in parts[key]}
            for spec, off in layout:
                info = by_spec[(spec.module, spec.role)]
                if info.path not in files:
                    files[info.path] = SourceFile(info.path, direct=False)
                read_exact(files[info.path], mv[off: off + spec.nbytes], info.start)
                if fmt.name != "stored":
                    enc = np.asarray(fmt.encode(spec, block[off: off + spec.nbytes].copy()), np.uint8)
                    block[off: off + spec.nbytes] = enc.reshape(-1)
            done = 0
            while done < block_bytes:
                done += os.write(fd_out, mv[done:])
            if progress is not None:
                progress(i + 1, len(keys))
    finally:
        for f in files.values():
            f.close()


def _index_record(geom: ExpertGeometry, fmt: ByteFormat, layout, block_bytes: int, total: int,
                  model_dir: Path, fingerprint: str) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "byte_format": fmt.name,
        "data_file": PACK_DATA, "data_bytes": total, "block_bytes": block_bytes,
        "alignment": PAGE, "part_alignment": PART_ALIGN, "order": "layer-major",
        "layers": list(geom.layers), "n_experts": {str(k): geom.n_experts[k] for k in geom.layers},
        "hidden_size": geom.hidden, "moe_intermediate_size": geom.moe_inter,
        "parts": [{"module": s.module, "role": s.role, "dtype": s.dtype, "shape": list(s.shape),
                   "offset": off, "nbytes": s.nbytes} for s, off in layout],
        "source": {"folder": str(model_dir.resolve()), "fingerprint": fingerprint},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_index(out: Path, index: dict, mode: int) -> str:
    """The index under a temporary name in out (synced); returns that name."""
    fdi, tmp_index = tempfile.mkstemp(prefix=f".{PACK_INDEX}.", suffix=".tmp", dir=out)
    os.fchmod(fdi, mode)
    with os.fdopen(fdi, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp_index


def _commit(out: Path, tmp_data: str, tmp_index: str) -> None:
    """Rename data then index into place (never an old index next to new data); sync the folder."""
    try:
        os.unlink(out / PACK_INDEX)
    except FileNotFoundError:
        pass
    os.replace(tmp_data, out / PACK_DATA)
    os.replace(tmp_index, out / PACK_INDEX)
    try:
        dfd = os.open(out, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


@dataclass
class PackInfo:
    data_path: Path
    block_bytes: int
    data_bytes: int                              # tensor bytes per expert (without padding)
    parts: list[tuple[PartSpec, int]]
    offsets: dict[tuple[int, int], int]          # (layer, e) -> byte offset of the block
    byte_format: ByteFormat


def open_pack(index_path: str | os.PathLike, ckpt: Checkpoint, qcfg: QuantConfig,
              geom: ExpertGeometry) -> PackInfo:
    """Validate a pack index against the open checkpoint; PackError when it cannot be used."""
    index_path = Path(index_path)
    try:
        idx = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackError(f"{index_path}: unreadable expert pack index: {e}") from None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT or idx.get("version") != VERSION:
        raise PackError(f"{index_path}: not a {FORMAT} version {VERSION} index")
    fmt = BYTE_FORMATS.get(idx.get("byte_format"))
    if fmt is None:
        raise PackError(f"{index_path}: byte format {idx.get('byte_format')!r} is not supported here "
                        f"(known: {', '.join(BYTE_FORMATS)})")
    try:
        layers = [int(x) for x in idx["layers"]]
        counts = {int(k): int(v) for k, v in idx["n_experts"].items()}
        block_bytes, data_bytes = int(idx["block_bytes"]), int(idx["data_bytes"])
        parts = [(PartSpec(p["module"], p["role"], p["dtype"], tuple(int(d) for d in p["shape"])),
                  int(p["offset"])) for p in idx["parts"]]
        data_path = index_path.parent / Path(idx["data_file"]).name
        fingerprint = idx["source"]["fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
        raise PackError(f"{index_path}: malformed index ({type(e).__name__}: {e})") from None
    if layers != list(geom.layers) or counts != {k: geom.n_experts[k] for k in geom.layers}:
        raise PackError(f"{index_path}: packs layers {layers} with {counts} experts; the checkpoint "
                        f"has {list(geom.layers)}")
    if block_bytes % PAGE or any(off % PART_ALIGN or off + s.nbytes > block_bytes or s.dtype not in DTYPES
                                 for s, off in parts):
        raise PackError(f"{index_path}: inconsistent block layout")
    current = expert_fingerprint(ckpt, qcfg, geom)
    if current != fingerprint:
        raise PackError(f"{index_path}: stale: made from a different checkpoint (expert fingerprint "
                        f"{fingerprint[:12]}, checkpoint now {current[:12]}); run `kimi-desktop prepare` again")
    want = sum(counts.values()) * block_bytes
    try:
        size = os.stat(data_path).st_size
    except OSError as e:
        raise PackError(f"{data_path}: expert pack data missing ({e.strerror})") from None
    if size != want or data_bytes != want:
        raise PackError(f"{data_path}: expert pack data is {size} bytes, expected {want} (truncated?)")
    offsets, i = {}, 0
    for layer in layers:
        for e in range(counts[layer]):
            offsets[(layer, e)] = i * block_bytes
            i += 1
    return PackInfo(data_path, block_bytes, sum(s.nbytes for s, _ in parts), parts, offsets, fmt)


# --------------------------------------------------------------------------- command line

def cmd_prepare(args) -> int:
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not args.quiet and (done == total or now - last[0] > 2.0):
            last[0] = now
            print(f"\rpacking experts: {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    t0 = time.monotonic()
    index = prepare_checkpoint(args.model, out_dir=args.out_dir, byte_format=args.format, progress=progress)
    info = json.loads(index.read_text(encoding="utf-8"))
    if not args.quiet:
        print(f"wrote {index.parent / info['data_file']} ({info['data_bytes'] / 1e9:.2f} GB, "
              f"{info['block_bytes']} B per expert) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    print(index)
    return 0


def register(subparsers) -> None:
    """Add `prepare MODEL [--out-dir DIR] [--format stored] [--quiet]` to an argparse subparsers."""
    p = subparsers.add_parser(
        "prepare", help="optional: repack routed experts into one 4 KiB-aligned block each",
        description="Write experts.kdpack (+ .json index) next to the checkpoint (or in --out-dir): "
                    "every routed expert as one 4 KiB-aligned block, so the expert store reads it "
                    "with one aligned request (ideal for O_DIRECT). The checkpoint itself is unchanged "
                    "and keeps working without the pack.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder")
    p.add_argument("--out-dir", default=None, help="write the pack here instead of the checkpoint folder")
    p.add_argument("--format", default="stored", choices=sorted(BYTE_FORMATS),
                   help="byte format of the blocks (default: stored, the checkpoint's own bytes)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_prepare)
