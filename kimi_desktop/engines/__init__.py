"""Engines behind the chat API (kimi_desktop.chat.Engine): native now; llama.cpp and remote later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE_KINDS = ("native", "llama.cpp", "remote")


def open_engine(kind: str, path: str | Path, **opts: Any):
    """An Engine of `kind` on the model at `path` (a checkpoint folder for "native").

    native options: ctx (context tokens; default the model's max_position_embeddings).
    """
    if kind == "native":
        from .native import NativeEngine
        return NativeEngine(path, **opts)
    if kind in ENGINE_KINDS:
        raise NotImplementedError(f"the {kind!r} engine is not available yet")
    raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")


__all__ = ["ENGINE_KINDS", "open_engine"]
