"""The exported GGUF in llama.cpp (llama-cpp-python) against this project's tokenizer and numpy model.

Two files are checked:
- "exact": every non-expert matrix F32, experts Q4_0 (bit-exact from INT4), an F32 KV cache. The only
  rounding left is llama.cpp's: it multiplies Q4_0 weights with activations rounded to Q8_0. The
  reference reads llama.cpp's expert inputs as it runs, checks them against its own, and rounds them
  to Q8_0 the same way, so both must agree to ~1e-6 at every position on any CPU: any layout error
  (kv_b split, rope pairs, YaRN, routing, bias, nibble order) shows at once.
- "default": what `export-gguf` writes (BF16 + Q4_0) with llama.cpp's f16 KV cache. Activation
  rounding gives ~1e-2 relative; where two experts' routing scores are nearly tied the rounding can
  pick another expert, so those positions are left out of the logit comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import kimi_desktop.runtime.model as runtime_model  # noqa: E402
from kimi_desktop.engines.llama_cpp import llama_greedy, llama_logits, load_llama  # noqa: E402
from kimi_desktop.gguf_export import export_gguf  # noqa: E402
from kimi_desktop.offload.formats import QuantConfig, load_linear  # noqa: E402
from kimi_desktop.offload.safetensors import Checkpoint  # noqa: E402
from kimi_desktop.runtime import load_model, load_tokenizer  # noqa: E402

from .llama_tensors import observe  # noqa: E402

GGML_TYPE_F32 = 0
ROUTING_TIE = 0.005         # routing score gap below which activation rounding may change the experts
DEFAULT_TOL = 2e-2          # default file, per position (measured: <= 1.2e-2)
Q8_TOL = 0.01               # Q8_0 rounding steps by which llama.cpp's expert inputs may differ from ours
                            # (float noise; measured <= 7e-4 here, with 1e-6 input noise)

TEXTS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. I'm sure you'll agree they've DONE it; WE'RE done.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "mixed中文English混合 text 日本語のテキスト 한국어 Привет мир",
    "def f(x):\n    return x * 2  # double\n\nclass A:\n\tpass\r\n",
    "emoji 😀🎉👍🏽 done 🇫🇷!",
    "a    b\t\tc\n\n\n  d   ",
    "   leading and trailing   ",
    "numbers 1 12 123 1234 1234567 3.14159 1e-9",
    '{"key": [1, 2, 3], "url": "https://example.com/a?b=c&d=e"}',
    "HelloWorld CamelCase XMLHttpRequest naïve café Ωmega über",
    "\u00a0nbsp and ǅ titlecase ʰmodifier",
]


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def q8_0_round(x: np.ndarray) -> np.ndarray:
    """x rounded as ggml quantizes activations for Q4_0 products: blocks of 32, d = max|x|/127 (fp16)."""
    x = np.asarray(x, dtype=np.float32)
    b = x.reshape(-1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (np.round(b * inv) * d).reshape(x.shape)


def q8_0_steps(x: np.ndarray) -> np.ndarray:
    """x in units of its Q8_0 rounding step (x / d per block of 32, within [-127, 127])."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    return b * np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)


class LlamaExpertInputs:
    """What llama.cpp fed its routed experts for one prompt, per MoE layer: the normed hidden state
    that gate and up multiply [T, D], the SwiGLU output that down multiplies [T, K, I], and the
    experts it chose, in that order [T, K]."""

    NAMES = {"ffn_norm": "f32", "ffn_moe_swiglu": "f32", "ffn_moe_argsort": "i32"}

    def __init__(self, seen: dict, cfg, moe_layers):
        T = len(np.concatenate(seen[f"ffn_norm-{moe_layers[0]}"])) // cfg.hidden_size
        K, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
        get = lambda name, l: np.concatenate(seen[f"{name}-{l}"])                      # noqa: E731
        self.hidden = {l: get("ffn_norm", l).reshape(T, cfg.hidden_size) for l in moe_layers}
        self.swiglu = {l: get("ffn_moe_swiglu", l).reshape(T, K, I) for l in moe_layers}
        self.chosen = {l: get("ffn_moe_argsort", l).reshape(T, -1)[:, :K] for l in moe_layers}

    @classmethod
    def names(cls, moe_layers) -> dict[str, str]:
        return {f"{n}-{l}": t for l in moe_layers for n, t in cls.NAMES.items()}


