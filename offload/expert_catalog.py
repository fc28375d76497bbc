"""Where every routed expert's bytes are (the expert pack if present and current, else the
checkpoint), the files they are read from, and how a slot's bytes become a Linear triple.

Experts are planned lazily (headers only, on first use), so opening a store costs nothing per
expert. slot_bytes = an expert's tensor bytes plus at most 2 pages of alignment slack per tensor,
rounded up to 4 KiB (K2: 24.77 MB + 48 KiB); with an expert pack, the pack's block size.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .expert_io import SourceFile, resolve_reads
from .expert_layout import (MODULES, PACK_INDEX, ExpertGeometry, Plan, expert_parts, plan_block,
                            plan_from_tensors, slot_bound)
from .formats import QuantConfig, build_linear, check_weight_shape
from .safetensors import DTYPES, Checkpoint, CheckpointError

__all__ = ["ExpertCatalog"]


class ExpertCatalog:
    """The plans and source files of one model's routed experts (shared by both store modes)."""

    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, geom: ExpertGeometry, *,
                 pack: str | os.PathLike | bool | None, chunk_bytes: int, direct_io: bool, reads: str):
        self.ckpt, self.qcfg, self.geom = ckpt, qcfg, geom
        self.direct_io, self.chunk_bytes = bool(direct_io), int(chunk_bytes)
        self.reads = resolve_reads(reads)         # preadv | portable
        self.pack_note: str | None = None
        self.files: list[SourceFile] = []
        self._file_index: dict[Path, int] = {}
        self._plans: dict[tuple[int, int], Plan] = {}
        self._checked: set = set()              # experts whose weight_shape values were checked
        self._lock = threading.Lock()
        self.build = build_linear
        self._pack = None
        try:
            first = next(geom.keys(), None)
            if first is None:
                raise CheckpointError(f"{ckpt.folder}: no routed experts to serve")
            self._template = [p for p, _ in expert_parts(ckpt, qcfg, first[0], first[1], geom)]
            self.expert_nbytes = sum(p.nbytes for p in self._template)   # tensor bytes of one expert
            self._pack = self._open_pack(pack)
        except BaseException:
            self.close()
            raise
        self.slot_bytes = self._pack.block_bytes if self._pack is not None else slot_bound(self._template)
        self.source = "pack" if self._pack is not None else "checkpoint"
        self.n_experts_total = sum(geom.n_experts.values())

    def _open_pack(self, pack):
        if pack in (None, False, "off"):
            return None
        from .prepare import PackError, open_pack
        index = Path(self.ckpt.folder) / PACK_INDEX if pack in (True, "auto") else Path(pack)
        if index.is_dir():
            index = index / PACK_INDEX
        if not index.exists():
            if pack not in (True, "auto"):
                raise CheckpointError(f"{index}: no expert pack index there")
            return None
        try:
            info = open_pack(index, self.ckpt, self.qcfg, self.geom)
        except PackError as e:
            if pack != "auto":
                raise
            self.pack_note = f"expert pack ignored: {e}"
            return None
        self.build = info.byte_format.build
        return info

    def key_of(self, layer: int, e: int) -> tuple[int, int]:
        key = (int(layer), int(e))
        n = self.geom.n_experts.get(key[0])
        if n is None or not 0 <= key[1] < n:
            what = (f"layer {layer} is not a MoE layer (MoE layers: {list(self.geom.layers)})" if n is None
                    else f"layer {layer} has experts 0..{n - 1}")
            raise KeyError(f"no routed expert {e} in layer {layer}: {what}")
        return key

    def file_id(self, path: Path) -> int:
        with self._lock:
            fid = self._file_index.get(path)
            if fid is None:
                fid = self._file_index[path] = len(self.files)
                self.files.append(SourceFile(path, self.direct_io, self.reads))
            return fid

    def plan(self, key: tuple[int, int]) -> Plan:
        """Where expert `key`'s bytes are (made once, from headers only)."""
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if self._pack is not None:
            info = self._pack
            plan = plan_block(self.file_id(info.data_path), info.offsets[key], info.block_bytes,
                              self.chunk_bytes, info.parts, info.data_bytes)
        else:
            plan = self._plan_checkpoint(*key)
        self._plans[key] = plan
        return plan

    def _plan_checkpoint(self, layer: int, e: int) -> Plan:
        parts = expert_parts(self.ckpt, self.qcfg, layer, e, self.geom)
        specs = [p for p, _ in parts]
        if specs != self._template:
            raise CheckpointError(f"{self.ckpt.folder}: expert {e} of layer {layer} is stored as "
                                  f"{specs}, unlike the first expert ({self._template})")
        checks = tuple(f"model.layers.{layer}.mlp.experts.{e}.{p.module}.weight_shape"
                       for p in specs if p.role == "weight_packed")
        plan = plan_from_tensors(parts, self.file_id, self.chunk_bytes, checks)
        if plan.nbytes > self.slot_bytes:      # gaps merged into a span: read the parts apart
            plan = plan_from_tensors(parts, self.file_id, self.chunk_bytes, checks, merge_gap=0)
        return plan

    def needs_shape_check(self, key) -> bool:
        return key not in self._checked and bool(self.plan(key).shape_checks)

    def check_shapes(self, key) -> None:
        """int4 weight_shape values (data, not header): CheckpointError naming the tensor."""
        for name in self.plan(key).shape_checks:
            check_weight_shape(self.ckpt, self.ckpt.info(name), self.geom.shape(name.split(".")[-2]))
        self._checked.add(key)

    def triple(self, root: np.ndarray, plan: Plan):
        """(gate, up, down) Linear triple whose arrays are views of root (a slot's bytes)."""
        views: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODULES}
        for spec, off in plan.parts:
            dt = DTYPES[spec.dtype]
            views[spec.module][spec.role] = root[off: off + spec.nbytes].view(dt).reshape(spec.shape)
        return tuple(self.build(views[m], self.geom.shape(m), self.qcfg) for m in MODULES)

    def extents(self, key) -> list[tuple[Path, int, int]]:
        return [(self.files[fid].path, off, n) for fid, off, n, _ in self.plan(key).chunks]

    def direct_io_status(self) -> tuple[bool, str | None]:
        """(O_DIRECT in use for some file, the first note saying why not)."""
        if not self.direct_io:
            return False, None
        return any(f.direct for f in self.files), next((f.note for f in self.files if f.note), None)

    def close(self) -> None:
        for f in self.files:
            f.close()
