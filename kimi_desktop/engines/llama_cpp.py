"""The `llama.cpp` engine's loader: a GGUF (arch deepseek2) through llama-cpp-python.

llama-cpp-python is optional and imported only inside these functions.

YaRN: llama.cpp's deepseek2 does not read rope.scaling.yarn_beta_fast / yarn_beta_slow from the
GGUF (and llama-cpp-python passes beta_fast 32 unless told otherwise), while K2 uses
beta_fast = beta_slow = 1. load_llama reads the values the GGUF holds and passes them to the
context, so llama.cpp's rotary frequencies match the checkpoint's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_llama", "llama_logits", "llama_greedy", "gguf_yarn_betas"]


def gguf_yarn_betas(gguf_path: str | os.PathLike) -> tuple[float | None, float | None]:
    """(beta_fast, beta_slow) from the GGUF's rope.scaling keys, None where absent (header only)."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))
    arch_field = r.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "deepseek2"
    out = []
    for key in ("yarn_beta_fast", "yarn_beta_slow"):
        f = r.fields.get(f"{arch}.rope.scaling.{key}")
        out.append(float(f.contents()) if f is not None else None)
    return out[0], out[1]


def load_llama(gguf_path: str | os.PathLike, n_threads: int | None = None, n_ctx: int = 4096,
               logits_all: bool = False, verbose: bool = False, **kwargs):
    """llama_cpp.Llama for a GGUF; logits_all=True keeps every position's logits (llama_logits).

    Extra keyword arguments go to llama_cpp.Llama unchanged (n_gpu_layers, n_batch, seed, ...).
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError("the llama.cpp engine needs llama-cpp-python "
                           "(pip install 'kimi-desktop[llama]')") from e
    beta_fast, beta_slow = gguf_yarn_betas(path)
    if beta_fast is not None:
        kwargs.setdefault("yarn_beta_fast", beta_fast)
    if beta_slow is not None:
        kwargs.setdefault("yarn_beta_slow", beta_slow)
    if n_threads is not None:
        kwargs.setdefault("n_threads_batch", n_threads)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                           logits_all=logits_all, verbose=verbose, **kwargs)


def llama_logits(llm, ids) -> np.ndarray:
    """float32 [T, vocab] logits of ids from a fresh context (needs load_llama(logits_all=True))."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("llama_logits: no token ids")
    if not getattr(llm, "_logits_all", False):
        raise ValueError("llama_logits needs a model loaded with logits_all=True")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n: int) -> list[int]:
    """n greedy (argmax) new token ids after ids, from a fresh context; does not stop at end ids."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("llama_greedy: no token ids")
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        row = llm.scores[llm.n_tokens - 1]
        t = int(np.argmax(row))
        out.append(t)
        if len(out) < n:
            llm.eval([t])
    return out
