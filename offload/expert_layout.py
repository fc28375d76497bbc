"""Expert geometry and layout: which routed experts exist, their tensors, and where their bytes go.

Pure planning from headers (no reads): ExpertGeometry (MoE layers and shapes from config.json),
expert_parts (an expert's tensors, checked), and Plan (the aligned reads that fill one slot).
Both the expert store and `kimi-desktop prepare` (offload/prepare.py) build on this module.

Layout of a slot. An expert's tensors are grouped into spans (same file, gaps <= MERGE_GAP bytes
coalesced: in a K2 shard, serialised by dtype then name, that is ~2 spans per expert: the three
packed weights, then the three scales). Each span's 4 KiB-aligned superset is read into the slot
at a 4 KiB-aligned offset, so a tensor sits in the slot at the same alignment (mod 4096) as in its
file. With an expert pack (offload/prepare.py) an expert is one aligned block: one span.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from .formats import QuantConfig, linear_tensors
from .safetensors import DTYPES, Checkpoint, CheckpointError, TensorInfo

__all__ = ["PAGE", "MERGE_GAP", "CHUNK_BYTES", "MODULES", "PACK_INDEX", "round_up", "ExpertGeometry",
           "geometry_for", "PartSpec", "expert_parts", "Plan", "slot_bound", "plan_from_tensors",
           "plan_block"]

PAGE = 4096                  # alignment of slots, spans and O_DIRECT requests
MERGE_GAP = 64 << 10         # coalesce an expert's spans in one file across gaps up to this
CHUNK_BYTES = 4 << 20        # one read request
MODULES = ("gate_proj", "up_proj", "down_proj")
PACK_INDEX = "experts.kdpack.json"


def round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class ExpertGeometry:
    """Which experts exist and their module shapes (out, in)."""
    layers: tuple[int, ...]                  # MoE layer ids, ascending
    n_experts: Mapping[int, int]             # layer -> routed experts
    hidden: int
    moe_inter: int

    def shape(self, module: str) -> tuple[int, int]:
        return (self.hidden, self.moe_inter) if module == "down_proj" else (self.moe_inter, self.hidden)

    def keys(self) -> Iterator[tuple[int, int]]:
        for layer in self.layers:
            for e in range(self.n_experts[layer]):
                yield layer, e

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> ExpertGeometry:
        """MoE layers by the DeepSeek-V3 rule (same as runtime ModelConfig.is_moe_layer)."""
        try:
            n_layers, n_exp = int(cfg["num_hidden_layers"]), int(cfg.get("n_routed_experts") or 0)
            hidden, inter = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"])
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
        first, freq = int(cfg.get("first_k_dense_replace", 0)), int(cfg.get("moe_layer_freq", 1))
        layers = tuple(i for i in range(n_layers) if n_exp > 0 and i >= first and i % freq == 0)
        return cls(layers, {i: n_exp for i in layers}, hidden, inter)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> tuple[ExpertGeometry, QuantConfig]:
        path = Path(folder) / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON: {e}") from None
        return cls.from_config(cfg, str(path)), QuantConfig.from_config(cfg, str(path))


def geometry_for(ckpt: Checkpoint, layers, hidden: int, moe_inter: int, n_experts) -> ExpertGeometry:
    """layers: {layer: count or ids}, or layer ids with n_experts each (None: count them in the headers)."""
    if isinstance(layers, Mapping):
        counts = {}
        for layer, v in layers.items():
            counts[int(layer)] = int(v) if isinstance(v, (int, np.integer)) else len(list(v))
    else:
        ids = sorted(int(x) for x in layers)
        counts = ({layer: int(n_experts) for layer in ids} if n_experts is not None
                  else _counted_experts(ckpt, ids))
    return ExpertGeometry(tuple(sorted(counts)), counts, int(hidden), int(moe_inter))


def _counted_experts(ckpt: Checkpoint, ids: list[int]) -> dict[int, int]:
    """Experts per layer present in the checkpoint (header names only)."""
    pat = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
    top: dict[int, int] = {}
    for name in ckpt.names():
        m = pat.match(name)
        if m:
            layer, e = int(m.group(1)), int(m.group(2))
            top[layer] = max(top.get(layer, -1), e)
    counts = {}
    for layer in ids:
        if layer not in top:
            raise CheckpointError(f"{ckpt.folder}: layer {layer} has no routed experts in the checkpoint")
        counts[layer] = top[layer] + 1
    return counts


# --------------------------------------------------------------------------- expert parts

@dataclass(frozen=True)
class PartSpec:
    """One tensor of an expert: e.g. ("gate_proj", "weight_packed", "I32", (I, D/8))."""
    module: str
    role: str          # weight_packed | weight_scale | weight | weight_scale_inv
    dtype: str         # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype].itemsize * math.prod(self.shape)


def expert_parts(ckpt: Checkpoint, qcfg: QuantConfig, layer: int, e: int,
                 geom: ExpertGeometry) -> list[tuple[PartSpec, TensorInfo]]:
    """The tensors of expert (layer, e) in a fixed order, checked from headers only
    (formats.linear_tensors; int4's weight_shape value is data, checked on first load)."""
    out = []
    for module in MODULES:
        tensors = linear_tensors(ckpt, f"model.layers.{layer}.mlp.experts.{e}.{module}", qcfg, geom.shape(module))
        out += [(PartSpec(module, role, t.dtype, t.shape), t) for role, t in tensors.items()
                if role != "weight_shape"]
    return out


# --------------------------------------------------------------------------- plans

@dataclass
class Plan:
    """Where an expert's bytes are and where they go in a slot."""
    chunks: list[tuple[int, int, int, int]]   # (file id, file offset, length, slot offset); all 4 KiB-aligned
    parts: list[tuple[PartSpec, int]]         # (spec, byte offset in the slot)
    nbytes: int                               # slot footprint (multiple of PAGE)
    data_bytes: int                           # tensor bytes proper
    shape_checks: tuple[str, ...] = ()        # int4 weight_shape tensors, checked on first load


def slot_bound(specs: list[PartSpec]) -> int:
    """Bytes that hold any expert with these parts when spans are not merged across gaps: each
    span's aligned superset adds less than 2 pages to its bytes."""
    return round_up(sum(p.nbytes for p in specs) + 2 * PAGE * len(specs), PAGE)


def plan_from_tensors(parts: list[tuple[PartSpec, TensorInfo]], file_id: Callable[[Path], int],
                      chunk_bytes: int, shape_checks=(), merge_gap: int = MERGE_GAP) -> Plan:
    """The reads of an expert stored as checkpoint tensors; file_id: path -> file index."""
    order = sorted(range(len(parts)), key=lambda k: (str(parts[k][1].path), parts[k][1].start))
    spans: list[list] = []     # [path, start, end, [part indices]]
    for k in order:
        info = parts[k][1]
        if spans and spans[-1][0] == info.path and 0 <= info.start - spans[-1][2] <= merge_gap:
            spans[-1][2] = max(spans[-1][2], info.end)
            spans[-1][3].append(k)
        else:
            spans.append([info.path, info.start, info.end, [k]])
    offsets = [0] * len(parts)
    chunks = []
    cursor = 0
    for path, start, end, members in spans:
        a0, a1 = start // PAGE * PAGE, round_up(end, PAGE)
        for k in members:
            offsets[k] = cursor + parts[k][1].start - a0
        for c in range(a0, a1, chunk_bytes):
            n = min(chunk_bytes, a1 - c)
            chunks.append((file_id(path), c, n, cursor + c - a0))
        cursor += a1 - a0
    return Plan(chunks, [(parts[k][0], offsets[k]) for k in range(len(parts))], cursor,
                sum(p.nbytes for p, _ in parts), tuple(shape_checks))


def plan_block(fid: int, off: int, block_bytes: int, chunk_bytes: int, parts, data_bytes: int) -> Plan:
    """The reads of an expert stored as one aligned block of an expert pack."""
    chunks = [(fid, c, min(chunk_bytes, off + block_bytes - c), c - off)
              for c in range(off, off + block_bytes, chunk_bytes)]
    return Plan(chunks, list(parts), block_bytes, data_bytes)
