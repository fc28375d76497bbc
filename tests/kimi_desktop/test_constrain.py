"""The JSON prefix automaton and the token-level constraint program (no model needed)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from kimi_desktop.constrain import Constrainer, JsonPrefix, Step, StepFilter, ToolSpec

DOCS = [
    {"a": 1, "b": [1, 2.5e-3, {"c": None, "d": True}], "é": "x\"\\\u00e9\n\t/"},
    [], {}, "str", -0.5, 12, 0, [[[]]], {"k": [{}]}, [1E+5, -0.0, 3e-10], {"u": "\u2603 snow \U0001F600"},
    False, None,
]


@pytest.mark.parametrize("doc", DOCS, ids=range(len(DOCS)))
def test_every_prefix_of_valid_json_is_accepted_and_closable(doc):
    for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False, indent=2),
                 json.dumps(doc, separators=(",", ":"))):
        data = text.encode()
        for i in range(len(data) + 1):
            j = JsonPrefix()
            assert j.feed(data[:i]), (text, i)
            closed = data[:i] + j.closing()
            assert json.loads(closed.decode("utf-8", "replace")) is not None or True
            j2 = JsonPrefix()
            assert j2.feed(closed) and j2.complete
        j = JsonPrefix()
        assert j.feed(data) and j.complete


@pytest.mark.parametrize("bad", ['{"a" 1}', "[1,]", "{,}", "01", '{"a":tru e}', "[1 2]", "nul ", '{"a":1}}',
                                 '"\x01"', "1.e5", "--1", "[}", '{"a":1,}', "'x'", '{a:1}', "+1", ".5", '"\\x"',
                                 '"\\u12G4"', "1 2", "[1]]", "\x80"])
def test_invalid_json_is_rejected(bad):
    j = JsonPrefix()
    assert not (j.feed(bad.encode()) and j.complete)
    # and the first byte where it fails is rejected without changing the state
    j = JsonPrefix()
    data = bad.encode()
    for i in range(len(data)):
        if not j.copy().feed(data[i:i + 1]):
            before = j.closing()
            assert not j.feed(data[i:i + 1]) and j.closing() == before
            break


def test_random_byte_strings_accepted_only_if_completable():
    alpha = list(b'{}[]:," 0123456789-.eEtrufalsn\\u\xc3\xa9x')
    rnd = random.Random(0)
    n = 0
    for _ in range(5000):
        s = bytes(rnd.choice(alpha) for _ in range(rnd.randint(1, 12)))
        j = JsonPrefix()
        if j.feed(s):
            n += 1
            json.loads((s + j.closing()).decode("utf-8", "replace"))
    assert n > 300


def test_top_level_type_and_required_keys():
    assert not JsonPrefix(top_type="object").copy().feed(b"[")
    assert JsonPrefix(top_type="object").copy().feed(b"{ ") and not JsonPrefix().copy().feed(b" {")
    assert not JsonPrefix({"type": "integer"}).copy().feed(b"1.5")
    assert JsonPrefix({"type": "integer"}).copy().feed(b"-12")
    assert JsonPrefix({"type": ["string", "null"]}).copy().feed(b"n")
    assert not JsonPrefix({"type": ["string", "null"]}).copy().feed(b"1")
    schema = {"type": "object", "required": ["x", "y"],
              "properties": {"x": {"type": "string"}, "y": {"enum": ["aa", "b"]}}}
    j = JsonPrefix(schema)
    assert not j.copy().feed(b"{}") and not j.copy().feed(b'{"x":1}') and j.copy().feed(b'{"x":1,"y":2}')
    assert j.closing() == b'{"x":"","y":"aa"}'
    j.feed(b'{"x":"q", "z":[1,')
    assert j.closing() == b'null],"y":"aa"}'
    assert json.loads(b'{"x":"q", "z":[1,' + j.closing()) == {"x": "q", "z": [1, None], "y": "aa"}
    # nested objects are not held to the top-level required list
    j = JsonPrefix(schema)
    assert j.copy().feed(b'{"x":{}, "y":{}}')


def test_multibyte_utf8_split_across_feeds():
    j = JsonPrefix()
    data = '{"k":"é☃😀"}'.encode()
    for b in data:
        assert j.feed(bytes([b]))
    assert j.complete
    j = JsonPrefix()
    assert j.feed(b'{"k":"\xe2\x98')
    assert j.closing() == b'\x80"}'
    assert not JsonPrefix().copy().feed(b'"\xe2"')          # a lead byte needs continuation bytes


# ---------------------------------------------------------------------------------------------
# The token program, driven with a toy tokenizer

class ToyTok:
    """Single bytes are ids 0..255, a few multi-byte tokens, then specials."""

    def __init__(self):
        self.pieces = [bytes([i]) for i in range(256)] + [b'{"', b'":', b'functions', b'.add', b':0', b'}\n', b"true"]
        self.ranks = {p: i for i, p in enumerate(self.pieces) if len(p) == 1}
        self.num_base = len(self.pieces)
        names = ["<|im_end|>", "<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                 "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "[EOS]"]
        self.special_ids = {s: self.num_base + i for i, s in enumerate(names)}
        self.vocab_size = self.num_base + len(names)

    def token_bytes(self, t):
        if t >= self.num_base:
            return {v: k for k, v in self.special_ids.items()}[t].encode()
        return self.pieces[t]

    def encode(self, text):
        return [self.ranks[bytes([b])] for b in text.encode()]


def allowed(c: Constrainer, step: Step) -> list[int]:
    """The tokens a step lets the engine draw: StepFilter's mask, then its lazy byte check."""
    f = StepFilter(c.tok, c.tok.vocab_size)
    accept = f.accept(step)
    return [int(t) for t in np.flatnonzero(f.mask(step)) if accept is None or accept(int(t))]


