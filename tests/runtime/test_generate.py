"""The generation step (runtime/generate.py) over a scripted session: what is fed, and when."""

from __future__ import annotations

import itertools

import numpy as np

from kimi_desktop.runtime.generate import common_prefix, generate_step, reuse_prefix
from kimi_desktop.runtime.sampling import Draw, Sampler, SamplerConfig

VOCAB = 8


class ScriptedSession:
    """session.feed returns logits whose greedy token is (last fed id + 1) % VOCAB; records each call."""

    def __init__(self, tokens=()):
        self.tokens = list(tokens)
        self.fed: list[list[int]] = []

    def truncate(self, n):
        del self.tokens[n:]

    def feed(self, ids, progress=None, cancelled=None):
        ids = [int(t) for t in ids]
        self.fed.append(ids)
        self.tokens += ids
        logits = np.zeros(VOCAB, np.float32)
        logits[(ids[-1] + 1) % VOCAB] = 1.0
        return logits


def test_common_prefix_and_reuse_keep_the_last_prompt_token_to_feed():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    s = ScriptedSession([1, 2, 3, 9])
    assert reuse_prefix(s, [1, 2, 3, 5]) == 3 and s.tokens == [1, 2, 3]
    s = ScriptedSession([1, 2, 3])
    assert reuse_prefix(s, [1, 2, 3]) == 2 and s.tokens == [1, 2]     # its logits start the generation


def test_tokens_are_fed_back_only_when_the_next_one_is_asked_for():
    s = ScriptedSession()
    steps = generate_step(s, [3, 4], Sampler(SamplerConfig(temperature=0)))
    assert [d.token for d in itertools.islice(steps, 3)] == [5, 6, 7]
    assert s.fed == [[3, 4], [5], [6]]               # the third token is not fed: nobody asked for a fourth


def test_the_hook_chooses_each_token_and_ends_the_generation():
    s = ScriptedSession()
    sampler = Sampler(SamplerConfig(temperature=0))
    seen = []

    def next_token(logits):
        seen.append(int(np.argmax(logits)))
        return None if len(seen) > 3 else sampler.forced(logits, 0)     # a constraint forcing 0s

    assert [d for d in generate_step(s, [6], sampler, next_token)] == [Draw(0)] * 3
    assert seen == [7, 1, 1, 1] and s.fed == [[6], [0], [0], [0]]
    assert sampler.history == [0, 0, 0]               # forced tokens reach the penalties' history
