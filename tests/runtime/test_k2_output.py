"""K2 output parser: hand-written token streams, fed one token at a time and all at once."""

from __future__ import annotations

import dataclasses
import random

import pytest

from kimi_desktop.runtime import load_tokenizer
from kimi_desktop.runtime.events import (ContentDelta, Finish, ReasoningDelta, TokenLogprobs, ToolCallDelta,
                                         Usage)
from kimi_desktop.runtime.k2_output import K2OutputParser, tool_name
from kimi_desktop.runtime.tokenizer_files import write_tokenizer_files

MARKER_TEXT = ["<|", "|>", "<think>", "</think>"]
SEC, SEC_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL, ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parser-tok")
    write_tokenizer_files(folder, 1792)
    return load_tokenizer(folder)


def ids_of(tok, *pieces) -> list[int]:
    """str pieces are encoded (marker strings become their special ids), ints/lists pass through."""
    out: list[int] = []
    for p in pieces:
        if isinstance(p, str):
            out += tok.encode(p)
        elif isinstance(p, int):
            out.append(p)
        else:
            out += list(p)
    return out


def summary(events):
    """(reasoning, content, tool_calls) rebuilt from events alone."""
    r, c, calls = [], [], []
    for e in events:
        if isinstance(e, ReasoningDelta):
            r.append(e.text)
        elif isinstance(e, ContentDelta):
            c.append(e.text)
        else:
            assert isinstance(e, ToolCallDelta)
            if e.id is not None:
                assert e.index == len(calls)
                calls.append({"id": e.id, "name": e.name, "arguments": ""})
            else:
                assert e.name is None and e.index == len(calls) - 1
            calls[e.index]["arguments"] += e.arguments_fragment
    return "".join(r), "".join(c), calls


def parse(tok, ids, reasoning=True, marker_free=True):
    """Feed one token at a time and all at once; both must give the same result. Returns
    (reasoning, content, tool_calls, events of the one-at-a-time run)."""
    p1 = K2OutputParser(tok, reasoning=reasoning)
    ev1 = [e for t in ids for e in p1.feed([t])] + p1.finish()
    p2 = K2OutputParser(tok, reasoning=reasoning)
    ev2 = p2.feed(ids) + p2.finish()
    s1, s2 = summary(ev1), summary(ev2)
    assert s1 == s2
    assert s1 == (p1.reasoning, p1.content, p1.tool_calls) == (p2.reasoning, p2.content, p2.tool_calls)
    r, c, calls = s1
    for text in [] if not marker_free else (r, c, *(x["arguments"] for x in calls), *(x["id"] for x in calls)):
        for m in MARKER_TEXT:
            assert m not in text, (m, text)
    return r, c, calls, ev1


def test_plain_content(tok):
    r, c, calls, ev = parse(tok, ids_of(tok, "Hello, world! 你好<|im_end|>"), reasoning=False)
    assert (r, c, calls) == ("", "Hello, world! 你好", [])
    assert all(isinstance(e, ContentDelta) for e in ev) and len(ev) > 1


def test_think_then_content(tok):
    r, c, calls, _ = parse(tok, ids_of(tok, "<think>The user wants 2+2.</think>The answer is 4.<|im_end|>"))
    assert (r, c, calls) == ("The user wants 2+2.", "The answer is 4.", [])


def test_reasoning_without_leading_think(tok):
    r, c, _, _ = parse(tok, ids_of(tok, "Thinking without the tag.</think>Done."))
    assert (r, c) == ("Thinking without the tag.", "Done.")


def test_no_end_marker_is_all_reasoning(tok):
    r, c, _, _ = parse(tok, ids_of(tok, "<think>still thinking about it"))     # unclosed think at finish
    assert (r, c) == ("still thinking about it", "")


