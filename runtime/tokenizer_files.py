"""Write K2-style tokenizer files into a checkpoint folder (make-test-model and the tests use this).

tiktoken.model holds a synthetic but valid byte-level BPE vocabulary: the 256 single bytes, then
merges learned from a small built-in corpus (English, code, Chinese, emoji, whitespace), pre-token
by pre-token with K2's pattern, then further merges synthesized deterministically from a seed until
the requested size. "Valid" is the property llama.cpp's converter relies on when it rebuilds merges
from tiktoken ranks: each token of rank r, run through BPE with only the merges ranked below r,
ends as exactly the two tokens it was merged from.
"""

from __future__ import annotations

import base64
import functools
import heapq
import json
import random
from pathlib import Path

from .chat_template import builtin_template_text
from .tokenizer import CONFIG_FILE, NUM_RESERVED_SPECIAL, PAT_STR, TEMPLATE_FILE, VOCAB_FILE, bpe_split

# name, offset from num_base, special (special:false survives decode(skip_special_tokens=True))
K2_SPECIAL_TOKENS: tuple[tuple[str, int, bool], ...] = (
    ("[BOS]", 0, True),
    ("[EOS]", 1, True),
    ("<|im_end|>", 2, True),
    ("<|im_user|>", 3, True),
    ("<|im_assistant|>", 4, True),
    ("<|start_header_id|>", 6, True),
    ("<|end_header_id|>", 7, True),
    ("[EOT]", 9, True),
    ("<|im_system|>", 10, True),
    ("<|tool_calls_section_begin|>", 11, False),
    ("<|tool_calls_section_end|>", 12, False),
    ("<|tool_call_begin|>", 13, False),
    ("<|tool_call_argument_begin|>", 14, False),
    ("<|tool_call_end|>", 15, False),
    ("<|im_middle|>", 17, True),
    ("<|media_begin|>", 18, True),
    ("<|media_content|>", 19, True),
    ("<|media_end|>", 20, True),
    ("<|media_pad|>", 21, True),
    ("<think>", 22, False),
    ("</think>", 23, False),
    ("[UNK]", 254, True),
    ("[PAD]", 255, True),
)
# K2-Instruct (0905) has no media or think tokens.
_INSTRUCT_SKIP = {"<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>", "<think>", "</think>"}
_ADDITIONAL_SPECIAL = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                       "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]

MAX_SYNTH_LEN = 16          # bytes; synthesized tokens stay word-sized

