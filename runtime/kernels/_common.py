"""Shared helpers for the kernel launchers: argument checks, bf16 views, output allocation."""
from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a dependency, but keep the kernels importable without it
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
    _FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # pragma: no cover
    _BF16 = _FP8 = None

# fastmath flags for kernels: contraction (a*b+c -> fma) only. Kernels that want reassociation
# (SIMD reductions) build it in explicitly; no nnan/ninf, so NaN/inf propagate as in numpy.
FM = {"contract"}


def contiguous(a: np.ndarray, name: str) -> np.ndarray:
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (use np.ascontiguousarray)")
    return a


def check(a, name: str, dtypes, ndim: int, shape=None) -> np.ndarray:
    """a as a C-contiguous ndarray of one of `dtypes` with `ndim` dims (shape entries None = any)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    dtypes = tuple(np.dtype(d) for d in (dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)))
    if a.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {a.shape}")
    if shape is not None:
        for i, s in enumerate(shape):
            if s is not None and a.shape[i] != s:
                raise ValueError(f"{name}: expected shape {tuple('*' if s is None else s for s in shape)}, "
                                 f"got {a.shape}")
    return contiguous(a, name)


def as_u16(a, name: str, ndim: int, shape=None) -> np.ndarray:
    """A bf16 tensor (ml_dtypes.bfloat16 or its uint16 bit view) as a uint16 view."""
    if isinstance(a, np.ndarray) and _BF16 is not None and a.dtype == _BF16:
        a = a.view(np.uint16)
    return check(a, name + " (bf16 as uint16)", np.uint16, ndim, shape)


def as_u8(a, name: str, ndim: int, shape=None) -> np.ndarray:
    """An fp8 e4m3fn tensor (ml_dtypes.float8_e4m3fn or its uint8 bit view) as a uint8 view."""
    if isinstance(a, np.ndarray) and _FP8 is not None and a.dtype == _FP8:
        a = a.view(np.uint8)
    return check(a, name + " (fp8 e4m3fn as uint8)", np.uint8, ndim, shape)


def as_i32(a, name: str, ndim: int, shape=None) -> np.ndarray:
    """Packed int4 words (int32 or uint32) as an int32 view."""
    if isinstance(a, np.ndarray) and a.dtype == np.uint32:
        a = a.view(np.int32)
    return check(a, name, np.int32, ndim, shape)


def out_array(out, shape, name="out") -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    check(out, name, np.float32, len(shape), shape)
    return out


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact."""
    return (np.asarray(u16, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even (for tests and tools)."""
    if _BF16 is not None:
        return np.asarray(x, np.float32).astype(_BF16).view(np.uint16)
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)  # pragma: no cover
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # pragma: no cover