def test_reasoning_ended_by_tool_section(tok):
    ids = ids_of(tok, "<think>I need the weather.", SEC, CALL, "functions.get_weather:0", ARGS,
                 '{"city": "Paris"}', CALL_END, SEC_END, "<|im_end|>")
    r, c, calls, _ = parse(tok, ids)
    assert (r, c) == ("I need the weather.", "")
    assert calls == [{"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Paris"}'}]


def test_two_calls_streamed(tok):
    args0 = '{"city": "Paris", "unit": "celsius", "days": [1, 2, 3]}'
    args1 = '{"query": "最新消息 😀", "n": 10}'
    ids = ids_of(tok, "<think>two tools</think>", SEC, CALL, "functions.get_weather:0", ARGS, args0, CALL_END,
                 CALL, "functions.web.search:1", ARGS, args1, CALL_END, SEC_END, "<|im_end|>")
    r, c, calls, ev = parse(tok, ids)
    assert calls == [{"id": "functions.get_weather:0", "name": "get_weather", "arguments": args0},
                     {"id": "functions.web.search:1", "name": "search", "arguments": args1}]
    tcs = [e for e in ev if isinstance(e, ToolCallDelta)]
    heads = [e for e in tcs if e.id is not None]
    assert [(h.index, h.id, h.name, h.arguments_fragment) for h in heads] == [
        (0, "functions.get_weather:0", "get_weather", ""), (1, "functions.web.search:1", "search", "")]
    assert sum(1 for e in tcs if e.id is None and e.index == 0) > 5      # arguments arrive in fragments
    assert tcs.index(heads[1]) > max(i for i, e in enumerate(tcs) if e.index == 0)


def test_content_before_and_after_section(tok):
    ids = ids_of(tok, "<think>r</think>Let me check.", SEC, CALL, "functions.f:0", ARGS, "{}", CALL_END,
                 SEC_END, " Anything else?")
    r, c, calls, _ = parse(tok, ids)
    assert (r, c) == ("r", "Let me check. Anything else?")
    assert calls == [{"id": "functions.f:0", "name": "f", "arguments": "{}"}]


def test_multibyte_utf8_split_across_tokens(tok):
    text = "héllo 你好 😀 👩‍💻 🇫🇷"
    ids = ids_of(tok, "</think>", list(text.encode("utf-8")))        # one byte per token
    r, c, _, ev = parse(tok, ids)
    assert c == text
    assert all("\ufffd" not in e.text for e in ev)


def test_unclosed_tool_section_at_finish(tok):
    ids = ids_of(tok, "</think>", SEC, CALL, "functions.f:3", ARGS, '{"a": 1, "b": "tru')
    _, c, calls, _ = parse(tok, ids)
    assert c == "" and calls == [{"id": "functions.f:3", "name": "f", "arguments": '{"a": 1, "b": "tru'}]


def test_malformed_id_still_a_call(tok):
    ids = ids_of(tok, "</think>", SEC, CALL, " get_weather ", ARGS, "{}", CALL_END, CALL, "functions.lookup", ARGS,
                 "{}", CALL_END, SEC_END)
    _, _, calls, _ = parse(tok, ids)
    assert calls == [{"id": "get_weather", "name": "get_weather", "arguments": "{}"},
                     {"id": "functions.lookup", "name": "lookup", "arguments": "{}"}]


def test_invalid_json_passed_through(tok):
    ids = ids_of(tok, "</think>", SEC, CALL, "functions.f:0", ARGS, "  {'city': Paris,  \n", CALL_END, SEC_END)
    _, _, calls, _ = parse(tok, ids)
    assert calls[0]["arguments"] == "{'city': Paris,"              # only the surrounding whitespace goes


def test_call_without_argument_begin_is_content(tok):
    ids = ids_of(tok, "</think>", SEC, CALL, "functions.f:0", CALL_END, CALL, "functions.g:1", ARGS, "{}", CALL_END,
                 SEC_END)
    _, c, calls, _ = parse(tok, ids)
    assert c == "functions.f:0"
    assert calls == [{"id": "functions.g:1", "name": "g", "arguments": "{}"}]    # index 0: the first real call


def test_reasoning_disabled(tok):
    ids = ids_of(tok, "<think>hmm</think>Answer.", SEC, CALL, "functions.f:0", ARGS, "{}", CALL_END, SEC_END)
    r, c, calls, _ = parse(tok, ids, reasoning=False)
    assert (r, c) == ("", "hmmAnswer.") and calls[0]["name"] == "f"


def test_think_only_at_position_zero(tok):
    r, c, _, _ = parse(tok, ids_of(tok, "a<think>b</think>c<think>d</think>e"))
    assert (r, c) == ("ab", "cde")                   # stray tags are dropped, never text


def test_singular_section_variant_as_text(tok):
    sp = tok.special_ids
    assert "<|tool_call_section_begin|>" not in sp                     # arrives as ordinary tokens
    ids = ids_of(tok, "</think>ok", "<|tool_call_section_begin|>", CALL, "functions.f:0", ARGS, '{"x":1}', CALL_END,
                 "<|tool_call_section_end|>", "bye")
    _, c, calls, _ = parse(tok, ids)
    assert c == "okbye" and calls == [{"id": "functions.f:0", "name": "f", "arguments": '{"x":1}'}]


def test_markers_spelled_with_ordinary_tokens(tok):
    def spelled(marker):            # two halves: neither is a special-token string, so plain tokens
        return tok.encode(marker[:7]) + tok.encode(marker[7:])

    ids = ids_of(tok, "</think>a", spelled(SEC), spelled(CALL), "functions.f:0", spelled(ARGS), "{}",
                 spelled(CALL_END), spelled(SEC_END), "b")
    assert all(i < tok.num_base for i in ids[1:])
    _, c, calls, _ = parse(tok, ids)
    assert c == "ab" and calls == [{"id": "functions.f:0", "name": "f", "arguments": "{}"}]


def test_angle_brackets_that_are_not_markers(tok):
    text = "if a < b and c <| d then x<y; <|tool_call or <thin"
    _, c, _, _ = parse(tok, ids_of(tok, "</think>", text), marker_free=False)
    assert c == text


def test_end_token_stops_and_other_specials_are_dropped(tok):
    sp = tok.special_ids
    ids = ids_of(tok, "</think>one", sp["<|im_user|>"], sp["[BOS]"], tok.num_base + 100, " two<|im_end|>after")
    p = K2OutputParser(tok)
    ev = p.feed(ids)
    assert p.done and p.content == "one two" and summary(ev)[1] == "one two"
    assert p.feed(tok.encode("more")) == [] and p.finish() == []
    p2 = K2OutputParser(tok)
    p2.feed(ids_of(tok, "</think>x", sp["[EOS]"], "y"))
    assert p2.done and p2.content == "x"


def test_feed_text(tok):
    raw = ("<think>need it</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
           '<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>ignored')
    for seed in range(5):
        rng = random.Random(seed)
        p = K2OutputParser(tok)
        ev, i = [], 0
        while i < len(raw):
            n = rng.randint(1, 9)
            ev += p.feed_text(raw[i:i + n])
            i += n
        ev += p.finish()
        call = {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city":"Paris"}'}
        assert summary(ev) == ("need it", "Checking.", [call])


def test_instruct_tokenizer_without_think_tokens(tmp_path):
    write_tokenizer_files(tmp_path, 600, flavor="instruct")
    t = load_tokenizer(tmp_path)
    r, c, calls, _ = parse(t, ids_of(t, "Sure.", SEC, CALL, "functions.f:0", ARGS, "{}", CALL_END, SEC_END,
                                     "<|im_end|>"), reasoning=False)
    assert (r, c) == ("", "Sure.") and calls[0]["id"] == "functions.f:0"


def test_phase(tok):
    p = K2OutputParser(tok)
    seen = [p.phase]
    for piece in ("<think>", "hmm", "</think>", "ok", SEC, CALL, "functions.f:0", ARGS, "{}", CALL_END, SEC_END,
                  "<|im_end|>"):
        p.feed(tok.encode(piece))
        seen.append(p.phase)
    assert seen == ["start", "reasoning", "reasoning", "content", "content", "tool_section", "tool_call_id",
                    "tool_call_id", "tool_arguments", "tool_arguments", "tool_section", "content", "done"]


def test_tool_name_rule():
    assert tool_name("functions.get_weather:0") == "get_weather"
    assert tool_name("functions.a.b:12") == "b"
    assert tool_name("plain") == "plain"


def test_events_are_frozen_slotted():
    for ev in (ReasoningDelta("a"), ContentDelta("b"), ToolCallDelta(0, "x", "y", ""),
               TokenLogprobs("t", -0.5, (("t", -0.5),)), Usage(1, 2, 0), Finish("stop")):
        assert not hasattr(ev, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ev, dataclasses.fields(ev)[0].name, None)
