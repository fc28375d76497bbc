"""The shipped demo model (kimi_desktop/demo_model/, trained by tools/demo_model/): it loads through the
same path as an official K2 folder, answers chat requests in real words in a sensible order, ends its
turn by itself, and is deterministic under a seed; random weights over the same vocabulary and
config fail the same word check."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from kimi_desktop.chat import Sampling
from kimi_desktop.demo import demo_model_path
from kimi_desktop.engines import open_engine
from kimi_desktop.offload.safetensors import write_checkpoint
from kimi_desktop.testmodel import build_specs

CORPUS = Path(__file__).resolve().parents[2] / "tools" / "demo_model" / "corpus.jsonl.gz"
PROMPTS = ("What does the assert statement do?", "What is json.dumps?", "Hello",
           "Tell me about the for statement.")
MAX_TOKENS = 80
MIN_WORDS_KNOWN = 0.9       # share of output words that occur in the corpus
MIN_PAIRS_KNOWN = 0.6       # share of adjacent output word pairs that occur in the corpus
WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@pytest.fixture(scope="module")
def corpus_words() -> tuple[set[str], set[tuple[str, str]]]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    vocab, pairs = set(), set()
    for r in records:
        for text in ([r["text"]] if r["kind"] == "doc" else [r["user"], r["assistant"]]):
            w = words(text)
            vocab.update(w)
            pairs.update(zip(w, w[1:]))
    return vocab, pairs


def known_shares(text: str, corpus_words) -> tuple[float, float]:
    vocab, pairs = corpus_words
    w = words(text)
    p = list(zip(w, w[1:]))
    return (sum(x in vocab for x in w) / max(1, len(w)), sum(x in pairs for x in p) / max(1, len(p)))


def answers(engine, sampling: Sampling):
    return [engine.chat([{"role": "user", "content": p}], sampling=sampling).result() for p in PROMPTS]


@pytest.fixture(scope="module")
def engine():
    e = open_engine("native", demo_model_path(), expert_cache_bytes=1 << 20)
    yield e
    e.close()


def test_the_shipped_folder_is_an_official_int4_layout():
    d = demo_model_path()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) < 15 << 20
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["quantization_config"]["format"] == "pack-quantized"
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["n_group"] == cfg["topk_group"] == 1
    assert cfg["q_lora_rank"] and cfg["first_k_dense_replace"] == 1 and cfg["num_hidden_layers"] >= 3
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.down_proj.weight_packed" in index
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index


def test_answers_in_real_words_and_ends_its_turn(engine, corpus_words):
    results = answers(engine, Sampling(temperature=0, max_tokens=MAX_TOKENS))
    st = engine.stats()
    assert st["expert_cache_misses"] > 0 and st["expert_cache_budget"]     # INT4 experts via the store
    assert len({r.content for r in results}) >= 3, results      # the answer depends on the question
    for p, r in zip(PROMPTS, results):
        assert r.finish_reason == "stop", (p, r.content)
        assert len(words(r.content)) >= 3, (p, r.content)
    text = " ".join(r.content for r in results)      # shares over all answers: one odd word moves them little
    w_share, p_share = known_shares(text, corpus_words)
    assert w_share >= MIN_WORDS_KNOWN and p_share >= MIN_PAIRS_KNOWN, (text, w_share, p_share)


def test_sampling_is_deterministic_under_a_seed(engine, corpus_words):
    s = Sampling(temperature=0.7, top_p=0.9, seed=7, max_tokens=MAX_TOKENS)
    a, b = answers(engine, s), answers(engine, s)
    assert [r.content for r in a] == [r.content for r in b]
    other = answers(engine, Sampling(temperature=0.7, top_p=0.9, seed=8, max_tokens=MAX_TOKENS))
    assert [r.content for r in other] != [r.content for r in a]
    text = " ".join(r.content for r in a)
    w_share, p_share = known_shares(text, corpus_words)
    assert w_share >= MIN_WORDS_KNOWN and p_share >= MIN_PAIRS_KNOWN, (text, w_share, p_share)


def test_random_weights_over_the_same_vocabulary_fail_the_word_check(tmp_path, corpus_words):
    demo = demo_model_path()
    cfg = json.loads((demo / "config.json").read_text())
    for name in ("config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, tmp_path / name)
    write_checkpoint(tmp_path, build_specs(cfg, "int4", seed=0, routing_skew=0.0, fast_experts=False), shards=2)
    e = open_engine("native", tmp_path, expert_cache_bytes=1 << 20)
    try:
        results = answers(e, Sampling(temperature=0, max_tokens=MAX_TOKENS))
    finally:
        e.close()
    text = " ".join(r.reasoning + " " + r.content for r in results)
    assert len(words(text)) >= 20, text          # enough text for the check to mean something
    w_share, p_share = known_shares(text, corpus_words)
    assert w_share < MIN_WORDS_KNOWN or p_share < MIN_PAIRS_KNOWN, (text, w_share, p_share)
