"""K2's tokenizer: tiktoken BPE (tiktoken.model) + the special block from tokenizer_config.json.

Same behaviour as the checkpoint's tokenization_kimi.py: K2's pre-tokenizer pattern, special ids
after the base vocabulary (names from added_tokens_decoder, the rest `<|reserved_token_{id}|>`),
special-token strings in text encode to their ids, no BOS is added, long inputs are cut into
400,000-char windows and runs of at most 25,000 whitespace / non-whitespace chars.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from kimi_desktop.offload.safetensors import CheckpointError

from .chat_template import ChatRenderer

# The 8 alternatives of tokenization_kimi.py's pat_str (tiktoken's regex engine takes the `&&`
# class intersections as written).
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL = 256
MAX_ENCODE_CHARS = 400_000          # tiktoken panics on much longer inputs
MAX_RUN_CHARS = 25_000              # longest run of whitespace / non-whitespace given to tiktoken

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(CheckpointError):
    """tiktoken.model / tokenizer_config.json is missing or malformed (names the file and line/field)."""


# --------------------------------------------------------------------------------------------
# BPE ranks

def load_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken.model file (lines `base64(token) rank`), as tiktoken's load_tiktoken_bpe does.

    Parsed here rather than through load_tiktoken_bpe itself: that one caches local files in
    $TMPDIR/data-gym-cache keyed by the path, so a rewritten tiktoken.model would load stale.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found (the checkpoint's BPE vocabulary)") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 fields, got {len(fields)}")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}: line {lineno}: expected 'base64(token_bytes) rank', got "
                                 f"{line[:80]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}: line {lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: the 256 single-byte tokens must all be present; "
                             f"missing {len(missing)}, e.g. byte {missing[0]:#04x}")
    return ranks


def bpe_split(ranks: Mapping[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """Byte-level BPE of `token` using only merges ranked below max_rank (llama.cpp's QwenModel.bpe:
    repeatedly merge the adjacent pair whose concatenation has the lowest rank, leftmost on ties).

    For a valid vocabulary every multi-byte token splits into exactly two parts at its own rank:
    those two parts are its merge.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    stop = float("inf") if max_rank is None else max_rank
    get = ranks.get
    pair = [get(parts[i] + parts[i + 1], stop) for i in range(len(parts) - 1)]
    while pair:
        best = min(pair)
        if best >= stop:
            break
        i = pair.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i > 0:
            pair[i - 1] = get(parts[i - 1] + parts[i], stop)
        if i < len(pair):
            pair[i] = get(parts[i] + parts[i + 1], stop)
    return parts


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list (in rank order) that byte-level BPE tools rebuild from tiktoken ranks.

    Raises ValueError naming the first token that does not split into exactly two parts.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe_split(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked "
                             f"tokens: BPE gives {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------------------------
# Long-input splitting (tokenization_kimi.py's encode)

_RUNS = re.compile(r"\s+|\S+")


def split_for_tiktoken(text: str) -> list[str]:
    """Cut text the way tokenization_kimi.py does before handing it to tiktoken.

    400,000-char windows; inside each, a cut every 25,000 chars of one whitespace / non-whitespace
    run (a cut falls where the run's length would exceed 25,000).
    """
    out: list[str] = []
    for w in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[w:w + MAX_ENCODE_CHARS]
        if len(window) <= MAX_RUN_CHARS:
            out.append(window)
            continue
        start = 0
        for m in _RUNS.finditer(window):
            a, b = m.span()
            for cut in range(a + MAX_RUN_CHARS, b, MAX_RUN_CHARS):
                out.append(window[start:cut])
                start = cut
        out.append(window[start:])
    return out or [""]


# --------------------------------------------------------------------------------------------
# Tokenizer

class SpecialTokenDecoding:
    """Decoding for a K2-layout vocabulary (ordinary ids below num_base, specials from it), given
    decode_bytes(ids), num_base and _keep_on_skip (special ids kept by skip_special: those marked
    special:false, the tool-call tokens). Shared by Tokenizer and the llama.cpp engine's GGUF vocab."""

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ids (invalid UTF-8 becomes U+FFFD). skip_special drops special tokens, except
        those marked special:false in tokenizer_config.json (the tool-call tokens)."""
        if skip_special:
            ids = self.drop_special(ids)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token; a special token's bytes are its name in UTF-8."""
        return self.decode_bytes([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base

    def drop_special(self, ids: Iterable[int]) -> list[int]:
        """ids without special tokens, except those marked special:false (the tool-call tokens)."""
        return [i for i in ids if i < self.num_base or i in self._keep_on_skip]


class Tokenizer(SpecialTokenDecoding):
    """Encode / decode K2 text; render chats with the checkpoint's template."""

    def __init__(self, ranks: dict[bytes, int], added_tokens: Mapping[int, Mapping[str, Any]],
                 config: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 name: str = "kimi"):
        config = dict(config or {})
        self.ranks = ranks
        self.num_base = n = len(ranks)
        named: dict[int, str] = {}
        self._keep_on_skip: set[int] = set()      # special:false (tool-call tokens): kept by skip_special
        for i, info in added_tokens.items():
            named[i] = info["content"]
            if info.get("special", True) is False:
                self._keep_on_skip.add(i)
        top = max([n + NUM_RESERVED_SPECIAL - 1, *named])
        self.special_ids: dict[str, int] = {}
        for i in range(n, top + 1):
            self.special_ids[named.get(i, f"<|reserved_token_{i}|>")] = i
        self.vocab_size = top + 1
        self.config = config
        self.chat_template = chat_template
        self._enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self.special_ids)
        self.bos_id = self.special_ids.get(_token_str(config.get("bos_token")) or "[BOS]")
        self.eos_ids = tuple(self.special_ids[t] for t in ("<|im_end|>", "[EOS]") if t in self.special_ids)
        self._renderer = None

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of text; special-token strings become their ids; no BOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        for part in split_for_tiktoken(text):
            ids.extend(self._enc.encode(part, allowed_special="all"))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            bad = next((i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)), None)
            raise ValueError(f"cannot decode token id {bad!r}: the vocabulary has ids "
                             f"0..{self.vocab_size - 1}") from None

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt string for an OpenAI-shaped conversation, by the checkpoint's chat template
        (its built-in K2 equivalent when the folder has none). kwargs reach a Jinja template as
        variables, next to bos_token / eos_token / unk_token / pad_token."""
        if self._renderer is None:                  # built on first use: a broken template only breaks chat

            flavor = "thinking" if "<think>" in self.special_ids else "instruct"
            self._renderer = ChatRenderer(self.chat_template, flavor=flavor,
                                          special_tokens=_special_tokens_map(self.config))
        return self._renderer.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **kwargs)

    def __repr__(self) -> str:
        return f"Tokenizer(num_base={self.num_base}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Token ids in, text deltas out; an incomplete UTF-8 sequence at the end is held back until
    the bytes that complete it arrive (or flush())."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        if self.skip_special:
            ids = self.tokenizer.drop_special(ids)
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is held back (as U+FFFD if it is an incomplete sequence); resets the decoder."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# --------------------------------------------------------------------------------------------
# Loading a checkpoint folder

def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer of a checkpoint folder: tiktoken.model + tokenizer_config.json (+ chat template:
    chat_template.jinja, else tokenizer_config.json's chat_template)."""
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: not a checkpoint folder")
    ranks = load_bpe_ranks(folder / VOCAB_FILE)
    cfg_path = folder / CONFIG_FILE
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{cfg_path}: file not found (needed for the special tokens)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{cfg_path}: expected a JSON object at the top level")
    added = _added_tokens(config, cfg_path, num_base=len(ranks))
    template = _chat_template(folder, config, cfg_path)
    return Tokenizer(ranks, added, config=config, chat_template=template, name=folder.name or "kimi")


def _added_tokens(config: dict, cfg_path: Path, num_base: int) -> dict[int, dict]:
    atd = config.get("added_tokens_decoder")
    if not isinstance(atd, dict) or not atd:
        raise TokenizerError(f"{cfg_path}: field 'added_tokens_decoder' is missing or empty "
                             f"(it names the special tokens)")
    out: dict[int, dict] = {}
    seen: dict[str, int] = {}
    for key, info in atd.items():
        where = f"{cfg_path}: added_tokens_decoder[{key!r}]"
        try:
            i = int(key)
        except ValueError:
            raise TokenizerError(f"{where}: the key must be a token id") from None
        if not isinstance(info, dict) or not isinstance(info.get("content"), str) or not info["content"]:
            raise TokenizerError(f"{where}: expected an object with a non-empty string 'content'")
        if i < num_base:
            raise TokenizerError(f"{where}: special id {i} is inside the base vocabulary "
                                 f"(tiktoken.model has {num_base} tokens; special ids start at {num_base})")
        if info["content"] in seen:
            raise TokenizerError(f"{where}: {info['content']!r} is also id {seen[info['content']]}")
        seen[info["content"]] = i
        out[i] = info
    return out


def _chat_template(folder: Path, config: dict, cfg_path: Path) -> str | None:
    jinja_path = folder / TEMPLATE_FILE
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: cannot read: {e}") from None
    t = config.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):                 # [{"name": ..., "template": ...}]: "default" wins
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        if isinstance(chosen, str):
            return chosen
    raise TokenizerError(f"{cfg_path}: field 'chat_template' must be a string or a list of "
                         f"{{name, template}} objects")


def _token_str(v: Any) -> str | None:
    """A tokenizer_config token field: a string or an AddedToken-style {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _special_tokens_map(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        s = _token_str(config.get(k))
        if s is not None:
            out[k] = s
    return out
