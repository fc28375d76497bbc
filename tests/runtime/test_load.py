"""Opening a checkpoint: cost O(headers), clear errors for bad configs, no torch in the package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimi_desktop.offload.safetensors import CheckpointError
from kimi_desktop.runtime import load_model

REPO = Path(__file__).resolve().parents[2]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_open_reads_no_tensor_data(tiny_int4, tmp_path):
    folder = copy_ckpt(tiny_int4, tmp_path / "m")
    model = load_model(folder)
    assert model.ckpt.stats.bytes_viewed == 0 and model.ckpt.stats.tensors_viewed == 0
    # Stronger than counting: after opening, overwrite every float tensor's bytes with NaN.
    # Had load_model copied any weight, the logits would stay finite.
    ids = [1, 2, 3]
    for name in model.ckpt.names():
        info = model.ckpt.info(name)
        if info.dtype in ("BF16", "F32", "F8_E4M3"):
            with open(info.path, "r+b") as fh:
                fh.seek(info.start)
                fh.write(b"\xff" * info.nbytes)
    logits = model.logits(ids)
    assert np.isnan(logits).any()
    assert model.ckpt.stats.bytes_viewed > 0


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    copy_ckpt(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_from_another_architecture(tiny_int4, tmp_path):
    folder = _edit_config(tiny_int4, tmp_path / "m", model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'llama'"):
        load_model(folder)


def test_config_missing_required_key(tiny_int4, tmp_path):
    folder = _edit_config(tiny_int4, tmp_path / "m", kv_lora_rank=None)
    with pytest.raises(CheckpointError, match=r"config\.json.*'kv_lora_rank'"):
        load_model(folder)


def test_config_contradicts_tensor_shape(tiny_int4, tmp_path):
    folder = _edit_config(tiny_int4, tmp_path / "m", q_lora_rank=64)
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-0000\d\.safetensors.*q_a_proj"):
        load_model(folder)


def test_missing_expert_tensor_is_named_at_open(tiny_int4, tmp_path):
    from kimi_desktop.offload.safetensors import SafetensorsFile, write_safetensors

    folder = copy_ckpt(tiny_int4, tmp_path / "m")
    gone = "model.layers.2.mlp.experts.7.down_proj.weight_packed"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"].pop(gone)
    with SafetensorsFile(shard) as f:
        kept = {n: np.array(f.get(n)) for n in f.tensors if n != gone}
    write_safetensors(shard, kept)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"experts\.7\.down_proj\.weight_packed"):
        load_model(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path)


def test_package_never_imports_torch(tiny_int4):
    code = (
        "import sys\n"
        "from kimi_desktop.runtime import load_model, load_tokenizer\n"
        "import kimi_desktop.cli, kimi_desktop.testmodel\n"
        f"m = load_model({str(tiny_int4)!r})\n"
        "list(m.generate([1, 2, 3], max_new_tokens=3))\n"
        f"load_tokenizer({str(tiny_int4)!r}).encode('hi')\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'compressed_tensors'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for path in list((REPO / "kimi_desktop").rglob("*.py")) + list((REPO / "runtime").rglob("*.py")) + \
            list((REPO / "offload").rglob("*.py")):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
