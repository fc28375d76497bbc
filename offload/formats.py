"""Linear weight formats, kept as stored and dequantized on the fly.

- PlainLinear:    BF16 / F16 / F32 weight [out, in].
- Fp8BlockLinear: F8_E4M3 weight [out, in] + F32 weight_scale_inv [ceil(out/b0), ceil(in/b1)]
                  (DeepSeek-V3 / K2-Instruct); W = fp8 * scale_inv (multiplied despite the name).
- Int4Linear:     compressed-tensors pack-quantized, symmetric, group-wise (K2-Thinking experts):
                  weight_packed I32 [out, ceil(in/8)], weight_scale BF16 [out, in/group],
                  weight_shape [2]. Nibble j of each int32 holds column 8k+j (lowest first) as
                  u = q + 8; W[r, c] = (u - 8) * scale[r, c // group].

matmul() dequantizes a block of rows at a time (fp32 temporary capped at MAX_TEMP_BYTES), so no
full fp32 copy of a large matrix ever exists. This is the simple, exact numpy path; fast kernels
read .weight / .packed / .scale / .scale_inv directly.

Shape legend: out = output features (rows), in = input features (columns), T = tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from .safetensors import Checkpoint, CheckpointError, TensorInfo

__all__ = [
    "QuantConfig", "PlainLinear", "Fp8BlockLinear", "Int4Linear", "Linear", "load_linear",
    "quantize_int4", "pack_int4", "unpack_int4", "int4_nibbles", "dequantize_int4", "dequantize_fp8_block",
    "quantize_fp8_block", "MAX_TEMP_BYTES",
]

MAX_TEMP_BYTES = 16 << 20  # cap on one dequantized fp32 block inside matmul
FP8_MAX = 448.0            # largest finite float8_e4m3fn
PLAIN_DTYPES = ("BF16", "F16", "F32")


# --------------------------------------------------------------------------- quantization config

@dataclass(frozen=True)
class QuantConfig:
    """config.json's quantization_config, reduced to what the loader needs."""
    method: str = "plain"                    # "plain" | "fp8" | "compressed-tensors"
    group_size: int | None = None            # compressed-tensors int4 group (columns per scale)
    block_size: tuple[int, int] | None = None  # fp8 (rows, cols) per scale
    targets: tuple[str, ...] = ()            # compressed-tensors: "Linear", names, "re:" regexes
    ignore: tuple[str, ...] = ()
    source: str = ""                         # the config file, for error messages

    @classmethod
    def from_config(cls, config: dict, source: str) -> QuantConfig:
        q = config.get("quantization_config")
        if q is None:
            return cls(source=str(source))
        if not isinstance(q, dict):
            raise CheckpointError(f"{source}: quantization_config: expected an object, found {q!r}")
        method = q.get("quant_method")
        if method == "fp8":
            return cls._fp8(q, str(source))
        if method == "compressed-tensors":
            return cls._compressed_tensors(q, str(source))
        raise CheckpointError(f"{source}: quantization_config.quant_method: unsupported {method!r} "
                              "(supported: fp8, compressed-tensors)")

    @classmethod
    def _fp8(cls, q: dict, source: str) -> QuantConfig:
        def bad(key, expected):
            return CheckpointError(f"{source}: quantization_config.{key}: expected {expected}, "
                                   f"found {q.get(key)!r}")
        if q.get("fmt", "e4m3") != "e4m3":
            raise bad("fmt", "'e4m3'")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise bad("activation_scheme", "'dynamic'")  # static needs input scales we don't read
        bs = q.get("weight_block_size")
        if not (isinstance(bs, list) and len(bs) == 2 and all(type(b) is int and b > 0 for b in bs)):
            raise bad("weight_block_size", "[rows, cols] of positive ints")
        return cls(method="fp8", block_size=(bs[0], bs[1]), source=source)

    @classmethod
    def _compressed_tensors(cls, q: dict, source: str) -> QuantConfig:
        def check(key, value, ok, expected):
            if not ok:
                raise CheckpointError(f"{source}: quantization_config.{key}: expected {expected}, "
                                      f"found {value!r}")
        check("format", q.get("format"), q.get("format") == "pack-quantized", "'pack-quantized'")
        status = q.get("quantization_status", "compressed")
        check("quantization_status", status, status == "compressed", "'compressed'")
        kv = q.get("kv_cache_scheme")
        check("kv_cache_scheme", kv, kv is None, "null")
        groups = q.get("config_groups")
        check("config_groups", groups, isinstance(groups, dict) and groups, "a non-empty object")
        targets: list[str] = []
        group_size = None
        for gname, g in groups.items():
            at = f"config_groups.{gname}"
            check(at, g, isinstance(g, dict), "an object")
            fmt = g.get("format")
            check(f"{at}.format", fmt, fmt in (None, "pack-quantized"), "'pack-quantized'")
            for act in ("input_activations", "output_activations"):
                check(f"{at}.{act}", g.get(act), g.get(act) is None, "null (weight-only quantization)")
            t = g.get("targets")
            check(f"{at}.targets", t, isinstance(t, list) and all(isinstance(x, str) for x in t),
                  "a list of strings")
            targets += t
            w = g.get("weights")
            check(f"{at}.weights", w, isinstance(w, dict), "an object")
            for key, ok, expected in (
                ("num_bits", w.get("num_bits") == 4, "4"),
                ("type", w.get("type") == "int", "'int'"),
                ("symmetric", w.get("symmetric") is True, "true"),
                ("strategy", w.get("strategy") == "group", "'group'"),
                ("group_size", type(w.get("group_size")) is int and w.get("group_size", 0) > 0,
                 "a positive int"),
                ("dynamic", w.get("dynamic", False) is False, "false"),
                ("actorder", w.get("actorder") is None, "null"),
                ("block_structure", w.get("block_structure") is None, "null"),
            ):
                check(f"{at}.weights.{key}", w.get(key), ok, expected)
            check(f"{at}.weights.group_size", w["group_size"],
                  group_size in (None, w["group_size"]), f"the same in every group ({group_size})")
            group_size = w["group_size"]
        ignore = q.get("ignore") or []
        check("ignore", ignore, isinstance(ignore, list) and all(isinstance(x, str) for x in ignore),
              "a list of strings")
        for pattern in targets + ignore:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise CheckpointError(f"{source}: quantization_config: bad regex {pattern!r}: {e}") from None
        return cls(method="compressed-tensors", group_size=group_size, targets=tuple(targets),
                   ignore=tuple(ignore), source=source)

    def kind(self, module_name: str) -> str:
        """"int4" | "fp8" | "plain" for a Linear module (e.g. "model.layers.3.mlp.experts.5.up_proj").

        fp8: the stored dtype decides per tensor (lm_head stays BF16 in an fp8 checkpoint).
        compressed-tensors: targeted (every module is a Linear here) and not ignored -> int4.
        """
        if self.method == "fp8":
            return "fp8"
        if self.method != "compressed-tensors":
            return "plain"
        if any(_match_name(module_name, p) for p in self.ignore):
            return "plain"
        if any(t == "Linear" or _match_name(module_name, t) for t in self.targets):
            return "int4"
        return "plain"


