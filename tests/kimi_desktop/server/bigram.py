"""A scripted checkpoint: a tiny K2 checkpoint in the official INT4 layout whose greedy output, through
the real model path, is a fixed text.

Every attention o_proj and every dense / routed-expert / shared-expert down_proj is zero, so no block
adds anything to the residual stream: the last layer's output at a position is its token's embedding,
and the logits are lm_head @ final_norm(embed[t]), a function of the current token t only (a bigram).
lm_head is then solved so that argmax picks next(t) along the chain

    prompt tail (<|im_middle|>, the end of the generation prompt) -> the text's tokens -> <|im_end|>

(K2-Thinking's generation prompt does not open <think>, so a text with reasoning starts with it.)

Every other tensor (attention, routers, the experts' gate / up) stays the base checkpoint's random one,
so the whole forward pass still runs on the stored formats.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from kimi_desktop.offload.formats import pack_int4
from kimi_desktop.offload.safetensors import Checkpoint, TensorSpec, write_checkpoint
from kimi_desktop.runtime import load_tokenizer

BF16 = np.dtype(ml_dtypes.bfloat16)
GAIN = 12.0             # the chosen logit; every other one of a chain token's logits is ~0
MIN_MARGIN = 1.0        # logit units, checked in float64 on the stored bf16 weights
GENERATION_PROMPT_END = "<|im_middle|>"
# what the tests' scripted checkpoint writes: no token of it repeats, so a bigram can say it
BIGRAM_TEXT = ('<think>I should look it up.</think><|tool_calls_section_begin|><|tool_call_begin|>'
               'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
               '<|tool_calls_section_end|>')


def bigram_chain(tokenizer, text: str, start: str = GENERATION_PROMPT_END) -> dict[int, int]:
    """{token: next token} along start -> encode(text) -> <|im_end|>; ValueError if a token needs two
    successors (a bigram cannot say both)."""
    sp = tokenizer.special_ids
    chain = [sp[start], *tokenizer.encode(text), sp["<|im_end|>"]]
    nxt: dict[int, int] = {}
    for t, s in zip(chain, chain[1:]):
        if nxt.setdefault(t, s) != s:
            raise ValueError(f"token {tokenizer.decode([t])!r} ({t}) is followed by both "
                             f"{tokenizer.decode([nxt[t]])!r} and {tokenizer.decode([s])!r} in the target text")
    return nxt


def final_hidden(embed: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    """embed rows [n, D] (bf16) -> final_norm(embed) [n, D] float64: the hidden state lm_head sees."""
    x = embed.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * norm.astype(np.float64)


def solve_lm_head(h: np.ndarray, succ: np.ndarray, vocab: int) -> np.ndarray:
    """h [n, D] hidden states of the chain tokens, succ [n] their successors -> lm_head [vocab, D] bf16
    with h @ lm_head.T = GAIN * onehot(succ) (least squares; exact while n <= D and h has full rank)."""
    n, D = h.shape
    target = np.zeros((n, vocab))                               # [n, vocab]
    target[np.arange(n), succ] = GAIN
    w, *_ = np.linalg.lstsq(h, target, rcond=None)             # [D, vocab]
    return w.T.astype(np.float32).astype(BF16)                  # [vocab, D]


def margin(h: np.ndarray, succ: np.ndarray, lm_head: np.ndarray) -> float:
    """The smallest gap between the successor's logit and the best other one, over the chain."""
    logits = h @ lm_head.astype(np.float64).T                   # [n, vocab]
    rows = np.arange(len(succ))
    chosen = logits[rows, succ].copy()
    logits[rows, succ] = -np.inf
    return float(np.min(chosen - logits.max(axis=1)))


def make_bigram_model(base: str | Path, out: str | Path, text: str) -> Path:
    """Copy the checkpoint folder `base` (INT4 layout, e.g. make_test_model's) to `out` with the block
    outputs zeroed and lm_head solved so that greedy decoding after the generation prompt writes `text`
    then <|im_end|>."""
    base, out = Path(base), Path(out)
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if (cfg.get("quantization_config") or {}).get("format") != "pack-quantized":
        raise ValueError(f"{base}: expected an INT4 (compressed-tensors pack-quantized) checkpoint")
    tok = load_tokenizer(base)
    nxt = bigram_chain(tok, text)
    ids = np.array(list(nxt), np.int64)                         # [n] chain tokens
    succ = np.array([nxt[t] for t in ids], np.int64)            # [n] their successors
    with Checkpoint(base) as src:
        h = final_hidden(src.read_rows("model.embed_tokens.weight", ids), src.read("model.norm.weight"),
                         cfg["rms_norm_eps"])                     # [n, D]
        lm_head = solve_lm_head(h, succ, cfg["vocab_size"])     # [vocab, D] bf16
        m = margin(h, succ, lm_head)
        if m < MIN_MARGIN:
            raise ValueError(f"bigram margin {m:.3f} < {MIN_MARGIN}: the hidden size is too small for this chain")

        def tensor(info):
            name = info.name
            if name == "lm_head.weight":
                return lambda: lm_head
            if name.endswith("self_attn.o_proj.weight") or name.endswith("down_proj.weight"):
                return lambda: np.zeros(info.shape, info.np_dtype)      # bf16 (K2 leaves these unquantized)
            if name.endswith("down_proj.weight_packed"):                # routed experts: INT4, [D, I/8] int32
                # q = 0 is stored as nibble 8 (offset +8), 0x88888888 per int32; the scale stays as it is
                return lambda: pack_int4(np.zeros((info.shape[0], info.shape[1] * 8), np.int8))
            return lambda: src.read(name)

        infos = [src.info(n) for n in src.names()]
        out.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and not f.name.startswith("model"):          # config, tokenizer, template
                shutil.copy2(f, out / f.name)
        write_checkpoint(out, [TensorSpec(i.name, i.dtype, i.shape, tensor(i)) for i in infos],
                         shards=len({i.path for i in infos}))
    return out