class _Q8Input:
    def __init__(self, lin, experts: Q8Experts, layer: int, e: int, down: bool):
        self.lin, self.shape = lin, lin.shape
        self.experts, self.layer, self.e, self.down = experts, layer, e, down

    def matmul(self, x):
        return self.lin.matmul(q8_0_round(self.experts.input_for(self, x)))

    def dequantize(self, rows=None):
        return self.lin.dequantize(rows)


class Q8Experts:
    """Routed experts whose inputs are rounded to Q8_0 first, as llama.cpp computes Q4_0 experts.

    Given llama.cpp's own expert inputs (`follow`), each input is first checked against the
    reference's to within Q8_TOL rounding steps (kept in `steps_apart`), and then llama.cpp's is the
    one rounded: an activation within float noise of a rounding boundary rounds the way llama.cpp's
    sums (their order is CPU-specific) made it round, instead of flipping a Q8_0 step (~1e-3 in the
    logits) where the two are equal to float noise."""

    def __init__(self, folder, cfg):
        self.ckpt, self.cfg = Checkpoint(folder), cfg
        self.qcfg = QuantConfig.from_config(cfg.raw, "config.json")
        self.llama: LlamaExpertInputs | None = None
        self.steps_apart: dict[tuple[int, str], float] = {}
        self.unrouted: list[tuple[int, int, int]] = []        # (layer, position, expert) llama.cpp did not pick

    def follow(self, llama: LlamaExpertInputs | None) -> None:
        self.llama, self.steps_apart, self.unrouted = llama, {}, []

    def begin_layer(self, layer: int, x: np.ndarray) -> None:
        self._rows = {r.tobytes(): t for t, r in enumerate(x)}

    def input_for(self, lin: _Q8Input, x: np.ndarray) -> np.ndarray:
        if self.llama is None:
            return x
        if not lin.down:                    # gate and up see rows of the layer's input, found by value
            self._pos = np.array([self._rows[r.tobytes()] for r in x])
        pos, layer = self._pos, lin.layer
        if lin.down:
            hit = self.llama.chosen[layer][pos] == lin.e                                # [rows, K]
            self.unrouted += [(layer, int(t), lin.e) for t in pos[~hit.any(axis=1)]]
            if not hit.any(axis=1).all():
                return x
            theirs = self.llama.swiglu[layer][pos, hit.argmax(axis=1)]
        else:
            theirs = self.llama.hidden[layer][pos]
        key = (layer, "down" if lin.down else "gate/up")
        apart = float(np.abs(q8_0_steps(x) - q8_0_steps(theirs)).max())
        self.steps_apart[key] = max(self.steps_apart.get(key, 0.0), apart)
        return theirs

    def get(self, layer, e):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        D, I = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        return tuple(_Q8Input(load_linear(self.ckpt, p + n, self.qcfg, s), self, layer, e, n == "down_proj")
                     for n, s in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))))


@pytest.fixture(scope="module")
def files(tiny_int4, tmp_path_factory):
    d = tmp_path_factory.mktemp("xcheck")
    return {"default": export_gguf(tiny_int4, d / "tiny.gguf"),
            "f32": export_gguf(tiny_int4, d / "tiny-f32.gguf", weights="f32", experts="f32"),
            "q4_0": export_gguf(tiny_int4, d / "tiny-f32-q4_0.gguf", weights="f32")}


def _llama(path, f32_cache=False):
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    return load_llama(path, n_threads=2, n_ctx=256, logits_all=True, **kw)


@pytest.fixture(scope="module")
def llm(files):
    return _llama(files["default"])


@pytest.fixture(scope="module")
def llm_f32(files):
    return _llama(files["f32"], f32_cache=True)


@pytest.fixture(scope="module")
def llm_q4_0(files):
    return _llama(files["q4_0"], f32_cache=True)


@pytest.fixture(scope="module")
def tok(tiny_int4):
    return load_tokenizer(tiny_int4)


@pytest.fixture(scope="module")
def ref(tiny_int4):
    return load_model(tiny_int4, kv_dtype="fp32")        # llama.cpp's cache is f32 here too


@pytest.fixture(scope="module")
def ref_q8(tiny_int4, ref):
    return load_model(tiny_int4, experts=Q8Experts(tiny_int4, ref.cfg), kv_dtype="fp32")


