"""warmup() makes every kernel specialization the model uses before the first forward pass."""
from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

from kimi_desktop.runtime import kernels as K
from kimi_desktop.runtime import load_model


def _specializations() -> dict[str, int]:
    out = {}
    for m in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"{K.__name__}.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == mod.__name__:
                out[f"{m.name}.{name}"] = len(obj.signatures)
    return out


@pytest.mark.parametrize("layout", ["int4", "fp8", "bf16"])
def test_warmup_covers_the_forward_pass(make_ckpt, layout):
    K.warmup()
    before = _specializations()
    model = load_model(make_ckpt(layout=layout))
    s = model.session()
    logits = s.feed(np.arange(1, 12))               # prefill: tiled GEMMs, prefill attention
    for _ in range(3):                               # decode: GEMVs, absorbed attention
        logits = s.feed([int(np.argmax(logits))])
    after = _specializations()
    new = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert not new, f"specialized during the forward pass, not by warmup(): {new}"
    assert sum(before.values()) > 10
