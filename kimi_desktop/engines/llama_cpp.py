"""The `llama.cpp` engine: a GGUF (arch deepseek2) through llama-cpp-python, behind the chat API.

    engine = LlamaCppEngine("k2.gguf", ctx=8192, threads=16, tokenizer_dir="Kimi-K2-Thinking/")

llama.cpp only computes logits here: rendering, sampling (runtime/sampling.py: the same Sampling
semantics, seeds and logprobs as the native engine), constraints (constrain.py), the K2 output parser
and stop strings are the shared loop of engines/common.py, so a request behaves as on the native
engine. One llama context is the engine's session: a request keeps the longest common token prefix of
what the context holds (llama.cpp's KV cache is cut with llama_memory_seq_rm, llama-cpp-python's
n_tokens / input_ids follow) and evaluates only the rest.

Tokens: with `tokenizer_dir` (a checkpoint folder with tiktoken.model + tokenizer_config.json) the
project's tokenizer and K2 template render and encode the chat, and llama ids are mapped to its ids
(identical for a GGUF written by `export-gguf`; checked: ordinary tokens by their bytes, special
tokens by their text). Without it, the GGUF's own vocabulary (LlamaVocab: llama.cpp tokenizes) and
its embedded chat template (tokenizer.chat_template, rendered in runtime/chat_template's sandbox;
the built-in K2 renderer if the file has none) are used.

llama-cpp-python is optional and imported only inside these functions.

YaRN: llama.cpp's deepseek2 does not read rope.scaling.yarn_beta_fast / yarn_beta_slow from the
GGUF (and llama-cpp-python passes beta_fast 32 unless told otherwise), while K2 uses
beta_fast = beta_slow = 1. load_llama reads the values the GGUF holds and passes them to the
context, so llama.cpp's rotary frequencies match the checkpoint's.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kimi_desktop.runtime.tokenizer import SpecialTokenDecoding

from .common import EXPERT_STATS_NONE, LocalEngine, sampling_defaults

__all__ = ["LlamaCppEngine", "LlamaVocab", "LlamaSession", "vocab_map", "load_llama", "llama_logits",
           "llama_greedy", "gguf_yarn_betas", "gguf_header", "gguf_generation_defaults"]

DEFAULT_MAX_CTX = 8192          # default context: the GGUF's context_length, at most this many tokens
# llama.cpp's recommended-sampling keys (gguf Keys.General.SAMPLING_*) -> Sampling fields
GGUF_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                      "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
                      "general.sampling.penalty_repeat": "repetition_penalty"}


def gguf_header(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """A few header values (None where absent): architecture, context_length, yarn_beta_fast,
    yarn_beta_slow. Reads the header only."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))
    arch_field = r.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "deepseek2"

    def value(key):
        f = r.fields.get(key)
        return f.contents() if f is not None else None

    out: dict[str, Any] = {"architecture": arch}
    ctx = value(f"{arch}.context_length")
    out["context_length"] = int(ctx) if ctx is not None else None
    for key in ("yarn_beta_fast", "yarn_beta_slow"):
        v = value(f"{arch}.rope.scaling.{key}")
        out[key] = float(v) if v is not None else None
    return out


def gguf_generation_defaults(metadata: Mapping[str, Any], where: str) -> dict:
    """Sampling defaults from a GGUF's general.sampling.* keys ({} when it has none; llama-cpp-python
    gives metadata values as strings)."""
    values = {field: metadata[key] for key, field in GGUF_SAMPLING_KEYS.items() if key in metadata}
    return sampling_defaults(values, where) if values else {}


def gguf_yarn_betas(gguf_path: str | os.PathLike) -> tuple[float | None, float | None]:
    """(beta_fast, beta_slow) from the GGUF's rope.scaling keys, None where absent (header only)."""
    h = gguf_header(gguf_path)
    return h["yarn_beta_fast"], h["yarn_beta_slow"]


def load_llama(gguf_path: str | os.PathLike, n_threads: int | None = None, n_ctx: int = 4096,
               logits_all: bool = False, verbose: bool = False, **kwargs):
    """llama_cpp.Llama for a GGUF; logits_all=True keeps every position's logits (llama_logits).

    Extra keyword arguments go to llama_cpp.Llama unchanged (n_gpu_layers, n_batch, seed, ...).
    """
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError("the llama.cpp engine needs llama-cpp-python "
                           "(pip install 'kimi-desktop[llama]')") from e
    beta_fast, beta_slow = gguf_yarn_betas(path)
    if beta_fast is not None:
        kwargs.setdefault("yarn_beta_fast", beta_fast)
    if beta_slow is not None:
        kwargs.setdefault("yarn_beta_slow", beta_slow)
    if n_threads is not None:
        kwargs.setdefault("n_threads_batch", n_threads)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                           logits_all=logits_all, verbose=verbose, **kwargs)


