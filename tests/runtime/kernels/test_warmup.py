"""Model.warmup() makes every kernel specialization a forward pass uses, before the first one.

Checked in a fresh process: in this one, earlier kernel tests have compiled most specializations
already, which would hide one that warmup() misses.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kimi_desktop.runtime import kernels as K

CHECK = r"""
import importlib, json, pkgutil, sys
import numpy as np
from numba.core.registry import CPUDispatcher
from kimi_desktop.runtime import kernels as K, load_model
from kimi_desktop.runtime.kernels._launch import Twin

def specializations():
    out = {}
    for m in pkgutil.iter_modules(K.__path__):
        mod = importlib.import_module(f"{K.__name__}.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == mod.__name__:
                out[f"{m.name}.{name}"] = len(obj.signatures)
            elif isinstance(obj, Twin):              # a parallel kernel and its serial twin
                out[f"{m.name}.{name}"] = len(obj.parallel.signatures)
                out[f"{m.name}.{name}.serial"] = len(obj.serial.signatures)
    return out

model = load_model(sys.argv[1])
model.warmup()
before = specializations()
s = model.session()
logits = s.feed(np.arange(1, 12))            # prefill: tiled GEMMs, prefill attention
for _ in range(3):                           # decode: GEMVs, absorbed attention
    logits = s.feed([int(np.argmax(logits))])
after = specializations()
print(json.dumps({"warm": sum(before.values()),
                  "new": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}}))
"""


@pytest.mark.parametrize("layout", ["int4", "fp8", "bf16"])
def test_warmup_covers_the_forward_pass(make_ckpt, layout):
    r = subprocess.run([sys.executable, "-c", CHECK, str(make_ckpt(layout=layout))], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["new"], f"specialized during the forward pass, not by warmup(): {res['new']}"
    assert res["warm"] > 10


def test_warmup_rejects_unknown_formats():
    with pytest.raises(ValueError, match="int8"):
        K.warmup(("bf16", "int8"))