CORPUS = r'''
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly!
Hello, world. How are you today? I'm fine, thanks; we'll see what they've done, and you'd agree it's true.
You are Kimi, an AI assistant created by Moonshot AI. Be brief and helpful.
The user asked about the weather in Paris, London, Tokyo, Beijing and New York. It is sunny, 21C.
Kimi K2 is a mixture-of-experts language model with 1 trillion parameters and 32 billion active
parameters. It uses multi-head latent attention, 384 routed experts, top-8 routing and one shared expert.
Please summarize the following document in three sentences, then list the key points as bullets:
- The experts are streamed from the disk into memory on demand.
- The cache keeps the most frequently used experts resident.
- Reading 4 KiB-aligned blocks with direct I/O avoids the page cache.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 65536 3.14159 2.71828 1e-6 -17 +23 99.9%
Dates: 2025-07-11, 2025-09-05, 2025-11-06. Time: 12:30:45. Money: $19.99, 100 EUR, 5,000 yen.
Question: what is 2+2? Answer: 4. Question: what is the capital of France? Answer: Paris.
function get_weather(city) returns the current weather for a city; functions.get_weather:0
## Return of functions.get_weather:0
{"city": "Paris", "unit": "celsius", "temperature": 21, "condition": "sunny", "ok": true, "items": [1, 2, 3]}
{"type":"function","function":{"name":"get_weather","description":"Get the weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}
system user assistant tool tool_declare reasoning content arguments name id role messages
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
Every morning it read the waves, counted the gulls and wrote one line; by winter the book was full.
It's not what you say, it's how you say it. They're here, we've won, she'll come, he'd go, I'd stay.
THE END. NOTE: READ THIS CAREFULLY. HTTP GET POST PUT DELETE JSON XML HTML CSS API URL UTF-8 ASCII.

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Tokenizer:
    def __init__(self, path):
        self.path = path
        self.vocab = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab[t] for t in text.split() if t in self.vocab]


if __name__ == "__main__":
    import sys
    print(fibonacci(int(sys.argv[1])), file=sys.stderr)
    for i in range(10):
        if i % 2 == 0:
            continue
        print(f"{i=} {i ** 2=}")

#include <stdio.h>
int main(int argc, char **argv) {
	for (int i = 0; i < argc; i++) {
		printf("%d: %s\n", i, argv[i]);
	}
	return 0;
}

const add = (a, b) => a + b;
export async function fetchJson(url) {
  const response = await fetch(url, { method: "GET" });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return await response.json();
}
SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 GROUP BY name ORDER BY n DESC LIMIT 10;
$ pip install -e . && pytest -q tests/runtime
git commit -m "Add tokenizer" && git push origin main

人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
你好，世界！今天天气很好，我们去公园散步吧。月之暗面是一家人工智能公司，Kimi 是它的智能助手。
请用三句话总结下面的文章，然后列出要点。北京、上海、深圳、杭州都是中国的大城市。
机器学习、深度学习、自然语言处理、大语言模型、专家混合模型、注意力机制、推理、工具调用。
日本語のテキストも少し：こんにちは、元気ですか？ 한국어 텍스트: 안녕하세요, 반갑습니다.
Ünïcödé àccents: café, naïve, façade, résumé, Straße, Ørsted, Łódź, Москва, Αθήνα, שלום, مرحبا, नमस्ते.
Emoji: 😀 😂 🤖 🚀 ✨ 🔥 👍 👍🏽 ❤️ 🎉 🌍 🐍 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🇯🇵 ☕ ✅ ❌ ⚠️
Arrows and symbols: → ← ↑ ↓ ⇒ ≤ ≥ ≠ ≈ ∞ ∑ ∏ √ π µ ° © ® ™ • … “quoted” ‘single’ — – « » ¿ ¡
Whitespace:    four spaces,	one tab,		two tabs, trailing spaces   
        eight spaces
                sixteen spaces



three blank lines above.
''' + "Windows line endings\r\nand a lone CR\r end.\r\n" + " " * 40 + "\n" + "-" * 32 + "\n"


def _pretokenize(text: str) -> list[str]:
    import regex      # tiktoken's own dependency; V1 is needed for the `&&` class intersections

    return regex.findall(PAT_STR, text, flags=regex.V1)


@functools.lru_cache(maxsize=8)
def _build_tokens(n_base: int, seed: int) -> tuple[bytes, ...]:
    if n_base < 256:
        raise ValueError(f"n_base must be at least 256 (the single bytes), got {n_base}")
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    ranks: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}

    def add(t: bytes) -> int:
        ranks[t] = len(tokens)
        tokens.append(t)
        return ranks[t]

    _learn_merges(tokens, ranks, add, n_base)
    _synthesize_merges(tokens, ranks, add, n_base, seed)
    return tuple(tokens)