def llama_logits(llm, ids) -> np.ndarray:
    """float32 [T, vocab] logits of ids from a fresh context (needs load_llama(logits_all=True))."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("llama_logits: no token ids")
    if not getattr(llm, "_logits_all", False):
        raise ValueError("llama_logits needs a model loaded with logits_all=True")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, ids, n: int) -> list[int]:
    """n greedy (argmax) new token ids after ids, from a fresh context; does not stop at end ids."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("llama_greedy: no token ids")
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        row = llm.scores[llm.n_tokens - 1]
        t = int(np.argmax(row))
        out.append(t)
        if len(out) < n:
            llm.eval([t])
    return out


# ---------------------------------------------------------------------------------------------
# The GGUF's own vocabulary behind the project's Tokenizer interface

_ATTR_UNKNOWN, _ATTR_UNUSED, _ATTR_NORMAL, _ATTR_CONTROL, _ATTR_USER_DEFINED, _ATTR_BYTE = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5)         # llama.h's LLAMA_TOKEN_ATTR_*


def _piece(llama_cpp, vocab, token: int, special: bool, buf) -> bytes:
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:                                   # the buffer is too small: -n is the size needed
        big = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, big, len(big), 0, special)
        return bytes(big.raw[:max(n, 0)])
    return bytes(buf.raw[:n])


class LlamaVocab(SpecialTokenDecoding):
    """The runtime Tokenizer's interface (special_ids, num_base, vocab_size, eos_ids, ranks, encode,
    decode, decode_bytes, token_bytes, drop_special, render_chat) over a loaded GGUF's vocabulary:
    llama.cpp tokenizes; bytes of every token are read once.

    Ordinary (NORMAL / BYTE) tokens must come before the special (CONTROL / USER_DEFINED) ones, as in
    K2 (163,584 BPE tokens, then 256 special ids): `num_base` is where the specials start. UNUSED ids
    decode to nothing and are never sampled (`allowed`)."""

    def __init__(self, llm, chat_template: str | None = None):
        import llama_cpp

        model = llm._model
        vocab = model.vocab
        n = int(llama_cpp.llama_vocab_n_tokens(vocab))
        buf = ctypes.create_string_buffer(128)
        pieces: list[bytes] = []
        attrs = np.zeros(n, dtype=np.int64)
        readable = _ATTR_NORMAL | _ATTR_BYTE | _ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN
        for i in range(n):
            a = int(llama_cpp.llama_vocab_get_attr(vocab, i))
            attrs[i] = a
            pieces.append(_piece(llama_cpp, vocab, i, True, buf) if a & readable else b"")
        normal = (attrs & (_ATTR_NORMAL | _ATTR_BYTE)) != 0
        special = ~normal & ((attrs & (_ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN)) != 0)
        if not normal.any():
            raise ValueError("the GGUF's vocabulary has no ordinary tokens")
        self.num_base = num_base = int(np.flatnonzero(normal)[-1]) + 1
        below = np.flatnonzero(special[:num_base])
        if below.size:
            i = int(below[0])
            raise ValueError(f"the GGUF's vocabulary has special token {pieces[i]!r} (id {i}) among the "
                             f"ordinary ones (which end at id {num_base - 1}); K2's layout puts them after: "
                             f"pass tokenizer_dir (the checkpoint folder's tokenizer) instead")
        self.vocab_size = n
        self._bytes = pieces
        self.ranks: dict[bytes, int] = {}
        for i in np.flatnonzero(normal):
            self.ranks.setdefault(pieces[i], int(i))
        self.special_ids: dict[str, int] = {}
        for i in np.flatnonzero(special):
            self.special_ids.setdefault(pieces[i].decode("utf-8", errors="replace"), int(i))
        self.allowed = normal | special                         # what may be sampled
        self._keep_on_skip = {int(i) for i in np.flatnonzero((attrs & _ATTR_USER_DEFINED) != 0)}
        self.eos_ids = tuple(self.special_ids[t] for t in ("<|im_end|>", "[EOS]") if t in self.special_ids)
        bos = int(model.token_bos())
        eos = int(model.token_eos())
        self.bos_id = bos if 0 <= bos < n else None
        self.gguf_eos_id = eos if 0 <= eos < n else None
        self.add_bos = bool(model.add_bos_token()) and self.bos_id is not None
        self.config: dict = {}
        self.chat_template = chat_template
        self._llm = llm
        self._renderer = None

    # -- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of text (llama.cpp's tokenizer); special-token strings become their ids; no BOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if not text:
            return []
        return [int(i) for i in self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table, n, out = self._bytes, self.vocab_size, []
        for i in ids:
            if not (isinstance(i, (int, np.integer)) and 0 <= i < n):
                raise ValueError(f"cannot decode token id {i!r}: the vocabulary has ids 0..{n - 1}")
            out.append(table[i])
        return b"".join(out)

    # -- chat --------------------------------------------------------------------------------
    def special_tokens_map(self) -> dict[str, str]:
        out = {}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.gguf_eos_id)):
            if i is not None:
                out[key] = self._bytes[i].decode("utf-8", errors="replace")
        return out

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt by the GGUF's chat template (the built-in K2 renderer when it has none)."""
        if self._renderer is None:
            from kimi_desktop.runtime.chat_template import ChatRenderer

            flavor = "thinking" if "<think>" in self.special_ids else "instruct"
            self._renderer = ChatRenderer(self.chat_template, flavor=flavor,
                                          special_tokens=self.special_tokens_map())
        return self._renderer.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     **kwargs)

    def __repr__(self) -> str:
        return f"LlamaVocab(num_base={self.num_base}, vocab_size={self.vocab_size})"


