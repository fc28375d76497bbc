"""Handles on checkpoint tensors that the model is built from; opening one reads headers only.

`Lazy` weights are checked at open (name, shape, dtype from the safetensors headers) and mapped
on first use; routed experts are never resident here: `CheckpointExperts` reads them from the
mmap per call (the expert store, offload.experts, replaces it with a budgeted cache).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kimi_desktop.offload.formats import Linear, QuantConfig, linear_tensors, load_linear
from kimi_desktop.offload.safetensors import Checkpoint

from .config import ModelConfig

ExpertTriple = tuple[Linear, Linear, Linear]     # gate_proj, up_proj, down_proj


def as_f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class Lazy:
    """A weight checked at open (headers only) and mapped on first use, so opening reads no data."""

    def __init__(self, make: Callable):
        self._make, self._value = make, None

    def __call__(self):
        if self._value is None:
            self._value = self._make()
        return self._value


def vector(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> Lazy:
    """A small tensor (norm weight, router bias) as float32."""
    ckpt.require(name, shape=shape)
    return Lazy(lambda: as_f32(ckpt.read(name)))


def lazy_linear(ckpt: Checkpoint, prefix: str, qcfg: QuantConfig, shape: tuple[int, int]) -> Lazy:
    """A weight every token uses: read into resident memory on first use (routed experts are not)."""
    linear_tensors(ckpt, prefix, qcfg, shape)
    return Lazy(lambda: load_linear(ckpt, prefix, qcfg, shape, resident=True))


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


def check_experts(cfg: ModelConfig, ckpt: Checkpoint, qcfg: QuantConfig) -> None:
    """Every routed expert's tensors exist with the right shapes (headers only, no data)."""
    shapes = expert_shapes(cfg)
    for i in cfg.moe_layers:
        for e in range(cfg.n_routed_experts):
            for name, shape in shapes.items():
                linear_tensors(ckpt, f"model.layers.{i}.mlp.experts.{e}.{name}", qcfg, shape)


class CheckpointExperts:
    """Routed experts read straight from the checkpoint (mmap); the expert store replaces this."""

    def __init__(self, ckpt: Checkpoint, qcfg: QuantConfig, cfg: ModelConfig):
        self.ckpt, self.qcfg, self.shapes = ckpt, qcfg, expert_shapes(cfg)

    def get(self, layer: int, e: int) -> ExpertTriple:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return tuple(load_linear(self.ckpt, p + name, self.qcfg, shape) for name, shape in self.shapes.items())
