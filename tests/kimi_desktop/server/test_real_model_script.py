"""Reasoning and a K2 tool-call section through the real model path: the native engine on the scripted
checkpoint (bigram.py), whose greedy output after the generation prompt is BIGRAM_TEXT; checked at the
engine, then through the server with the official clients, plain and streamed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimi_desktop.chat import ReasoningDelta, Sampling, ToolCallDelta

from tests.kimi_desktop.engine_cases import TOOLS

from .bigram import BIGRAM_TEXT, MIN_MARGIN, bigram_chain, final_hidden, make_bigram_model
from .helpers import openai_client
from .test_anthropic_messages import A_TOOLS, CALL_TURN, GREEDY as A_GREEDY, OPENAI_HISTORY, RESULT_TURN
from .test_anthropic_messages import client as anthropic_client
from .test_openai_responses import RTOOLS, strict

QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
REASONING = "I should look it up."
CALL = ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')
GREEDY = Sampling(temperature=0, max_tokens=64)


def rendered(engine, messages, tools=TOOLS) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.render_chat(messages, tools=tools, add_generation_prompt=True))


# -- the checkpoint and the engine ------------------------------------------------------------------

def test_builder_refuses_a_token_with_two_successors(tiny_int4, tmp_path):
    with pytest.raises(ValueError, match=r"token '</think>' \(\d+\) is followed by both"):
        make_bigram_model(tiny_int4, tmp_path / "x", "<think>a</think>b</think>")
    assert not (tmp_path / "x").exists()


def test_real_logits_are_the_bigram(bigram_engine):
    """Prefill (all positions at once) and decode (one at a time) give lm_head @ final_norm(embed[t]):
    the blocks add nothing to the residual stream, so each token's successor wins by the margin."""
    tok, model = bigram_engine.tokenizer, bigram_engine.model
    nxt = bigram_chain(tok, BIGRAM_TEXT)
    chain = list(nxt)                                        # prompt tail, then the text's tokens
    h = final_hidden(model.ckpt.read_rows("model.embed_tokens.weight", chain), model.ckpt.read("model.norm.weight"),
                     model.cfg.rms_norm_eps)                                   # [n, D] float64
    want = h @ model.ckpt.read("lm_head.weight").astype(np.float64).T         # [n, vocab]
    at_once = model.session().feed(chain, all_logits=True)                    # [n, vocab]
    sess = model.session()
    one_by_one = np.stack([sess.feed([t]) for t in chain])                    # [n, vocab]
    for logits in (at_once, one_by_one):
        # float32 sums of D = 192 products whose magnitudes add to ~12: rounding < 192 * 2**-24 * 13 ~ 1.5e-4
        np.testing.assert_allclose(logits, want, rtol=0, atol=1e-3)
        assert [int(i) for i in logits.argmax(axis=1)] == [nxt[t] for t in chain]
        top2 = np.sort(logits, axis=1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > MIN_MARGIN


def test_engine_greedy_writes_the_reasoning_and_the_tool_call(bigram_engine):
    r = bigram_engine.chat(QUESTION, tools=TOOLS, sampling=GREEDY).result()
    assert r.reasoning == REASONING and r.content == ""
    assert [(c["id"], c["name"], c["arguments"]) for c in r.tool_calls] == [CALL]
    assert r.finish_reason == "tool_calls"
    assert r.usage.prompt_tokens == len(rendered(bigram_engine, QUESTION))
    assert r.usage.completion_tokens == len(bigram_engine.tokenizer.encode(BIGRAM_TEXT)) + 1   # + <|im_end|>
    kinds = [type(e) for e in r.events if isinstance(e, (ReasoningDelta, ToolCallDelta))]
    assert kinds.index(ToolCallDelta) == kinds.count(ReasoningDelta) > 1     # reasoning streamed, then the call


# -- Chat Completions ----------------------------------------------------------------------------------

def test_chat_completions_plain(bigram_server, bigram_engine):
    r = openai_client(bigram_server).chat.completions.create(model="m", messages=QUESTION, tools=TOOLS,
                                                             temperature=0)
    msg = r.choices[0].message
    assert msg.content is None and msg.model_extra["reasoning_content"] == REASONING
    assert msg.model_extra["reasoning"] == REASONING
    assert [(t.id, t.function.name, t.function.arguments) for t in msg.tool_calls] == [CALL]
    assert msg.tool_calls[0].type == "function" and json.loads(msg.tool_calls[0].function.arguments) == {
        "city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage.prompt_tokens == len(rendered(bigram_engine, QUESTION))


def test_chat_completions_streamed(bigram_server):
    stream = openai_client(bigram_server).chat.completions.create(
        model="m", messages=QUESTION, tools=TOOLS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    *with_choices, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    deltas = [c.choices[0].delta for c in with_choices]
    pieces = [d.model_extra.get("reasoning_content") for d in deltas if d.model_extra.get("reasoning_content")]
    assert "".join(pieces) == REASONING and len(pieces) > 1
    assert all(not d.content for d in deltas)                   # no marker text leaks into content
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    first, rest = calls[0], calls[1:]
    assert (first.index, first.id, first.type, first.function.name, first.function.arguments) == (
        0, CALL[0], "function", CALL[1], "")
    assert len(rest) > 1 and all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
    assert "".join(tc.function.arguments for tc in rest) == CALL[2]
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])


# -- the tool result back: the prompt the model sees is the template's ---------------------------------

TURN = ('<|im_assistant|>assistant<|im_middle|><think>I should look it up.</think>'
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        '<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>'
        '<|im_assistant|>assistant<|im_middle|>')


def fed(engine, prompt_tokens: int, history: list[dict]) -> str:
    """The model was fed exactly the template's rendering of `history` (OpenAI-shaped), and the usage
    counted it; the rendered text."""
    want = rendered(engine, history)
    assert prompt_tokens == len(want)
    assert engine.session.tokens[:len(want)] == want
    prompt = engine.tokenizer.decode(want)
    assert prompt.endswith(TURN) and prompt.count(REASONING) == 1
    return prompt


def test_tool_result_turn_renders_as_the_template_says(bigram_server, bigram_engine):
    """K2-Thinking keeps reasoning_content on the assistant turns after the last one without tool calls
    (the tool loop in progress) and renders earlier ones as <think></think>."""
    c = openai_client(bigram_server)
    first = c.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, temperature=0)
    call_turn = first.choices[0].message.model_dump(exclude_none=True)
    result = {"role": "tool", "tool_call_id": CALL[0], "content": "sunny"}
    earlier = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet them back."}]
    for history in (QUESTION + [call_turn, result], earlier + QUESTION + [call_turn, result]):
        r = c.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=1)
        prompt = fed(bigram_engine, r.usage.prompt_tokens, history)
    assert "Greet them back." not in prompt
    assert "<|im_assistant|>assistant<|im_middle|><think></think>Hello.<|im_end|>" in prompt