def vocab_map(tokenizer, gguf_vocab: LlamaVocab, where: str = "tokenizer_dir") -> np.ndarray | None:
    """Map the project tokenizer's ids to the GGUF's: None when they are the same ids (a file written
    by export-gguf; reserved tokens may be spelt otherwise), else p2l [tokenizer.vocab_size] int64
    with -1 for ids the GGUF lacks.
    Ordinary tokens are matched by their bytes, special tokens by their text. ValueError if an
    ordinary token or a named (non-reserved) special token of the tokenizer is missing from the GGUF."""
    n = int(tokenizer.vocab_size)
    p2l = np.full(n, -1, dtype=np.int64)
    missing = []
    for b, i in tokenizer.ranks.items():
        j = gguf_vocab.ranks.get(b)
        if j is None:
            missing.append((i, b))
        else:
            p2l[i] = j
    if missing:
        i, b = min(missing)
        raise ValueError(f"{where}: its vocabulary does not match the GGUF's: {len(missing)} ordinary "
                         f"token(s) are missing from the GGUF (first: id {i}, bytes {b!r})")
    for name, i in tokenizer.special_ids.items():
        j = gguf_vocab.special_ids.get(name)
        if j is not None:
            p2l[i] = j
        elif not name.startswith("<|reserved_token_"):
            raise ValueError(f"{where}: its special token {name!r} (id {i}) is not in the GGUF's vocabulary")
    same = (p2l == np.arange(n)) | (p2l < 0)      # (-1: a reserved token the GGUF names otherwise)
    if same.all() and n <= gguf_vocab.vocab_size:
        return None
    return p2l


# ---------------------------------------------------------------------------------------------
# One llama context as the engine's session

class LlamaSession:
    """A llama context seen as the runtime's session (tokens, truncate, feed) in the tokenizer's ids.

    feed() evaluates with llama-cpp-python's Llama.eval (n_batch at a time, logits only for the last
    position) and returns the last position's logits as float32 [vocab]. `p2l` maps tokenizer ids to
    llama ids (None: the same); logits of ids the GGUF lacks are -inf. The session owns the Llama
    object: evaluating with it elsewhere desynchronises `tokens` (call truncate(0) after)."""

    def __init__(self, llm, p2l: np.ndarray | None = None):
        self.llm = llm
        self.n_vocab = int(llm.n_vocab())
        self.p2l = p2l
        self.vocab = self.n_vocab if p2l is None else int(p2l.size)
        if p2l is not None:
            self._have = np.flatnonzero(p2l >= 0)
            self._src = p2l[self._have]
        self.tokens: list[int] = []
        self.evaluated_total = 0            # tokens llama.cpp evaluated (prefill + decode)
        self.evals = 0
        self.closed = False                 # set when the Llama object is freed: no more llama calls

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        n = max(0, min(int(n), len(self.tokens)))
        del self.tokens[n:]
        if self.closed:
            return
        self.llm._ctx.kv_cache_seq_rm(-1, n, -1)
        self.llm.n_tokens = n

    def feed(self, ids: Sequence[int], progress=None, cancelled=None) -> np.ndarray:
        """llama.cpp batches the prompt itself: one progress report at the end, no cancel inside."""
        logits = self._feed(ids)
        if progress is not None:
            progress(len(ids), len(ids))
        return logits

    def _feed(self, ids: Sequence[int]) -> np.ndarray:
        import llama_cpp

        if self.closed:
            raise RuntimeError("feed: the llama context is closed")
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("feed: no token ids")
        if len(self.tokens) + len(ids) > self.llm.n_ctx():
            raise ValueError(f"feed: {len(self.tokens)} + {len(ids)} tokens exceed the llama context "
                             f"({self.llm.n_ctx()})")
        if self.p2l is None:
            lids = ids
        else:
            lids = [int(self.p2l[i]) if 0 <= i < self.p2l.size else -1 for i in ids]
            if min(lids) < 0:
                bad = ids[lids.index(min(lids))]
                raise ValueError(f"feed: token id {bad} has no counterpart in the GGUF's vocabulary")
        try:
            self.llm.eval(lids)
        except BaseException:
            self.truncate(0)            # llama.cpp may hold part of the batch
            raise
        self.tokens.extend(ids)
        self.evaluated_total += len(ids)
        self.evals += 1
        ctx = self.llm._ctx.ctx
        ptr = llama_cpp.llama_get_logits_ith(ctx, -1)
        if not ptr:
            ptr = llama_cpp.llama_get_logits(ctx)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        if self.p2l is None:
            return np.array(row, dtype=np.float32)
        out = np.full(self.vocab, -np.inf, dtype=np.float32)
        out[self._have] = row[self._src]
        return out