def _match_name(name: str, pattern: str) -> bool:
    # compressed_tensors.utils.match.match_name: "re:" -> re.match (anchored at the start), else ==
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


# --------------------------------------------------------------------------- reading the stored formats
# The one copy of INT4 unpacking and FP8 block dequantization: the Linear classes below, the kernels'
# numpy references (runtime/kernels) and the GGUF export use these.

def int4_nibbles(packed: np.ndarray, in_features: int) -> np.ndarray:
    """int32 [out, ceil(in/8)] -> the stored nibbles u = q + 8, uint8 [out, in] in column order
    (a view into one temporary)."""
    # byte k of a little-endian packed row holds columns 2k (low nibble) and 2k+1 (high)
    b = np.ascontiguousarray(packed.view(np.uint32), dtype="<u4").view(np.uint8)  # [out, 4 ceil(in/8)]
    u = np.empty(b.shape + (2,), dtype=np.uint8)                                  # [out, bytes, 2]
    np.bitwise_and(b, 0x0F, out=u[..., 0])
    np.right_shift(b, 4, out=u[..., 1])
    return u.reshape(b.shape[0], 2 * b.shape[1])[:, :in_features]


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """int32 [out, ceil(in/8)] -> int8 [out, in] in [-8, 7]."""
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype.itemsize != 4 or packed.shape[1] != math.ceil(in_features / 8):
        raise ValueError(f"unpack_int4: expected int32 [out, {math.ceil(in_features / 8)}], "
                         f"got {packed.dtype} {packed.shape}")
    return int4_nibbles(packed, in_features).view(np.int8) - np.int8(8)