# -- Responses -------------------------------------------------------------------------------------------

def test_responses_plain_streamed_and_the_tool_result_back(bigram_server, bigram_engine):
    c = openai_client(bigram_server)
    r = c.responses.create(model="m", input=QUESTION, tools=RTOOLS, temperature=0)
    strict(r)
    assert r.status == "completed" and [it.type for it in r.output] == ["reasoning", "function_call"]
    rs, fc = r.output
    assert [(p.type, p.text) for p in rs.content] == [("reasoning_text", REASONING)]
    assert (fc.call_id, fc.name, fc.arguments, fc.status) == (*CALL, "completed")
    assert json.loads(fc.arguments) == {"city": "Paris"} and r.output_text == ""
    with c.responses.stream(model="m", input=QUESTION, tools=RTOOLS, temperature=0) as stream:
        evs = list(stream)
        final = stream.get_final_response()
    reasoning = [e.delta for e in evs if e.type == "response.reasoning_text.delta"]
    arguments = [e.delta for e in evs if e.type == "response.function_call_arguments.delta"]
    assert "".join(reasoning) == REASONING and len(reasoning) > 1
    assert "".join(arguments) == CALL[2] and len(arguments) > 1
    added = [e.item for e in evs if e.type == "response.output_item.added"]
    assert [a.type for a in added] == ["reasoning", "function_call"] and added[1].call_id == CALL[0]
    assert [(it.call_id, it.name, it.arguments) for it in final.output if it.type == "function_call"] == [CALL]
    back = QUESTION + [it.model_dump(exclude_none=True) for it in r.output] + [
        {"type": "function_call_output", "call_id": CALL[0], "output": "sunny"}]
    again = c.responses.create(model="m", input=back, tools=RTOOLS, temperature=0, max_output_tokens=1)
    fed(bigram_engine, again.usage.input_tokens, OPENAI_HISTORY)


# -- Anthropic Messages (streamed through the real model path: test_anthropic_messages.py) ---------------

def test_messages_plain_and_the_tool_result_back(bigram_server, bigram_engine):
    c = anthropic_client(bigram_server)
    r = c.messages.create(model="claude-x", max_tokens=100, tools=A_TOOLS, messages=QUESTION, extra_body=A_GREEDY)
    assert [b.model_dump(exclude_none=True) for b in r.content] == CALL_TURN["content"]
    assert r.content[1].input == {"city": "Paris"} and r.stop_reason == "tool_use"
    again = c.messages.create(model="claude-x", max_tokens=1, tools=A_TOOLS, extra_body=A_GREEDY,
                              messages=QUESTION + [CALL_TURN, RESULT_TURN])
    fed(bigram_engine, again.usage.input_tokens + again.usage.cache_read_input_tokens, OPENAI_HISTORY)
