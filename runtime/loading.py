"""Open a checkpoint folder as a Model: config, headers, the expert provider; no tensor data read."""

from __future__ import annotations

import json
from pathlib import Path

from kimi_desktop.offload.formats import QuantConfig
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError

from .config import load_config
from .dispatch import NAIVE_MAX_BYTES, Options
from .session import KV_DTYPES
from .model import Model
from .profile import StageTimer
from .weights import check_experts


def load_model(path: str | Path, attn_impl: str = "auto", experts=None, expert_cache_bytes: int | None = None,
               expert_policy: str = "lru", direct_io: bool = False, *, kernels: bool = True,
               naive_max_bytes: int = NAIVE_MAX_BYTES, timer: StageTimer | None = None,
               recorder=None, kv_dtype: str = "bf16") -> Model:
    """Open a checkpoint folder by mmap; reads headers and config, no tensor data.

    With `expert_cache_bytes`, routed experts are served from a budgeted slot cache filled by
    preadv (offload.experts.ExpertStore); without it, straight from the mmap (the OS page cache).
    kernels / attn_impl / naive_max_bytes: how the forward pass computes (dispatch.Options; the
    same function every way). timer: a StageTimer the forward pass reports its stages to;
    recorder: told every MoE layer's routing (offload.traces.TraceRecorder). kv_dtype: the latent
    cache's storage in its sessions, "bf16" (default) or "fp32" (the reference).
    """
    options = Options(kernels=kernels, attn_impl=attn_impl, naive_max_bytes=naive_max_bytes)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    qcfg = QuantConfig.from_config(cfg.raw, str(folder / "config.json"))
    if experts is None and expert_cache_bytes is not None:
        from kimi_desktop.offload.experts import ExpertStore
        experts = ExpertStore.open(folder, budget_bytes=expert_cache_bytes, policy=expert_policy,
                                   direct_io=direct_io)
    im_end = _im_end_id(folder)
    end_ids = cfg.eos_ids + ((im_end,) if im_end is not None else ())
    model = Model(cfg, ckpt, qcfg, experts, options=options, timer=timer, recorder=recorder, end_ids=end_ids)
    check_experts(cfg, ckpt, qcfg)
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {tuple(KV_DTYPES)}, got {kv_dtype!r}")
    model.kv_dtype = kv_dtype
    return model


def _im_end_id(folder: Path) -> int | None:
    """<|im_end|> from tokenizer_config.json if the folder has one (chat turns end there)."""
    try:
        tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for k, v in (tc.get("added_tokens_decoder") or {}).items():
            if isinstance(v, dict) and v.get("content") == "<|im_end|>":
                return int(k)
    except (OSError, ValueError):
        pass
    return None