# ---------------------------------------------------------------------------------------------
# The engine

class LlamaCppEngine(LocalEngine):
    """The chat API on a GGUF through llama-cpp-python (see the module docstring).

    gguf_path: the .gguf file (K2: arch deepseek2; for split files the first part).
    ctx: context tokens (default: the GGUF's context_length, at most 8192; llama.cpp allocates the
        KV cache for all of it up front). threads: CPU threads (default llama-cpp-python's: half the
        cores). tokenizer_dir: a checkpoint folder whose tokenizer and chat template to use.
    n_gpu_layers, and any other keyword (type_k, type_v, n_batch, flash_attn, ...), go to llama_cpp.Llama.
    """

    kind = "llama.cpp"
    thread_name = "kimi-llama-gen"

    def __init__(self, gguf_path: str | os.PathLike, ctx: int | None = None, threads: int | None = None,
                 tokenizer_dir: str | os.PathLike | None = None, *, n_gpu_layers: int = 0,
                 verbose: bool = False, **llama_kwargs: Any):
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2):
            raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        header = gguf_header(self.path)
        if ctx is None:
            ctx = min(header["context_length"] or 4096, DEFAULT_MAX_CTX)
        self.llm = load_llama(self.path, n_threads=threads, n_ctx=ctx, logits_all=False, verbose=verbose,
                              n_gpu_layers=n_gpu_layers, **llama_kwargs)
        try:
            template = self.llm.metadata.get("tokenizer.chat_template") or None
            self.gguf_vocab = LlamaVocab(self.llm, chat_template=template)
            self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
            if self.tokenizer_dir is not None:
                from kimi_desktop.runtime import load_tokenizer

                tok = load_tokenizer(self.tokenizer_dir)
                p2l = vocab_map(tok, self.gguf_vocab, where=str(self.tokenizer_dir))
            else:
                tok, p2l = self.gguf_vocab, None
            self.p2l = p2l
            session = LlamaSession(self.llm, p2l)
            end = self.gguf_vocab.gguf_eos_id
            if end is not None and p2l is not None:
                hit = np.flatnonzero(p2l == end)
                end = int(hit[0]) if hit.size else None
            if tok is self.gguf_vocab:
                allowed = self.gguf_vocab.allowed
            elif p2l is not None:
                allowed = p2l >= 0
            else:
                allowed = None          # same ids: exactly the native engine's rule
            self._init_local(tok, session, min(int(ctx), int(self.llm.n_ctx())), session.vocab,
                             end_ids=() if end is None else (end,), allowed=allowed)
            self._generation_defaults = gguf_generation_defaults(self.llm.metadata, str(self.path))
        except BaseException:
            self.llm.close()
            raise

    def _encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        v = self.gguf_vocab
        if self.tokenizer is v and v.add_bos and (not ids or ids[0] != v.bos_id):
            ids = [v.bos_id] + ids              # a GGUF that asks for BOS (K2's does not)
        return ids

    def _engine_stats(self) -> dict:
        import llama_cpp

        llm, sess = self.llm, self.session
        s = dict(EXPERT_STATS_NONE)
        s.update({
            "gguf": str(self.path),
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir is not None else "gguf",
            "vocab_mapped": self.p2l is not None,
            "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "n_threads": getattr(llm, "n_threads", None),
            "n_gpu_layers": int(getattr(getattr(llm, "model_params", None), "n_gpu_layers", 0) or 0),
            "evaluated_tokens_total": sess.evaluated_total,
            "llama_n_ctx": None, "llama_tokens": None, "model_bytes": None,
        })
        if not sess.closed:                 # llama calls on a freed model crash the process
            s.update({"llama_n_ctx": int(llm.n_ctx()), "llama_tokens": int(llm.n_tokens),
                      "model_bytes": int(llm._model.size())})
        return s

    def _release(self) -> None:
        self.session.closed = True
        try:
            self.llm.close()
        except Exception:                       # pragma: no cover - best effort at shutdown
            pass
