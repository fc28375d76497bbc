"""The demo model's byte-level BPE: trained with `tokenizers`, written as K2's tokenizer files.

Pre-tokens come from K2's own pattern (the runtime's PAT_STR, run with `regex` in V1 mode), each fed
to the trainer as one word, so merges never cross a pre-token, as in K2's tiktoken vocabulary. The
trained merges become tiktoken ranks: the 256 single bytes first (rank b = byte b), then each merge
in the trainer's order. tiktoken merges by rank; a token is kept only if rank-BPE rebuilds it from
its own two parts (the "valid vocabulary" property llama.cpp's converter relies on).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from kimi_desktop.runtime.chat_template import builtin_template_text
from kimi_desktop.runtime.tokenizer import CONFIG_FILE, PAT_STR, TEMPLATE_FILE, VOCAB_FILE, bpe_split
from kimi_desktop.runtime.tokenizer_files import tiktoken_model_text, tokenizer_config

N_BASE = 4096           # BPE tokens; K2's 256 special ids follow them
SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, which `tokenizers`' ByteLevel uses for its vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def training_texts(records: list[dict]) -> list[str]:
    out = [SYSTEM_PROMPT, "system", "user", "assistant"]
    for r in records:
        if r["split"] != "train":
            continue
        out += [r["text"]] if r["kind"] == "doc" else [r["user"], r["assistant"]]
    return out


def pretoken_counts(texts: list[str]) -> Counter:
    import regex

    pat = regex.compile(PAT_STR, flags=regex.V1)
    counts: Counter = Counter()
    for t in texts:
        counts.update(pat.findall(t))
    return counts


def train_ranks(texts: list[str], n_base: int = N_BASE) -> dict[bytes, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    counts = pretoken_counts(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_base, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    words = sorted(counts)                      # fixed order: the trainer's ties break the same way
    tok.train_from_iterator((w for w in words for _ in range(counts[w])), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    back = {c: b for b, c in _bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        return bytes(back[c] for c in s)

    ranks = {bytes([b]): b for b in range(256)}
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ")
        t = to_bytes(a) + to_bytes(b)
        if t in ranks or len(ranks) >= n_base:
            continue
        if bpe_split(ranks, t) == [to_bytes(a), to_bytes(b)]:
            ranks[t] = len(ranks)
    return ranks


def write_tokenizer(folder: Path, ranks: dict[bytes, int]) -> None:
    """tiktoken.model, tokenizer_config.json (K2's special tokens after the base vocabulary) and
    K2-Thinking's chat template, as in an official checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VOCAB_FILE).write_text(tiktoken_model_text(ranks), encoding="ascii")
    (folder / CONFIG_FILE).write_text(json.dumps(tokenizer_config(len(ranks), "thinking"), indent=2,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / TEMPLATE_FILE).write_text(builtin_template_text("thinking"), encoding="utf-8")
