"""Hugging Face transformers' DeepseekV3ForCausalLM as the independent reference (tests only).

The checkpoint is read with the `safetensors` package and dequantized here with
compressed-tensors (INT4) and torch float arithmetic (FP8 blocks): nothing of the project's
reader or formats is used, so the comparison checks them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def dequantize(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Every Linear as a float32 [out, in] `.weight`; other tensors as float32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    qc = cfg.get("quantization_config") or {}
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_shape", ".weight_scale_inv")):
            continue
        if name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            shape = tuple(int(v) for v in tensors[base + ".weight_shape"])
            q = unpack_from_int32(t, 4, torch.Size(shape)).to(torch.float32)        # [out, in] in -8..7
            scale = tensors[base + ".weight_scale"].to(torch.float32)               # [out, in/g]
            group = shape[1] // scale.shape[1]
            out[base + ".weight"] = q * scale.repeat_interleave(group, dim=1)
        elif t.dtype == torch.float8_e4m3fn:
            b0, b1 = qc["weight_block_size"]
            s = tensors[name + "_scale_inv"].to(torch.float32)
            s = s.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[: t.shape[0], : t.shape[1]]
            out[name] = t.to(torch.float32) * s
        else:
            out[name] = t.to(torch.float32)
    return out


def hf_config(cfg: dict):
    from transformers import DeepseekV3Config

    fields = {k: v for k, v in cfg.items()
              if k not in ("quantization_config", "model_type", "architectures", "torch_dtype",
                           "rope_scaling", "moe_layer_freq", "scoring_func", "topk_method",
                           "num_nextn_predict_layers")}
    rs = dict(cfg["rope_scaling"])
    rs["rope_type"] = rs.pop("type", rs.get("rope_type", "yarn"))
    rs["rope_theta"] = cfg["rope_theta"]
    fields.pop("rope_theta", None)
    return DeepseekV3Config(**fields, rope_parameters=rs, num_mtp_layers=0)


def load_reference(folder: Path):
    """A float32 DeepseekV3ForCausalLM holding the checkpoint's dequantized weights."""
    from transformers import DeepseekV3ForCausalLM

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    hf_cfg = hf_config(cfg)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg).to(torch.float32).eval()
    w = dequantize(read_checkpoint(folder), cfg)
    E, first_dense = cfg["n_routed_experts"], cfg["first_k_dense_replace"]
    sd = {}
    for name, t in w.items():
        if ".mlp.experts." in name:
            continue
        sd[name] = t
    for i in range(first_dense, cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        # transformers fuses a layer's experts: gate_up [E, 2I, D] (gate rows first), down [E, D, I]
        sd[p + "gate_up_proj"] = torch.stack(
            [torch.cat([w[f"{p}{e}.gate_proj.weight"], w[f"{p}{e}.up_proj.weight"]]) for e in range(E)])
        sd[p + "down_proj"] = torch.stack([w[f"{p}{e}.down_proj.weight"] for e in range(E)])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    assert not missing and not unexpected, (missing, unexpected)
    return model


@torch.no_grad()
def reference_logits(model, ids) -> torch.Tensor:
    return model(torch.tensor([list(ids)])).logits[0].to(torch.float32).numpy()


@torch.no_grad()
def reference_greedy(model, ids, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens by full recomputation each step, with each step's top-2 logit margin."""
    ids, new, margins = list(ids), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float64)
        top2 = torch.topk(logits, 2).values
        tok = int(torch.argmax(logits))
        new.append(tok)
        margins.append(float(top2[0] - top2[1]))
        ids.append(tok)
    return new, margins