@pytest.fixture
def routing_gaps(monkeypatch):
    """Per route() call: [T] gap between the k-th and (k+1)-th biased routing score (n_group 1)."""
    calls = []
    route = runtime_model.route

    def recording_route(logits, bias, cfg):
        choice = np.sort(1.0 / (1.0 + np.exp(-logits)) + bias, axis=-1)
        k = cfg.num_experts_per_tok
        calls.append(choice[:, -k] - choice[:, -k - 1])
        return route(logits, bias, cfg)
    monkeypatch.setattr(runtime_model, "route", recording_route)
    return calls


def prompts(tok):
    return {
        "short": tok.encode(TEXTS[0]),                                     # < 64 = YaRN original context
        "chinese": tok.encode(TEXTS[2]),
        "chat": tok.encode(tok.render_chat([{"role": "user", "content": "What is 2+2?"}])),
        "long": tok.encode(" ".join(TEXTS[:2] + TEXTS[8:11])),             # > 64 positions
        "random": np.random.default_rng(7).integers(0, 2048, 100).tolist(),
    }


# ------------------------------------------------------------------------------ (a) tokenizer

def test_tokenizer_plain_text_matches(llm, tok):
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


def test_tokenizer_random_text_matches(llm, tok):
    # llama.cpp's K2 splitter (unicode.cpp) does not count \p{M} as a letter, so a combining mark
    # right after a non-letter can split differently from K2's regex: marks are left out here.
    alphabet = (list("abcdefghijKLMNOP  \n\t\r'sdtmlrev0123456789.,;!?-_()[]{}<>/\\\"#@")
                + list("你好世界中文") + ["😀", "👍🏽", "é", "Ω", "ß", "\u00a0", "ǅ", "ʰ", "Ж", "ي"])
    rng = np.random.default_rng(0)
    for _ in range(400):
        text = "".join(rng.choice(alphabet, rng.integers(1, 40)))
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), repr(text)


def test_tokenizer_special_tokens_and_detokenize(llm, tok):
    prompt = tok.render_chat([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "你好 <think> x"}])
    ids = tok.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    assert any(i >= tok.num_base for i in ids)
    assert llm.tokenize(b"Hi", add_bos=True, special=False) == tok.encode("Hi")   # K2 adds no BOS
    assert llm.detokenize(ids, special=True) == prompt.encode()
    for text in TEXTS:
        assert llm.detokenize(tok.encode(text)) == text.encode()


# ------------------------------------------------------------------------------ (c) logits

def test_prompt_lengths(tok):
    p = prompts(tok)
    assert len(p["short"]) < 64 < len(p["long"])


@pytest.mark.parametrize("name", ["short", "chinese", "chat", "long", "random"])
def test_logits_f32_file_exact(llm_f32, ref, tok, name):
    """All weights F32, F32 KV cache: llama.cpp computes the same function as the reference."""
    ids = prompts(tok)[name]
    assert rel_err(llama_logits(llm_f32, ids), ref.logits(ids)) < 1e-5


@pytest.fixture
def q8_experts(ref_q8, monkeypatch):
    """ref_q8's experts, told where each MoE layer's input begins (to find a row's position)."""
    experts, call = ref_q8.experts, runtime_model.MoE.__call__

    def logged(self, x):
        if self.experts is experts:
            experts.begin_layer(self.layer, x)
        return call(self, x)
    monkeypatch.setattr(runtime_model.MoE, "__call__", logged)
    yield experts
    experts.follow(None)


