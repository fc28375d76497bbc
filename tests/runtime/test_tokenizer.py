"""Tokenizer: round trips, special ids at K2's offsets, long inputs, errors, and the synthetic BPE."""

from __future__ import annotations

import base64
import json
import random
import shutil

import pytest
import tiktoken

from kimi_desktop.runtime import load_tokenizer
from kimi_desktop.runtime.tokenizer import (PAT_STR, IncrementalDecoder, TokenizerError, bpe_split,
                                            load_bpe_ranks, merges_from_ranks)
from kimi_desktop.runtime.tokenizer_files import (CORPUS, K2_SPECIAL_TOKENS, build_bpe_ranks,
                                                  tokenizer_config, write_tokenizer_files)
from kimi_desktop.offload.safetensors import CheckpointError

K2_IDS = {  # reference §4, the real checkpoint's table
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
    "<|im_assistant|>": 163588, "<|start_header_id|>": 163590, "<|end_header_id|>": 163591,
    "[EOT]": 163593, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596, "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598, "<|tool_call_end|>": 163599, "<|im_middle|>": 163601,
    "<|media_begin|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
    "<|media_pad|>": 163605, "<think>": 163606, "</think>": 163607, "[UNK]": 163838, "[PAD]": 163839,
}
TOOL_TOKENS = ["<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>"]


@pytest.fixture(scope="session")
def tok_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok2000")
    write_tokenizer_files(folder, 2000)          # corpus merges plus some synthesized ones
    return folder


@pytest.fixture(scope="session")
def tok(tok_folder):
    return load_tokenizer(tok_folder)


@pytest.fixture(scope="session")
def k2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok163584")
    write_tokenizer_files(folder, 163584)
    return folder


def qwen_bpe(mergeable_ranks, token, max_rank=None):
    """llama.cpp convert_hf_to_gguf.py QwenModel.bpe, written out literally as the reference check."""
    parts = [bytes([b]) for b in token]
    while True:
        min_idx = None
        min_rank = None
        for i, pair in enumerate(zip(parts[:-1], parts[1:])):
            rank = mergeable_ranks.get(pair[0] + pair[1])
            if rank is not None and (min_rank is None or rank < min_rank):
                min_idx = i
                min_rank = rank
        if min_rank is None or (max_rank is not None and min_rank >= max_rank):
            break
        parts = parts[:min_idx] + [parts[min_idx] + parts[min_idx + 1]] + parts[min_idx + 2:]
    return parts