def _learn_merges(tokens: list[bytes], ranks: dict[bytes, int], add, n_base: int) -> None:
    """Frequency-ordered BPE merges over the corpus's pre-tokens (merges never cross them)."""
    counts: dict[str, int] = {}
    for piece in _pretokenize(CORPUS):
        counts[piece] = counts.get(piece, 0) + 1
    words = [list(p.encode("utf-8")) for p in counts]       # token ids per distinct pre-token
    freq = list(counts.values())
    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}

    def account(w: int, sign: int) -> list[tuple[int, int]]:
        ids = words[w]
        touched = []
        for p in zip(ids, ids[1:]):
            pair_count[p] = pair_count.get(p, 0) + sign * freq[w]
            if sign > 0:
                where.setdefault(p, set()).add(w)
            touched.append(p)
        return touched

    for w in range(len(words)):
        account(w, +1)
    heap = [(-c, tokens[a], tokens[b], (a, b)) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while heap and len(tokens) < n_base:
        neg, _, _, p = heapq.heappop(heap)
        if pair_count.get(p, 0) != -neg:     # stale: a fresher entry was pushed when the count changed
            continue
        a, b = p
        merged = tokens[a] + tokens[b]
        if merged in ranks or bpe_split(ranks, merged) != [tokens[a], tokens[b]]:
            pair_count[p] = 0                # not a valid merge here: never take it
            continue
        new = add(merged)
        changed: set[tuple[int, int]] = set()
        for w in sorted(where.pop(p, ())):
            changed.update(account(w, -1))
            ids, out, i = words[w], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
            changed.update(account(w, +1))
        for q in sorted(changed):
            if pair_count.get(q, 0) > 0 and q != p:
                heapq.heappush(heap, (-pair_count[q], tokens[q[0]], tokens[q[1]], q))


def _synthesize_merges(tokens: list[bytes], ranks: dict[bytes, int], add, n_base: int, seed: int) -> None:
    """Deterministic (seeded) extra merges: a random token followed by a random short one, kept
    when BPE with all lower ranks splits it into exactly those two."""
    rng = random.Random(seed)
    short = [t for t in tokens if len(t) <= 3]       # bytes and the corpus's short pieces
    while len(tokens) < n_base:
        a = tokens[rng.randrange(len(tokens))]
        b = short[rng.randrange(len(short))]
        t = a + b
        if len(t) > MAX_SYNTH_LEN or t in ranks:
            continue
        if bpe_split(ranks, t) == [a, b]:
            add(t)


def build_bpe_ranks(n_base: int, seed: int = 0) -> dict[bytes, int]:
    """A valid byte-level BPE vocabulary of exactly n_base tokens: ranks 0..255 are the single
    bytes (rank b = byte b), every later token the merge of two lower-ranked ones."""
    return {t: i for i, t in enumerate(_build_tokens(n_base, seed))}


def tiktoken_model_text(ranks: dict[bytes, int]) -> str:
    """tiktoken.model contents: `base64(token) rank` per line, in rank order."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {r}\n"
                   for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def tokenizer_config(n_base: int, flavor: str = "thinking") -> dict:
    """tokenizer_config.json for a vocabulary of n_base BPE tokens, K2 special tokens at the
    official offsets from n_base."""
    _check_flavor(flavor)
    added = {}
    for name, off, special in K2_SPECIAL_TOKENS:
        if flavor == "instruct" and name in _INSTRUCT_SKIP:
            continue
        added[str(n_base + off)] = {"content": name, "lstrip": False, "normalized": False,
                                    "rstrip": False, "single_word": False, "special": special}
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(_ADDITIONAL_SPECIAL),
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>" if flavor == "thinking" else "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 262144 if flavor == "thinking" else 131072,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }


def write_tokenizer_files(folder: str | Path, n_base: int, seed: int = 0, flavor: str = "thinking") -> int:
    """Write tiktoken.model, tokenizer_config.json and chat_template.jinja into folder.
    Returns the vocabulary size (n_base + 256)."""
    _check_flavor(flavor)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = build_bpe_ranks(n_base, seed)
    (folder / VOCAB_FILE).write_text(tiktoken_model_text(ranks), encoding="ascii")
    (folder / CONFIG_FILE).write_text(json.dumps(tokenizer_config(n_base, flavor), indent=2,
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / TEMPLATE_FILE).write_text(builtin_template_text(flavor), encoding="utf-8")
    return n_base + NUM_RESERVED_SPECIAL


def _check_flavor(flavor: str) -> None:
    if flavor not in ("thinking", "instruct"):
        raise ValueError(f"flavor must be 'thinking' or 'instruct', got {flavor!r}")
