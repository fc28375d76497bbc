"""The JSON prefix automaton and the token-level constraint program (no model needed)."""

from __future__ import annotations

import json
import random

import pytest

from kimi_desktop.constrain import Constrainer, JsonPrefix, ToolSpec

DOCS = [
    {"a": 1, "b": [1, 2.5e-3, {"c": None, "d": True}], "é": "x\"\\\u00e9\n\t/"},
    [], {}, "str", -0.5, 12, 0, [[[]]], {"k": [{}]}, [1E+5, -0.0, 3e-10], {"u": "\u2603 snow \U0001F600"},
    False, None,
]


@pytest.mark.parametrize("doc", DOCS, ids=range(len(DOCS)))
def test_every_prefix_of_valid_json_is_accepted_and_closable(doc):
    for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False, indent=2), json.dumps(doc, separators=(",", ":"))):
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
        if not j.accepts(data[i:i + 1]):
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
    assert not JsonPrefix(top_type="object").accepts(b"[")
    assert JsonPrefix(top_type="object").accepts(b"{ ") and not JsonPrefix().accepts(b" {")
    assert not JsonPrefix({"type": "integer"}).accepts(b"1.5")
    assert JsonPrefix({"type": "integer"}).accepts(b"-12")
    assert JsonPrefix({"type": ["string", "null"]}).accepts(b"n")
    assert not JsonPrefix({"type": ["string", "null"]}).accepts(b"1")
    schema = {"type": "object", "required": ["x", "y"],
              "properties": {"x": {"type": "string"}, "y": {"enum": ["aa", "b"]}}}
    j = JsonPrefix(schema)
    assert not j.accepts(b"{}") and not j.accepts(b'{"x":1}') and j.accepts(b'{"x":1,"y":2}')
    assert j.closing() == b'{"x":"","y":"aa"}'
    j.feed(b'{"x":"q", "z":[1,')
    assert j.closing() == b'null],"y":"aa"}'
    assert json.loads(b'{"x":"q", "z":[1,' + j.closing()) == {"x": "q", "z": [1, None], "y": "aa"}
    # nested objects are not held to the top-level required list
    j = JsonPrefix(schema)
    assert j.accepts(b'{"x":{}, "y":{}}')


def test_multibyte_utf8_split_across_feeds():
    j = JsonPrefix()
    data = '{"k":"é☃😀"}'.encode()
    for b in data:
        assert j.feed(bytes([b]))
    assert j.complete
    j = JsonPrefix()
    assert j.feed(b'{"k":"\xe2\x98')
    assert j.closing() == b'\x80"}'
    assert not JsonPrefix().accepts(b'"\xe2"')          # a lead byte needs continuation bytes


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


def drive(c: Constrainer, rnd: random.Random, vocab: int, limit: int = 500) -> list[int]:
    """Pick random allowed tokens until the program ends."""
    out = []
    for _ in range(limit):
        step = c.step()
        if step is None:
            break
        if step.force is not None:
            t = step.force
        else:
            ok = [t for t in range(vocab) if c.allows(step, t)]
            t = rnd.choice(ok) if ok else step.fallback
        assert c.allows(step, t) or t == step.fallback
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
    ids = drive(c, random.Random(seed), tok.vocab_size)
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
        ids = drive(c, random.Random(seed), tok.vocab_size)
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
        ids = drive(c, random.Random(seed), tok.vocab_size)
        assert c.finished and len(ids) <= budget
        text = render(tok, ids).split("</think>")[-1]
        assert text.endswith("<|im_end|>")
        assert isinstance(json.loads(text[:-len("<|im_end|>")]), dict)


def test_none_mode_bans_only_tool_tokens():
    tok = ToyTok()
    c = Constrainer(tok, "none")
    step = c.step()
    sp = tok.special_ids
    assert not c.allows(step, sp["<|tool_calls_section_begin|>"]) and not c.allows(step, sp["<|tool_call_begin|>"])
    assert c.allows(step, sp["<|im_end|>"]) and c.allows(step, 65)


def test_reasoning_is_capped_then_closed():
    tok = ToyTok()
    c = Constrainer(tok, "json", top_type="object", budget=100, max_reasoning_tokens=3)
    sp = tok.special_ids
    assert c.allows(c.step(), sp["<think>"]) and not c.allows(c.step(), sp["<|im_end|>"])
    c.advance(sp["<think>"])
    for _ in range(3):
        assert not c.allows(c.step(), sp["<|im_end|>"])
        c.advance(65)
    assert c.step().force == sp["</think>"]
