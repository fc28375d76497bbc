"""Export the trained demo model (train.py's OUT) as an official K2-Thinking checkpoint folder, then
check it through the project's runtime.

    python tools/demo_model/export.py --train build/demo_model --dest kimi_desktop/demo_model

Layout: config.json (compressed-tensors INT4 quantization_config), model-0000k-of-00002.safetensors +
model.safetensors.index.json, tiktoken.model, tokenizer_config.json, chat_template.jinja,
generation_config.json. Routed experts are INT4 pack-quantized (group 32, bf16 scales), the rest bf16,
router biases f32, as in K2-Thinking.

Checks (asserted): the runtime's logits on a few prompts match a torch model holding exactly the
stored weights (relative error below STORED_TOL: only float32 summation order differs), and the
held-out loss through the runtime is within LOSS_TOL of the trained float32 model's (what bf16
rounding of the other weights costs; the experts trained on their INT4 values already). The largest
logit difference to the float32 model is reported, not asserted: near a routing tie, rounding can
flip one expert. Results, with the unigram baseline, go to results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import train  # noqa: E402
from model import K2  # noqa: E402

from kimi_desktop.offload.formats import quantize_int4, unpack_int4  # noqa: E402
from kimi_desktop.offload.safetensors import TensorSpec, write_checkpoint  # noqa: E402
from kimi_desktop.runtime import load_model, load_tokenizer  # noqa: E402
from kimi_desktop.runtime.config import ModelConfig  # noqa: E402
from kimi_desktop.testmodel import tensor_shapes  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
STORED_TOL = 1e-3           # runtime vs torch on the stored weights
LOSS_TOL = 0.02             # nats/token: held-out loss, runtime (bf16 + INT4) vs the float32 torch model
PROMPTS = ("What does the assert statement do?", "What does json.dumps do?", "Hello")


def stored_tensors(state: dict, cfg: dict) -> dict[str, np.ndarray]:
    """Checkpoint tensors by name: bf16 weights, INT4 experts (packed, scale, shape), f32 biases."""
    out: dict[str, np.ndarray] = {}
    for name, shape, kind in tensor_shapes(cfg):
        key = name if kind != "linear" else name + ".weight"
        w = state[key].float().numpy()
        assert w.shape == tuple(shape), (key, w.shape, shape)
        if kind == "bias":
            out[name] = w.astype(np.float32)
        elif kind == "linear" and ".mlp.experts." in name:
            packed, scale = quantize_int4(w, 32)
            out[name + ".weight_packed"], out[name + ".weight_scale"] = packed, scale
            out[name + ".weight_shape"] = np.array(shape, np.int64)
        else:
            out[key] = w.astype(BF16)
    return out


def dequantized_state(tensors: dict[str, np.ndarray], state: dict) -> dict[str, torch.Tensor]:
    """The torch state holding exactly the stored values (experts dequantized from their nibbles)."""
    new = {}
    for key in state:
        if key.endswith(".weight") and key[: -len(".weight")] + ".weight_packed" in tensors:
            p = key[: -len(".weight")]
            shape = tuple(tensors[p + ".weight_shape"])
            q = unpack_int4(tensors[p + ".weight_packed"], shape[1]).astype(np.float32)
            s = tensors[p + ".weight_scale"].astype(np.float32)
            new[key] = torch.from_numpy(q * np.repeat(s, 32, axis=1))
        elif key in tensors:
            new[key] = torch.from_numpy(tensors[key].astype(np.float32))
        else:
            raise KeyError(f"{key} is not in the checkpoint")
    return new


def write_folder(dest: Path, train_dir: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> None:
    """Atomic: a temp folder beside dest, renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    order = [n for name, _, kind in tensor_shapes(cfg)
             for n in ([name + s for s in (".weight_packed", ".weight_scale", ".weight_shape")]
                       if name + ".weight_packed" in tensors else [name if kind != "linear" else name + ".weight"])]
    dtype = {np.dtype(np.float32): "F32", BF16: "BF16", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}
    specs = [TensorSpec(n, dtype[tensors[n].dtype], tensors[n].shape, lambda n=n: tensors[n]) for n in order]
    write_checkpoint(tmp, specs, shards=2)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    # greedy by default: at this size sampling wanders off into grammar-rule text within a sentence
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    for f in (train_dir / "tokenizer").iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.chmod(0o755)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def torch_model(cfg: ModelConfig, state: dict) -> K2:
    m = K2(cfg, train.SEQ * 4)
    m.load_state_dict(state)
    return m.eval()


def check_logits(dest: Path, cfg: ModelConfig, trained: K2, stored: K2) -> dict:
    tok = load_tokenizer(dest)
    runtime = load_model(dest)
    worst = {"stored": 0.0, "trained": 0.0}
    for p in PROMPTS:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": p}]))
        got = runtime.logits(ids)
        with torch.no_grad():
            for name, m in (("stored", stored), ("trained", trained)):
                ref = m(torch.tensor([ids]))[0].numpy()
                worst[name] = max(worst[name], rel_err(got, ref))
    print(f"logits, relative error: runtime vs torch on the stored weights {worst['stored']:.2e}, "
          f"vs the trained float32 model {worst['trained']:.2e}", flush=True)
    assert worst["stored"] < STORED_TOL, f"runtime vs torch on the stored weights: {worst['stored']:.2e}"
    return worst


def heldout_losses(dest: Path, trained: K2, held: torch.Tensor) -> dict:
    runtime = load_model(dest)
    nll = []
    for w in held:
        logits = runtime.logits(w[:-1].tolist())                                  # [SEQ, vocab]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(w) - 1), w[1:].numpy()])
    with torch.no_grad():
        torch_loss = train.loss_of(trained, held).item()
    out = {"runtime_int4": float(np.mean(nll)), "torch_trained": torch_loss}
    assert abs(out["runtime_int4"] - torch_loss) < LOSS_TOL, f"held-out loss, runtime vs torch: {out}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="train.py's --out folder")
    ap.add_argument("--dest", type=Path, required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg_dict = json.loads((a.train / "config.json").read_text(encoding="utf-8"))
    cfg = ModelConfig.from_dict(cfg_dict)
    state = torch.load(a.train / "state.pt")
    tensors = stored_tensors(state, cfg_dict)
    write_folder(a.dest, a.train, cfg_dict, tensors)
    trained, stored = torch_model(cfg, state), torch_model(cfg, dequantized_state(tensors, state))
    worst = check_logits(a.dest, cfg, trained, stored)
    tok = load_tokenizer(a.dest)
    records = corpus.load()
    held = train.heldout_windows(*train.encode_records(tok, records, "heldout"))
    log = [json.loads(line) for line in (a.train / "log.jsonl").read_text().splitlines()]
    losses = heldout_losses(a.dest, trained, held)
    size = sum(f.stat().st_size for f in a.dest.iterdir())
    results = {"logit_rel_err": worst, "heldout_loss": losses, "unigram_baseline": log[0]["unigram_baseline"],
               "steps": log[-1]["step"] + 1, "schedule_steps": log[0]["steps"], "train_seconds": log[-1]["s"],
               "seed": log[0]["seed"],
               "threads": log[0]["threads"], "bytes_on_disk": size, "vocab_size": cfg.vocab_size,
               "perplexity_runtime": math.exp(losses["runtime_int4"])}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