def reference_split(s, max_len):
    """tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, literally."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def reference_encode(tok, text):
    out = []
    for w in range(0, len(text), 400_000):
        for sub in reference_split(text[w:w + 400_000], 25_000):
            out.extend(tok._enc.encode(sub, allowed_special="all"))
    return out


# ------------------------------------------------------------------------------------------
# round trips

ROUND_TRIP = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "人工智能是计算机科学的一个分支。你好，世界！",
    "emoji 😀🚀 ZWJ 👩‍💻 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽 rainbow 🏳️‍🌈",
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]  # tab-indented\r\n",
    "mixed: café Straße Москва 123456789 3.14159 'll 've 're ALLCAPS CamelCase",
    "",
    " ",
    "\n\n\n",
    "\x00\x01 control \x7f chars \u200b zero-width",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_base for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_ordinary_text_gets_multibyte_tokens(tok):
    text = "The user asked about the weather in Paris. 你好，世界！"
    assert len(tok.encode(text)) < len(text.encode("utf-8")) // 2


def test_long_whitespace_runs_split_like_reference(tok):
    text = "a" + " " * 60_001 + "b\n" + "x" * 30_000 + "\t" * 25_001 + "end"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference_encode(tok, text)


def test_one_megabyte_input(tok):
    unit = "Kimi K2 是一个混合专家模型。 Emoji 😀 and code:\n\tx = [1, 2, 3]\n" + " " * 7
    text = (unit * (1_000_000 // len(unit) + 1))[:1_000_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == reference_encode(tok, text)


def test_special_token_strings_become_ids(tok):
    ids = tok.encode("<|im_user|>user<|im_middle|>hi<|im_end|>")
    sp = tok.special_ids
    assert ids[0] == sp["<|im_user|>"] and ids[-1] == sp["<|im_end|>"]
    assert sp["<|im_middle|>"] in ids
    assert tok.decode(ids) == "<|im_user|>user<|im_middle|>hi<|im_end|>"
    assert tok.encode("[BOS]") == [tok.bos_id]           # no BOS added on its own
    assert tok.encode("<think>x</think>") == [sp["<think>"], *tok.encode("x"), sp["</think>"]]
    # upstream's media macro writes <|media_start|>, which is not a token: plain text
    assert all(i < tok.num_base for i in tok.encode("<|media_start|>"))


def test_decode_skip_special_keeps_tool_call_tokens(tok):
    text = ("<|im_assistant|>assistant<|im_middle|>ok<|tool_calls_section_begin|><|tool_call_begin|>"
            "functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == (
        "assistantok<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>")
    reserved = tok.num_base + 5
    assert tok.decode([reserved]) == f"<|reserved_token_{reserved}|>"
    assert tok.decode([reserved], skip_special=True) == ""


def test_decode_bad_ids(tok):
    with pytest.raises(ValueError, match="token id"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="token id"):
        tok.decode([-1])
    assert tok.decode([0xC3]) == "\ufffd"           # half a UTF-8 sequence: replaced, no error


def test_token_bytes_of_specials(tok):
    assert tok.token_bytes(tok.special_ids["<|im_end|>"]) == b"<|im_end|>"
    assert tok.token_bytes(ord("a")) == b"a"         # ranks 0..255 are the bytes


def test_incremental_decoder_holds_back_partial_utf8(tok):
    text = "a😀b 你好 👩‍💻 é"
    ids = [b for b in text.encode("utf-8")]          # one byte per token: every char split
    dec = IncrementalDecoder(tok)
    deltas = [dec.feed([i]) for i in ids]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[4] == "😀"       # held until the 4th byte of 😀
    dec.feed([0xF0, 0x9F])
    assert dec.flush() == "\ufffd"                     # an incomplete tail flushes as U+FFFD
    sp = tok.special_ids
    quiet = IncrementalDecoder(tok, skip_special=True)
    assert quiet.feed([sp["<|im_end|>"], ord("x"), sp["<|tool_call_begin|>"]]) == "x<|tool_call_begin|>"


# ------------------------------------------------------------------------------------------
# special ids and sizes

@pytest.mark.parametrize("folder_fixture,n_base", [("tok_folder", 2000), ("k2_folder", 163584)])
def test_special_ids_at_official_offsets(request, folder_fixture, n_base):
    t = load_tokenizer(request.getfixturevalue(folder_fixture))
    assert t.num_base == n_base and len(t.ranks) == n_base
    assert t.vocab_size == n_base + 256
    for name, off, _ in K2_SPECIAL_TOKENS:
        assert t.special_ids[name] == n_base + off
    for name, i in K2_IDS.items():
        assert t.special_ids[name] == i - 163584 + n_base
    for off in (5, 8, 16, 24, 100, 253):
        assert t.special_ids[f"<|reserved_token_{n_base + off}|>"] == n_base + off
    assert len(t.special_ids) == 256
    assert t.bos_id == n_base and t.eos_ids == (n_base + 2, n_base + 1)


def test_k2_size_matches_real_ids(k2_folder):
    t = load_tokenizer(k2_folder)
    assert {n: t.special_ids[n] for n in K2_IDS} == K2_IDS
    text = "Hello from a 163,584-token vocabulary! 你好 😀<|im_end|>"
    ids = t.encode(text)
    assert t.decode(ids) == text and ids[-1] == 163586


def test_config_fields(tok_folder, tmp_path):
    cfg = json.loads((tok_folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    assert cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["bos_token"] == "[BOS]"
    assert cfg["pad_token"] == "[PAD]" and cfg["unk_token"] == "[UNK]"
    specials = {v["content"]: v["special"] for v in cfg["added_tokens_decoder"].values()}
    assert all(specials[t] is False for t in TOOL_TOKENS)
    assert specials["<|im_end|>"] is True
    assert (tok_folder / "chat_template.jinja").read_text().startswith("{#")
    # instruct: no think / media tokens, eos [EOS]
    assert write_tokenizer_files(tmp_path, 300, flavor="instruct") == 556
    icfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    names = {v["content"] for v in icfg["added_tokens_decoder"].values()}
    assert "<think>" not in names and "<|media_pad|>" not in names and icfg["eos_token"] == "[EOS]"
    t = load_tokenizer(tmp_path)
    assert t.vocab_size == 556 and "<think>" not in t.special_ids
    with pytest.raises(ValueError, match="flavor"):
        tokenizer_config(300, flavor="base")


# ------------------------------------------------------------------------------------------
# errors

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tiktoken_model(tok_folder, tmp_path):
    d = _copy(tok_folder, tmp_path / "c")
    (d / "tiktoken.model").unlink()
    with pytest.raises(TokenizerError, match=r"tiktoken\.model.*not found"):
        load_tokenizer(d)
    assert issubclass(TokenizerError, CheckpointError) and issubclass(TokenizerError, ValueError)


def test_malformed_tiktoken_line(tok_folder, tmp_path):
    d = _copy(tok_folder, tmp_path / "c")
    lines = (d / "tiktoken.model").read_text().splitlines(keepends=True)
    lines[299] = "not*base64 299\n"
    (d / "tiktoken.model").write_text("".join(lines))
    with pytest.raises(TokenizerError, match=r"tiktoken\.model: line 300"):
        load_tokenizer(d)
    lines[299] = lines[299].split()[0] + "\n"
    (d / "tiktoken.model").write_text("".join(lines))
    with pytest.raises(TokenizerError, match="line 300"):
        load_tokenizer(d)


def test_bad_ranks(tmp_path):
    p = tmp_path / "tiktoken.model"
    p.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b + (b > 10)}\n" for b in range(256)))
    with pytest.raises(TokenizerError, match="ranks must be exactly"):
        load_bpe_ranks(p)
    p.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(255)))
    with pytest.raises(TokenizerError, match="single-byte"):
        load_bpe_ranks(p)


def test_config_without_added_tokens_decoder(tok_folder, tmp_path):
    d = _copy(tok_folder, tmp_path / "c")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*added_tokens_decoder"):
        load_tokenizer(d)


def test_special_id_below_num_base(tok_folder, tmp_path):
    d = _copy(tok_folder, tmp_path / "c")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["1999"] = cfg["added_tokens_decoder"].pop("2002")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=r"added_tokens_decoder\['1999'\].*base vocabulary"):
        load_tokenizer(d)


def test_missing_or_invalid_config(tok_folder, tmp_path):
    d = _copy(tok_folder, tmp_path / "c")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: file not found"):
        load_tokenizer(d)


def test_rewritten_vocab_is_not_served_from_a_cache(tmp_path):
    """tiktoken's load_tiktoken_bpe caches local files by path; ours must read the file each time."""
    write_tokenizer_files(tmp_path, 1000)
    assert load_tokenizer(tmp_path).num_base == 1000
    write_tokenizer_files(tmp_path, 1100)
    assert load_tokenizer(tmp_path).num_base == 1100