@pytest.mark.parametrize("input_noise", [0.0, 1e-6])
def test_logits_q4_0_experts_exact(llm_q4_0, ref_q8, q8_experts, tok, input_noise, monkeypatch):
    """Q4_0 experts from INT4, rest F32: equal to the reference that rounds expert inputs to Q8_0 as
    llama.cpp does, at every position. llama.cpp's float32 sums run in another order (one per CPU it
    is compiled for), so an activation within float noise of a Q8_0 rounding boundary can round the
    other way there, which moves the logits by ~1e-3 from then on. So the reference reads llama.cpp's
    own expert inputs while it runs (ggml's eval callback), asserts they equal its own to within
    Q8_TOL rounding steps (the whole network before each expert layer, checked elementwise), and
    rounds llama.cpp's: what is left to differ is float noise, and any layout error (kv_b split, rope
    pairs, YaRN, routing, bias, nibble order, Q4_0 scales) shows at once. The same must hold with
    1e-6 relative noise on the reference's inputs, which moves its activations more than another
    summation order does."""
    if input_noise:
        read_rows, rng = ref_q8.ckpt.read_rows, np.random.default_rng(3)

        def noisy(name, ids):
            x = np.asarray(read_rows(name, ids), np.float32)
            return x * (1 + input_noise * rng.standard_normal(x.shape)).astype(np.float32)
        monkeypatch.setattr(ref_q8.ckpt, "read_rows", noisy)
    moe_layers = [i for i in range(ref_q8.cfg.num_hidden_layers) if ref_q8.cfg.is_moe_layer(i)]
    for name, ids in prompts(tok).items():
        with observe(llm_q4_0, LlamaExpertInputs.names(moe_layers)) as seen:
            got = llama_logits(llm_q4_0, ids)
        q8_experts.follow(LlamaExpertInputs(seen, ref_q8.cfg, moe_layers))
        want = ref_q8.logits(ids)
        assert not q8_experts.unrouted, (name, q8_experts.unrouted[:5])
        assert len(q8_experts.steps_apart) == 2 * len(moe_layers)
        assert max(q8_experts.steps_apart.values()) < Q8_TOL, (name, q8_experts.steps_apart)
        per_pos = np.abs(got - want).max(axis=-1) / np.abs(want).max()          # [T]
        assert per_pos.max() < 1e-5, (name, per_pos)


def test_logits_default_file(llm, ref, tok, routing_gaps):
    """BF16 + Q4_0 with llama.cpp's f16 KV cache: ~1e-2 relative, compared at the positions before the
    first near-tie in routing (there the rounding may pick other experts, and every later position
    attends to that one)."""
    compared, whole = 0, []
    for name in ("short", "chinese", "chat", "long"):
        ids = prompts(tok)[name]
        routing_gaps.clear()
        want = ref.logits(ids)
        gap = np.min(np.stack(routing_gaps), axis=0)                     # [T] over the MoE layers
        got = llama_logits(llm, ids)
        per_pos = np.abs(got - want).max(axis=-1) / np.abs(want).max()  # [T]
        ties = np.flatnonzero(gap < ROUTING_TIE)
        n = int(ties[0]) if ties.size else len(ids)
        assert per_pos[:n].max(initial=0.0) < DEFAULT_TOL, (name, per_pos)
        compared += n
        if not ties.size:
            whole.append(rel_err(got, want))
    assert compared >= 20                       # measured: 33 positions (11 + 11 + 0 + 11)
    assert all(e < DEFAULT_TOL for e in whole)


# ------------------------------------------------------------------------------ (b) greedy

def reference_greedy(model, ids, n, gaps=None):
    """[(token, top-2 margin, max|logit|, min routing gap so far)] for n greedy steps."""
    s = model.session()
    if gaps is not None:
        gaps.clear()
    last = s.feed(ids)
    out = []
    for _ in range(n):
        top2 = np.sort(last)[-2:]
        t = int(np.argmax(last))
        gap = float(min(c.min() for c in gaps)) if gaps else np.inf
        out.append((t, float(top2[1] - top2[0]), float(np.abs(last).max()), gap))
        last = s.feed([t])
    return out


def test_greedy_f32_file(llm_f32, ref, tok):
    """Prefill, then llama.cpp's one-token decode steps over its KV cache: the same tokens, compared up
    to the first step whose reference top-2 margin is below 0.05."""
    compared = 0
    for name in ("short", "chinese", "chat", "long"):
        ids = prompts(tok)[name]
        got = llama_greedy(llm_f32, ids, 24)
        for k, (t, margin, _, _) in enumerate(reference_greedy(ref, ids, 24)):
            if margin < 0.05:
                break
            assert got[k] == t, (name, k)
            compared += 1
    assert compared >= 40


def test_greedy_default_file(llm, ref, tok, routing_gaps):
    """The shipped file: same tokens until the first disagreement, which may only come where the
    reference's choice is within the rounding error (margin < 2 * DEFAULT_TOL * max|logit|) or after
    a near-tie in routing."""
    agreed = 0
    for name in ("short", "chinese", "chat", "long"):
        ids = prompts(tok)[name]
        got = llama_greedy(llm, ids, 32)
        for k, (t, margin, scale, gap) in enumerate(reference_greedy(ref, ids, 32, routing_gaps)):
            if got[k] != t:
                assert margin < 2 * DEFAULT_TOL * scale or gap < ROUTING_TIE, (name, k, margin, gap)
                break
            agreed += 1
    assert agreed >= 20
