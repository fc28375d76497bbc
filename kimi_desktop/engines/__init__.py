"""Engines behind the chat API (kimi_desktop.chat.Engine): native, llama.cpp and remote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE_KINDS = ("native", "llama.cpp", "remote")


def open_engine(kind: str, path: str | Path, **opts: Any):
    """An Engine of `kind` on the model at `path`.

    native:    path = a checkpoint folder; options ctx (context tokens; default the model's
               max_position_embeddings), expert_cache_gb (None: sized to this machine by
               kimi_desktop.planner, 0: the OS page cache), or expert_cache_bytes and direct_io;
               kv_ram_gb, kv_disk_gb, kv_dir (conversations' KV caches held in RAM and saved to disk).
    llama.cpp: path = a .gguf file; options ctx (default the GGUF's context_length, at most 8192),
               threads, tokenizer_dir (a checkpoint folder whose tokenizer / chat template to use;
               default the GGUF's own), n_gpu_layers, and llama_cpp.Llama keywords (type_k, n_batch, ...).
    remote:    path = the endpoint's base URL (http://host:8000/v1); options api_key, model, timeout,
               max_retries, extra_sampling, extra_body, raw_k2_output.
    """
    if kind == "native":
        from .native import NativeEngine
        return NativeEngine(path, **opts)
    if kind == "llama.cpp":
        from .llama_cpp import LlamaCppEngine
        return LlamaCppEngine(path, **opts)
    if kind == "remote":
        from .remote import RemoteEngine
        return RemoteEngine(str(path), **opts)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")


__all__ = ["ENGINE_KINDS", "open_engine"]
