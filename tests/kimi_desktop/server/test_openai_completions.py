"""/v1/completions (raw prompt, no chat template) and the request -> Sampling mapping."""

from __future__ import annotations

import pytest

from kimi_desktop.chat import Sampling
from kimi_desktop.server.openai_api import chat_request, completion_request
from kimi_desktop.server.openai_schema import ChatCompletionRequest, CompletionRequest

from .helpers import KEY, openai_client, raw, sse_events


def test_completion_is_the_raw_prompt_continuation(server, server_engine):
    c = openai_client(server)
    r = c.completions.create(model="m", prompt="Once upon a time", max_tokens=6, temperature=0)
    tok = server_engine.tokenizer
    ids = tok.encode("Once upon a time")
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    # the same continuation from token ids, and the text is the greedy tokens decoded with specials spelled out
    by_ids = c.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    assert by_ids.choices[0].text == r.choices[0].text
    lp = by_ids.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                         lp.token_logprobs))
    echo = c.completions.create(model="m", prompt="Once upon a time", max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "Once upon a time" + r.choices[0].text


def test_completion_stream(server):
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    status, _, data = raw(server, "POST", "/v1/completions", body)
    evs = sse_events(data)
    assert status == 200 and evs[-1] == "[DONE]"
    *chunks, usage = evs[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    plain = openai_client(server).completions.create(model="m", prompt="Hello", max_tokens=5, temperature=0)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == plain.choices[0].text


def test_special_tokens_in_the_prompt_are_tokens(scripted, scripted_engine, script):
    script("<think>raw</think>ok<|im_end|>")
    r = openai_client(scripted, KEY).completions.create(model="m", prompt="<|im_user|>user<|im_middle|>Hi",
                                                        temperature=0, max_tokens=20)
    assert r.choices[0].text == "<think>raw</think>ok"        # raw text: no reasoning / tool parsing
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(scripted_engine.tokenizer.encode("<|im_user|>user<|im_middle|>Hi"))


def test_sampling_fields_reach_the_engine():
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}], "temperature": 0.3, "top_p": 0.8, "top_k": 7,
        "min_p": 0.05, "max_completion_tokens": 9, "stop": "END", "seed": -1, "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "repetition_penalty": 1.3, "logprobs": True, "top_logprobs": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "some_vendor_field": 1})
    _, _, choice, s = chat_request(body)
    assert choice == {"type": "function", "function": {"name": "f"}}
    assert s == Sampling(temperature=0.3, top_p=0.8, top_k=7, min_p=0.05, max_tokens=9, stop="END", seed=2 ** 64 - 1,
                         presence_penalty=0.1, frequency_penalty=0.2, repetition_penalty=1.3, logprobs=True,
                         top_logprobs=2, response_format={"type": "json_schema", "json_schema": {
                             "name": "n", "schema": {"type": "object"}}})
    prompt, cs = completion_request(CompletionRequest.model_validate({"prompt": ["hi"], "logprobs": 0,
                                                                      "max_tokens": 4}))
    assert prompt == "hi" and cs == Sampling(max_tokens=4, logprobs=True, top_logprobs=0)