def test_parse_matches_tiktoken_loader(tok_folder, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")             # no cache for this comparison
    from tiktoken.load import load_tiktoken_bpe
    assert load_bpe_ranks(tok_folder / "tiktoken.model") == load_tiktoken_bpe(str(tok_folder / "tiktoken.model"))


# ------------------------------------------------------------------------------------------
# the synthetic BPE vocabulary

def test_bpe_ranks_valid_2000():
    ranks = build_bpe_ranks(2000)
    assert len(ranks) == 2000 and sorted(ranks.values()) == list(range(2000))
    assert {t for t, r in ranks.items() if r < 256} == {bytes([b]) for b in range(256)}
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        parts = qwen_bpe(ranks, token, max_rank=rank)
        assert len(parts) == 2, (token, rank, parts)
        assert ranks[parts[0]] < rank and ranks[parts[1]] < rank
        assert bpe_split(ranks, token, max_rank=rank) == parts       # the fast version agrees
    assert len(merges_from_ranks(ranks)) == 2000 - 256
    assert build_bpe_ranks(2000) == ranks                            # deterministic
    assert build_bpe_ranks(2000, seed=1) != ranks                    # the seed moves the synthesized part


def test_bpe_ranks_valid_k2_size():
    ranks = build_bpe_ranks(163584)
    assert len(ranks) == 163584 and sorted(ranks.values()) == list(range(163584))
    merges = merges_from_ranks(ranks)                                # raises on the first invalid token
    assert len(merges) == 163584 - 256
    by_rank = sorted(ranks, key=ranks.get)
    for (a, b), token in zip(merges, by_rank[256:]):
        assert a + b == token and ranks[a] < ranks[token] and ranks[b] < ranks[token]


def test_corpus_merges_stay_inside_pretokens():
    import regex

    pieces = {p.encode("utf-8") for p in regex.findall(PAT_STR, CORPUS, flags=regex.V1)}
    ranks = build_bpe_ranks(1792)                    # the tiny preset: all learned from the corpus
    for token in ranks:
        assert len(token) == 1 or any(token in p for p in pieces), token


def test_merges_from_ranks_rejects_invalid():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    ranks[b"bc"] = 257
    ranks[b"abc"] = 258            # a + bc? BPE merges ab first (lower rank): ab + c, fine
    ranks[b"zz"] = 259
    ranks[b"zzz"] = 260
    ranks[b"zzzz"] = 261           # zz + zz is what BPE gives: valid
    merges_from_ranks(ranks)
    ranks[b"xyz"] = 262            # no xy / yz: BPE leaves x, y, z
    with pytest.raises(ValueError, match="xyz"):
        merges_from_ranks(ranks)


def test_tiktoken_encoding_equals_merge_list_bpe(tok):
    """Encoding with the rebuilt merge list (how llama.cpp / HF BPE run after GGUF export) gives the
    same ids as tiktoken's rank-based BPE, pre-token by pre-token."""
    import regex

    merge_rank = {m: i for i, m in enumerate(merges_from_ranks(tok.ranks))}

    def merge_bpe(piece: bytes) -> list[int]:
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            found = [(merge_rank[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in merge_rank]
            if not found:
                break
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [tok.ranks[p] for p in parts]

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ.,;:'\"!?()[]{}<>-_=+*/\\\n\t0123456789你好世界人工智能😀👍🏽é"
    texts = [CORPUS] + ["".join(rng.choice(alphabet) for _ in range(300)) for _ in range(50)]
    for text in texts:
        for piece in regex.findall(PAT_STR, text, flags=regex.V1):
            assert tok.encode(piece) == merge_bpe(piece.encode("utf-8")), piece


def test_encoding_agrees_with_plain_tiktoken(tok):
    """Same ids as a tiktoken.Encoding built directly from the file with K2's pattern."""
    enc = tiktoken.Encoding(name="ref", pat_str=PAT_STR, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_ids)
    text = CORPUS + "<|im_end|><think>"
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