def drive(c: Constrainer, rnd: random.Random, limit: int = 500) -> list[int]:
    """Pick random allowed tokens (the step's fallback when none is) until the program ends."""
    out = []
    for _ in range(limit):
        step = c.step()
        if step is None:
            break
        ok = allowed(c, step)
        t = step.force if step.force is not None else rnd.choice(ok) if ok else step.fallback
        assert t is not None
        out.append(t)
        c.advance(t)
    return out


def render(tok, ids):
    return b"".join(tok.token_bytes(t) for t in ids).decode("utf-8", "replace")


@pytest.mark.parametrize("seed", range(6))
def test_named_tool_program_yields_one_call(seed):
    tok = ToyTok()
    c = Constrainer(tok, "tools", tools=[ToolSpec("add", {"type": "object", "required": ["a"]})],
                    call_index=2, budget=60, max_reasoning_tokens=5)
    ids = drive(c, random.Random(seed))
    text = render(tok, ids)
    assert c.finished and len(ids) <= 60
    body = text.split("</think>")[-1]
    assert body.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.add:2<|tool_call_argument_begin|>")
    assert body.endswith("<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    args = body.split("<|tool_call_argument_begin|>")[1].split("<|tool_call_end|>")[0]
    assert "a" in json.loads(args)


@pytest.mark.parametrize("budget", [24, 35, 80])
def test_required_tools_program_fits_the_budget(budget):
    tok = ToyTok()
    tools = [ToolSpec("add", None), ToolSpec("mul", {"type": "object", "properties": {"x": {"type": "number"}}})]
    for seed in range(4):
        c = Constrainer(tok, "tools", tools=tools, multiple=True, budget=budget)
        ids = drive(c, random.Random(seed))
        assert c.finished and len(ids) <= budget
        text = render(tok, ids)
        calls = text.split("<|tool_call_begin|>")[1:]
        assert calls
        for i, call in enumerate(calls):
            cid, rest = call.split("<|tool_call_argument_begin|>")
            assert cid in (f"functions.add:{i}", f"functions.mul:{i}")
            assert isinstance(json.loads(rest.split("<|tool_call_end|>")[0]), dict)


@pytest.mark.parametrize("budget", [4, 12, 40])
def test_json_program_closes_before_the_budget(budget):
    tok = ToyTok()
    for seed in range(5):
        c = Constrainer(tok, "json", top_type="object", budget=budget)
        ids = drive(c, random.Random(seed))
        assert c.finished and len(ids) <= budget
        text = render(tok, ids).split("</think>")[-1]
        assert text.endswith("<|im_end|>")
        assert isinstance(json.loads(text[:-len("<|im_end|>")]), dict)


def test_none_mode_bans_only_tool_tokens():
    tok = ToyTok()
    c = Constrainer(tok, "none")
    ok = set(allowed(c, c.step()))
    sp = tok.special_ids
    assert sp["<|tool_calls_section_begin|>"] not in ok and sp["<|tool_call_begin|>"] not in ok
    assert sp["<|im_end|>"] in ok and 65 in ok


def test_reasoning_is_capped_then_closed():
    tok = ToyTok()
    c = Constrainer(tok, "json", top_type="object", budget=100, max_reasoning_tokens=3)
    sp = tok.special_ids
    ok = set(allowed(c, c.step()))
    assert sp["<think>"] in ok and sp["<|im_end|>"] not in ok
    c.advance(sp["<think>"])
    for _ in range(3):
        assert sp["<|im_end|>"] not in allowed(c, c.step())
        c.advance(65)
    assert c.step().force == sp["</think>"]


def test_step_filter_masks_specials_text_and_the_base_mask():
    tok = ToyTok()
    sp = tok.special_ids
    vocab = tok.vocab_size + 3                      # logits longer than the tokenizer's ids
    base = np.ones(vocab, dtype=bool)
    base[66] = False
    f = StepFilter(tok, vocab, base)
    m = f.mask(Step(text=True, specials=frozenset({sp["<|im_end|>"]})))
    assert m[65] and not m[66] and m[sp["<|im_end|>"]] and not m[sp["<think>"]] and not m[tok.vocab_size:].any()
    m = f.mask(Step(text=False, specials=None, ban=frozenset({sp["[EOS]"]})))
    assert not m[:tok.num_base].any() and m[sp["<think>"]] and not m[sp["[EOS]"]] and not m[tok.vocab_size:].any()
    assert f.accept(Step()) is None
    acc = f.accept(Step(check=lambda b: b == b"{"))
    assert acc(ord("{")) and not acc(ord("[")) and acc(sp["<think>"])    # the check is for ordinary tokens