def _bf16_f32(a: np.ndarray) -> np.ndarray:
    """bf16 (ml_dtypes, or its uint16 bits as the kernels hold it) -> float32, exact."""
    a = np.asarray(a)
    return (a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a).astype(np.float32)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, in_features: int, group: int) -> np.ndarray:
    """W float32 [out, in] = (u - 8) * scale[r, c // group] (exact in float32). packed int32
    [out, ceil(in/8)], scale bf16 (or uint16 bits) [out, >= ceil(in/group)]."""
    w = int4_nibbles(packed, in_features).astype(np.float32)     # [out, in], u = q + 8
    w -= 8.0
    s = _bf16_f32(scale)                                          # [out, groups]
    if in_features % group == 0:
        wg = w.reshape(w.shape[0], in_features // group, group)   # view: [out, groups, group]
        wg *= s[:, :in_features // group, None]
    else:
        w *= np.repeat(s, group, axis=1)[:, :in_features]
    return w


def dequantize_fp8_block(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                         row0: int = 0) -> np.ndarray:
    """W float32 [rows, in] = fp8(weight) * scale_inv[(row0 + r) // b0, c // b1] (multiplied despite
    the name), for `weight` = rows row0.. of the matrix: float8_e4m3fn (or its uint8 bits) [rows, in],
    scale_inv float32 [ceil(out/b0), ceil(in/b1)] of the whole matrix."""
    b0, b1 = block
    weight = np.asarray(weight)
    w = (weight.view(ml_dtypes.float8_e4m3fn) if weight.dtype == np.uint8 else weight).astype(np.float32)
    rows = w.shape[0]
    if rows == 0:
        return w
    s = np.asarray(scale_inv[row0 // b0:(row0 + rows - 1) // b0 + 1], np.float32)   # [row blocks, col blocks]
    s = np.repeat(s, b0, axis=0)[row0 % b0:row0 % b0 + rows]                       # [rows, col blocks]
    for j in range(s.shape[1]):                                   # one column block at a time
        w[:, j * b1:(j + 1) * b1] *= s[:, j:j + 1]
    return w


# --------------------------------------------------------------------------- linear weights

def _row_range(rows: slice | None, out: int) -> tuple[int, int]:
    if rows is None:
        return 0, out
    start, stop, step = rows.indices(out)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {step}")
    return start, max(start, stop)


class _Linear:
    """Shared matmul: y = x @ W.T, dequantizing W one block of rows at a time."""
    shape: tuple[int, int]
    _row_align = 1  # block starts are multiples of this (fp8: the scale block height)

    def _block(self, r0: int, r1: int) -> np.ndarray:
        """float32 [r1 - r0, in]; may be a read-only view (plain f32)."""
        raise NotImplementedError

    def dequantize(self, rows: slice | None = None) -> np.ndarray:
        r0, r1 = _row_range(rows, self.shape[0])
        return self._block(r0, r1)  # fresh array in every subclass but PlainLinear

    def _rows_per_block(self) -> int:
        rows = max(1, MAX_TEMP_BYTES // (4 * max(1, self.shape[1])))
        return max(self._row_align, rows // self._row_align * self._row_align)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, in] or [in] -> float32 [T, out] or [out]."""
        out_f, in_f = self.shape
        x = np.asarray(x, dtype=np.float32)
        if x.ndim not in (1, 2) or x.shape[-1] != in_f:
            raise ValueError(f"matmul: expected x of shape [T, {in_f}] or [{in_f}], got {x.shape}")
        x2 = x.reshape(-1, in_f)                                  # [T, in]
        y = np.empty((x2.shape[0], out_f), dtype=np.float32)      # [T, out]
        step = self._rows_per_block()
        for r0 in range(0, out_f, step):
            r1 = min(out_f, r0 + step)
            y[:, r0:r1] = x2 @ self._block(r0, r1).T              # [T, rows]
        return y[0] if x.ndim == 1 else y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, nbytes={self.nbytes})"


class PlainLinear(_Linear):
    def __init__(self, weight: np.ndarray):
        if weight.ndim != 2 or weight.dtype not in (np.dtype(ml_dtypes.bfloat16), np.float16, np.float32):
            raise ValueError(f"PlainLinear: expected a 2-D bf16/f16/f32 weight, got {weight.dtype} {weight.shape}")
        self.weight = weight                                      # [out, in] as stored
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def _block(self, r0: int, r1: int) -> np.ndarray:
        return self.weight[r0:r1].astype(np.float32, copy=False)  # f32: no copy at all

    def dequantize(self, rows: slice | None = None) -> np.ndarray:
        r0, r1 = _row_range(rows, self.shape[0])
        return np.array(self.weight[r0:r1], dtype=np.float32)   # always a copy the caller owns


class Fp8BlockLinear(_Linear):
    def __init__(self, weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)):
        b0, b1 = block
        out_f, in_f = weight.shape
        want = (math.ceil(out_f / b0), math.ceil(in_f / b1))
        if weight.dtype != ml_dtypes.float8_e4m3fn or scale_inv.shape != want:
            raise ValueError(f"Fp8BlockLinear: expected float8_e4m3fn weight and scale_inv {want}, "
                             f"got {weight.dtype} {weight.shape} and scale_inv {scale_inv.shape}")
        self.weight = weight                                      # [out, in] fp8 e4m3fn
        self.scale_inv = scale_inv                                # [ceil(out/b0), ceil(in/b1)] f32
        self.block = (int(b0), int(b1))
        self.shape = (int(out_f), int(in_f))
        self._row_align = self.block[0]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale_inv.nbytes

    def _block(self, r0: int, r1: int) -> np.ndarray:
        return dequantize_fp8_block(self.weight[r0:r1], self.scale_inv, self.block, row0=r0)


class Int4Linear(_Linear):
    def __init__(self, packed: np.ndarray, scale: np.ndarray, shape: tuple[int, int],
                 group: int | None = None):
        out_f, in_f = (int(d) for d in shape)
        if group is None and scale.ndim == 2 and scale.shape[1]:
            group = in_f // scale.shape[1]  # as compressed-tensors infers it
        if (packed.dtype != np.int32 or packed.shape != (out_f, math.ceil(in_f / 8)) or not group
                or in_f % group or scale.shape != (out_f, in_f // group)):
            raise ValueError(f"Int4Linear: shape {(out_f, in_f)} group {group} needs packed int32 "
                             f"{(out_f, math.ceil(in_f / 8))} and scale {(out_f, in_f // (group or 1))}, "
                             f"got packed {packed.dtype} {packed.shape}, scale {scale.shape}")
        self.packed = packed                                      # [out, ceil(in/8)] int32
        self.scale = scale                                        # [out, in/group] bf16
        self.group = int(group)
        self.shape = (out_f, in_f)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes

    def _block(self, r0: int, r1: int) -> np.ndarray:
        return dequantize_int4(self.packed[r0:r1], self.scale[r0:r1], self.shape[1], self.group)


Linear = PlainLinear | Fp8BlockLinear | Int4Linear


# --------------------------------------------------------------------------- loading

def _require_module_tensor(ckpt: Checkpoint, name: str, dtype, shape, hint: str = "") -> TensorInfo:
    """ckpt.require, with a missing tensor reported next to the module's tensors that do exist."""
    if name not in ckpt:
        module = name.rsplit(".", 1)[0] + "."
        siblings = [ckpt.info(n) for n in ckpt.names() if n.startswith(module) and "." not in n[len(module):]]
        found = ""
        if siblings:
            found = (f"; {siblings[0].path} has {', '.join(repr(t.name) for t in siblings)}"
                     + (f" ({hint})" if hint else ""))
        raise CheckpointError(f"{ckpt.folder}: tensor '{name}' is missing from the checkpoint{found}")
    return ckpt.require(name, dtype=dtype, shape=shape)


def linear_tensors(ckpt: Checkpoint, prefix: str, qconfig: QuantConfig,
                   shape: tuple[int, int]) -> dict[str, TensorInfo]:
    """The tensors of Linear module `prefix` (e.g. "model.layers.3.mlp.experts.5.gate_proj") of
    shape (out, in) by role (weight | weight_scale_inv | weight_packed, weight_scale, weight_shape),
    checked from headers only; errors name the file, the tensor, what was expected and found."""
    out_f, in_f = (int(d) for d in shape)
    if qconfig.kind(prefix) == "int4":
        g = qconfig.group_size
        hint = f"quantization_config in {qconfig.source} says {prefix} is int4"
        packed = _require_module_tensor(ckpt, f"{prefix}.weight_packed", "I32",
                                        (out_f, math.ceil(in_f / 8)), hint)
        scale_name = f"{prefix}.weight_scale"
        scale = _require_module_tensor(ckpt, scale_name, PLAIN_DTYPES, None)
        if in_f % g:
            raise CheckpointError(f"{scale.path}: tensor '{scale_name}': in_features {in_f} is not "
                                  f"divisible by group_size {g} from {qconfig.source}")
        if scale.shape != (out_f, in_f // g):
            raise CheckpointError(
                f"{scale.path}: tensor '{scale_name}': expected shape {(out_f, in_f // g)} "
                f"([out, in/group_size] with group_size {g} from {qconfig.source}), found {scale.shape}")
        ws = _require_module_tensor(ckpt, f"{prefix}.weight_shape", ("I32", "I64"), (2,))
        return {"weight_packed": packed, "weight_scale": scale, "weight_shape": ws}

    name = f"{prefix}.weight"
    allowed = ("F8_E4M3",) + PLAIN_DTYPES if qconfig.kind(prefix) == "fp8" else PLAIN_DTYPES
    hint = f"quantization_config in {qconfig.source or 'config.json'} says {prefix} is not int4"
    w = _require_module_tensor(ckpt, name, allowed, (out_f, in_f), hint)
    if w.dtype != "F8_E4M3":
        return {"weight": w}
    b0, b1 = qconfig.block_size
    s_name = f"{prefix}.weight_scale_inv"
    if s_name not in ckpt:
        raise CheckpointError(f"{w.path}: tensor '{name}' is F8_E4M3 but '{s_name}' is missing")
    return {"weight": w, "weight_scale_inv": ckpt.require(s_name, "F32", (math.ceil(out_f / b0),
                                                                         math.ceil(in_f / b1)))}


def check_weight_shape(ckpt: Checkpoint, info: TensorInfo, shape: tuple[int, int]) -> None:
    """An INT4 module's stored weight_shape (data: 2 ints, read with pread, not through the mapping,
    whose fault would read around it by the disk's whole read-ahead window) against config.json."""
    stored = tuple(int(v) for v in ckpt.read(info.name))
    if stored != tuple(int(d) for d in shape):
        raise CheckpointError(f"{info.path}: tensor '{info.name}': expected {tuple(shape)} "
                              f"(from config.json), found {stored}")


def build_linear(arrays: Mapping[str, np.ndarray], shape: tuple[int, int],
                 qconfig: QuantConfig) -> PlainLinear | Fp8BlockLinear | Int4Linear:
    """A Linear from one module's arrays by role (as linear_tensors names them)."""
    if "weight_packed" in arrays:
        return Int4Linear(arrays["weight_packed"], arrays["weight_scale"], tuple(shape), qconfig.group_size)
    if "weight_scale_inv" in arrays:
        return Fp8BlockLinear(arrays["weight"], arrays["weight_scale_inv"], qconfig.block_size)
    return PlainLinear(arrays["weight"])


def load_linear(ckpt: Checkpoint, prefix: str, qconfig: QuantConfig,
                shape: tuple[int, int], resident: bool = False) -> PlainLinear | Fp8BlockLinear | Int4Linear:
    """The Linear module `prefix` of shape (out, in), its arrays viewed through the mmap.

    Every check uses headers only; the only tensor data read here is weight_shape (2 ints).
    `resident`: the stored bytes are copied into anonymous memory (Checkpoint.read) instead of
    viewed through the mmap; for weights that every token uses.
    """
    get = ckpt.read if resident else ckpt.get
    tensors = linear_tensors(ckpt, prefix, qconfig, shape)
    if "weight_shape" in tensors:
        check_weight_shape(ckpt, tensors.pop("weight_shape"), shape)
    return build_linear({role: get(info.name) for role, info in tensors.items()}, shape, qconfig)


# --------------------------------------------------------------------------- quantizers (for writing)

def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 [out, in] in [-8, 7] -> int32 [out, ceil(in/8)]; column 8k+j in nibble j (lowest first).

    Padding columns hold u = 0, as compressed-tensors pads after adding the +8 offset.
    """
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype.kind not in "iu":
        raise ValueError(f"pack_int4: expected a 2-D integer array, got {q.dtype} {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    out_f, in_f = q.shape
    pc = math.ceil(in_f / 8)
    u = np.zeros((out_f, pc * 8), dtype=np.uint32)
    u[:, :in_f] = q.astype(np.int32) + 8
    u = u.reshape(out_f, pc, 8) << (4 * np.arange(8, dtype=np.uint32))
    return np.bitwise_or.reduce(u, axis=-1).view(np.int32)


def quantize_int4(w: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (packed int32 [out, ceil(in/8)], scale bf16 [out, in/group]).

    Symmetric, scale = max|w| / 7 per group (values use [-7, 7], like K2's QAT), rounded to bf16
    before quantizing so the stored scale is the one q was computed with.
    """
    w = np.asarray(w, dtype=np.float32)
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"quantize_int4: in_features {in_f} is not divisible by group {group}")
    g = w.reshape(out_f, in_f // group, group)
    scale = (np.abs(g).max(axis=-1) / 7).astype(ml_dtypes.bfloat16)   # [out, in/group]
    scale[scale == 0] = 1  # all-zero (or underflowing) group: any scale gives q = 0
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(g / s), -8, 7).astype(np.int8).reshape(out_f, in_f)
    return pack_int4(q), scale


def quantize_fp8_block(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (float8_e4m3fn [out, in], scale_inv f32 [ceil(out/b0), ceil(in/b1)])."""
    w = np.asarray(w, dtype=np.float32)
    out_f, in_f = w.shape
    b0, b1 = block
    nr, nc = math.ceil(out_f / b0), math.ceil(in_f / b1)
    wp = np.zeros((nr * b0, nc * b1), dtype=np.float32)
    wp[:out_f, :in_f] = w
    blocks = wp.reshape(nr, b0, nc, b1)
    scale = (np.abs(blocks).max(axis=(1, 3)) / FP8_MAX).astype(np.float32)  # [nr, nc]
    scale[scale == 0] = 1
    q = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX)  # rounding may overshoot 448
    q = q.reshape(nr * b0, nc * b1)[:out_f, :in_f].astype(ml_dtypes.float8_e4m3fn)
    return q, scale
