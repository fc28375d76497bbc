"""Read llama.cpp's intermediate tensors while it evaluates (ggml's scheduler eval callback).

    with observe(llm, {"ffn_norm-1": "f32", "ffn_moe_argsort-1": "i32"}) as seen:
        llama_logits(llm, ids)
    np.concatenate(seen["ffn_norm-1"])   # a flat copy per computed batch, in order: [T * ne0]

The callback asks for only the named tensors (the rest of the graph runs as it always does) and
copies their data when they are computed. The context of `llm` is swapped for one with the callback
for the duration of the block.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    lib.ggml_get_data.restype, lib.ggml_get_data.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    lib.ggml_nelements.restype, lib.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    return lib


@contextlib.contextmanager
def observe(llm, wanted: dict[str, str]):
    """Copy the named tensors ('f32' or 'i32' data; contiguous ones, not views) as llm evaluates."""
    import llama_cpp
    from llama_cpp import _internals

    lib = _ggml()
    seen: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    dtypes = {"f32": (ctypes.c_float, np.float32), "i32": (ctypes.c_int32, np.int32)}

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(t, ask, _user):
        name = lib.ggml_get_name(t).decode()
        if name not in wanted:
            return not ask                     # ask: not this one; computed: carry on
        if ask:
            return True
        ctype, dtype = dtypes[wanted[name]]
        n = lib.ggml_nelements(t)
        ptr = ctypes.cast(lib.ggml_get_data(t), ctypes.POINTER(ctype))
        seen[name].append(np.ctypeslib.as_array(ptr, (n,)).astype(dtype, copy=True))
        return True

    params = llm.context_params
    params.cb_eval, params.cb_eval_user_data = callback, None
    plain = llm._ctx
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    try:
        yield seen
    finally:
        llm._ctx.close()
        llm._ctx = plain
        params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback()
        llm.reset()

