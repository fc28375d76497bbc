"""Train the demo model: K2's architecture, tiny, on the committed corpus, on the CPU.

    nice -n 10 python tools/demo_model/train.py --out build/demo_model          # ~28 min, one core
    python tools/demo_model/train.py --out /tmp/m --measure                     # steps/s only

Writes OUT/tokenizer/ (the BPE), OUT/config.json, OUT/state.pt (weights and router biases) and
OUT/log.jsonl (training loss per step, held-out loss every EVAL_EVERY steps, the unigram baseline).
export.py turns OUT into the shipped checkpoint folder.

Reproducible: every random choice comes from --seed (torch and numpy generators made here), and
the thread count is fixed, so the same seed on the same machine gives the same weights. Another CPU
(another BLAS kernel, other vector width) rounds the float sums differently and drifts apart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import tokenizer as bpe  # noqa: E402
from model import K2, init_weights  # noqa: E402

from kimi_desktop.runtime import load_tokenizer  # noqa: E402
from kimi_desktop.runtime.config import ModelConfig  # noqa: E402
from kimi_desktop.testmodel import make_config  # noqa: E402

SEQ = 128
BATCH = 16
EVAL_EVERY = 25
EVAL_WINDOWS = 24
SAVE_EVERY = 100
LR, WARMUP, MIN_LR_FRAC, WEIGHT_DECAY = 3e-3, 100, 0.1, 0.1
BIAS_RATE = 1e-3            # aux-loss-free balancing: router bias step per update (DeepSeek-V3's gamma)
CHAT_SHARE = 0.75            # of each batch's windows, from the dialogues


def demo_config(n_base: int) -> dict:
    """config.json: K2's keys and layout (make_config's), the demo's dimensions."""
    cfg = make_config("tiny", "int4", moe_layers=3, n_group=1, topk_group=1)
    cfg.update({
        "vocab_size": n_base + 256, "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 16, "num_experts_per_tok": 4,
        "bos_token_id": n_base, "eos_token_id": n_base + 2, "pad_token_id": n_base + 255,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 128},
        "max_position_embeddings": 4096,
    })
    return cfg


def encode_records(tok, records: list[dict], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc stream, chat stream) token ids: documents end with [EOS], dialogues are rendered with
    the chat template (default system prompt, the answer closed by <|im_end|>)."""
    eos = tok.special_ids["[EOS]"]
    docs, chats = [], []
    for r in records:
        if r["split"] != split:
            continue
        if r["kind"] == "doc":
            docs += tok.encode(r["text"]) + [eos]
        else:
            msgs = [{"role": "user", "content": r["user"]}, {"role": "assistant", "content": r["assistant"]}]
            chats += tok.encode(tok.render_chat(msgs, add_generation_prompt=False))
    return np.array(docs, np.int64), np.array(chats, np.int64)


def windows(stream: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    """[n, SEQ + 1] windows of stream at the given starts."""
    return torch.from_numpy(np.stack([stream[s:s + SEQ + 1] for s in starts]))


def batch(rng: np.random.Generator, docs: np.ndarray, chats: np.ndarray) -> torch.Tensor:
    n_chat = round(BATCH * CHAT_SHARE)
    return torch.cat([windows(chats, rng.integers(0, len(chats) - SEQ - 1, n_chat)),
                      windows(docs, rng.integers(0, len(docs) - SEQ - 1, BATCH - n_chat))])


def heldout_windows(docs: np.ndarray, chats: np.ndarray) -> torch.Tensor:
    """Fixed evenly spaced windows, half from each held-out stream."""
    half = EVAL_WINDOWS // 2
    return torch.cat([windows(s, np.linspace(0, len(s) - SEQ - 1, half).astype(int)) for s in (chats, docs)])


def loss_of(model: K2, w: torch.Tensor) -> torch.Tensor:
    logits = model(w[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))


def unigram_loss(train: np.ndarray, heldout: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of the held-out targets under the training tokens' unigram
    distribution (add-one smoothed): what a model that ignores context can reach."""
    p = (np.bincount(train, minlength=vocab) + 1.0) / (len(train) + vocab)
    return float(-np.log(p[heldout[:, 1:].numpy().ravel()]).mean())


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer(model: K2) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                             lr=LR, betas=(0.9, 0.95), eps=1e-8)


def balance_routers(model: K2) -> None:
    """Aux-loss-free load balancing: raise the bias of under-used experts, lower the over-used."""
    for moe in model.moe_layers():
        b = moe.gate.e_score_correction_bias
        b += BIAS_RATE * torch.sign(moe.load.mean() - moe.load)


def prepare(out: Path):
    records = corpus.load()
    ranks = bpe.train_ranks(bpe.training_texts(records))
    bpe.write_tokenizer(out / "tokenizer", ranks)
    tok = load_tokenizer(out / "tokenizer")
    cfg_dict = demo_config(len(ranks))
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n", encoding="utf-8")
    train_docs, train_chats = encode_records(tok, records, "train")
    held_docs, held_chats = encode_records(tok, records, "heldout")
    return ModelConfig.from_dict(cfg_dict), train_docs, train_chats, heldout_windows(held_docs, held_chats)


def train(out: Path, steps: int, seed: int, measure: bool, stop_at: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg, docs, chats, held = prepare(out)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = K2(cfg, SEQ)
    init_weights(model, seed)
    opt = optimizer(model)
    baseline = unigram_loss(np.concatenate([docs, chats]), held, cfg.vocab_size)
    print(f"train tokens: {len(docs)} doc + {len(chats)} chat; held-out windows {tuple(held.shape)}; "
          f"unigram baseline {baseline:.4f}", flush=True)
    log = open(out / "log.jsonl", "w", encoding="utf-8")
    log.write(json.dumps({"unigram_baseline": baseline, "train_doc_tokens": len(docs),
                          "train_chat_tokens": len(chats), "steps": steps, "stop_at": stop_at, "seed": seed,
                          "threads": torch.get_num_threads()}) + "\n")
    t0 = time.monotonic()
    for step in range(min(steps, stop_at or steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        model.train()
        loss = loss_of(model, batch(rng, docs, chats))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            balance_routers(model)
        rec = {"step": step, "train": round(loss.item(), 5), "s": round(time.monotonic() - t0, 1)}
        if measure and step == 1:
            t1 = time.monotonic()
        if measure and step == 11:
            print(f"{10 / (time.monotonic() - t1):.3f} steps/s", flush=True)
            return
        if (step + 1) % EVAL_EVERY == 0 or step == steps - 1 or step + 1 == stop_at:
            model.eval()
            with torch.no_grad():
                rec["heldout"] = round(loss_of(model, held).item(), 5)
            print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % SAVE_EVERY == 0:
            torch.save(model.state_dict(), out / "state.pt")
    torch.save(model.state_dict(), out / "state.pt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this many steps (the learning-rate schedule still spans --steps)")
    ap.add_argument("--seed", type=int, default=0)
    # one thread: on a 2-core machine shared with other work, torch's second OpenMP thread spins at
    # every barrier (measured here: 5 s/step with 2 threads under load, 0.55 s with 1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", action="store_true", help="print steps/s over steps 2-11 and stop")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    train(a.out, a.steps, a.seed, a.measure, a.stop_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
