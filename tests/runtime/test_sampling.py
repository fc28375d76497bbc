"""The sampler chain on hand-made logit vectors (in the style of mlx-lm's test_sample_utils)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kimi_desktop.runtime.sampling import (NoAllowedToken, Sampler, SamplerConfig,
                                           apply_presence_frequency, apply_repetition_penalty,
                                           distribution, log_softmax, top_logprobs)


def L(*probs):
    """Logits whose softmax is probs (0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.array(probs, dtype=np.float64))


def close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-9)


def new_sampler(prompt_ids=(), **settings) -> Sampler:
    return Sampler(SamplerConfig(**settings), prompt_ids)


def test_temperature_scales_the_distribution():
    close(distribution(L(0.1, 0.2, 0.7)), [0.1, 0.2, 0.7])
    p = np.array([0.1, 0.2, 0.7]) ** 2
    close(distribution(L(0.1, 0.2, 0.7), temperature=0.5), p / p.sum())
    close(distribution(L(0.1, 0.2, 0.7), temperature=0), [0, 0, 1])


def test_greedy_ties_go_to_the_lowest_id():
    close(distribution(np.array([1.0, 3.0, 3.0, 0.0]), temperature=0), [0, 1, 0, 0])
    s = new_sampler(temperature=0)
    assert s.sample(np.array([1.0, 3.0, 3.0, 0.0])).token == 1


def test_top_p():
    close(distribution(L(0.9, 0.0, 0.0, 0.1), top_p=0.3), [1, 0, 0, 0])
    close(distribution(L(0.9, 0.0, 0.0, 0.1), top_p=0.95), [0.9, 0, 0, 0.1])
    close(distribution(L(0.0, 0.5, 0.4, 0.1), top_p=0.4), [0, 1, 0, 0])
    close(distribution(L(0.0, 0.5, 0.4, 0.1), top_p=0.6), [0, 5 / 9, 4 / 9, 0])
    close(distribution(L(0.0, 0.5, 0.4, 0.1), top_p=0.9), [0, 5 / 9, 4 / 9, 0])   # exactly reached
    # reached up to rounding: 0.7 + 0.2 sums to 0.8999999999999998 < 0.9, and the nucleus still stops
    # there (model.sample, the CLI's sampler before this one, kept the 0.1 token too)
    close(distribution(L(0.7, 0.2, 0.1), top_p=0.9), [7 / 9, 2 / 9, 0])
    assert {Sampler(SamplerConfig(top_p=0.9, seed=i)).sample(L(0.7, 0.2, 0.1)).token for i in range(300)} == {0, 1}
    # top_p acts on the tempered distribution
    p = np.array([0.5, 0.3, 0.2]) ** 2
    p /= p.sum()                                     # 0.658, 0.237, 0.105
    close(distribution(L(0.5, 0.3, 0.2), temperature=0.5, top_p=0.7), [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0])


def test_min_p():
    close(distribution(L(0.9, 0.0, 0.0, 0.1), min_p=0.2), [1, 0, 0, 0])
    close(distribution(L(0.9, 0.0, 0.0, 0.1), min_p=0.1), [0.9, 0, 0, 0.1])
    close(distribution(L(0.5, 0.3, 0.2), min_p=0.5), [0.625, 0.375, 0])


def test_top_k_and_chain_order():
    close(distribution(L(0.5, 0.1, 0.3, 0.1), top_k=2), [0.625, 0, 0.375, 0])
    close(distribution(L(0.5, 0.1, 0.3, 0.1), top_k=1), [1, 0, 0, 0])
    close(distribution(L(0.5, 0.1, 0.3, 0.1), top_k=10), [0.5, 0.1, 0.3, 0.1])
    # top_k first, then top_p on the renormalised survivors: 0.625 >= 0.6 -> only token 0
    close(distribution(L(0.5, 0.1, 0.3, 0.1), top_k=2, top_p=0.6), [1, 0, 0, 0])
    # then min_p on what is left: survivors 0.625 / 0.375, min_p 0.7 -> 0.375 < 0.4375
    close(distribution(L(0.5, 0.1, 0.3, 0.1), top_k=2, min_p=0.7), [1, 0, 0, 0])


def test_allowed_mask_applies_before_truncation():
    allowed = np.array([False, True, True, True])
    close(distribution(L(0.5, 0.1, 0.3, 0.1), allowed=allowed), [0, 0.2, 0.6, 0.2])
    close(distribution(L(0.5, 0.1, 0.3, 0.1), allowed=allowed, top_k=1), [0, 0, 1, 0])
    with pytest.raises(NoAllowedToken):
        distribution(L(0.5, 0.5), allowed=np.array([False, False]))


def test_repetition_penalty_hf_semantics():
    x = np.array([2.0, -2.0, 1.0, 0.0])
    close(apply_repetition_penalty(x, [0, 1, 1], 2.0), [1.0, -4.0, 1.0, 0.0])
    close(apply_repetition_penalty(x, [], 2.0), x)
    # over prompt + generated, last-N window
    s = Sampler(SamplerConfig(repetition_penalty=2.0), prompt_ids=[0, 1])
    s.record(2)
    close(s.process(x), [1.0, -4.0, 0.5, 0.0])
    s = Sampler(SamplerConfig(repetition_penalty=2.0, repetition_last_n=2), prompt_ids=[0, 1])
    s.record(2)
    close(s.process(x), [2.0, -4.0, 0.5, 0.0])


def test_presence_and_frequency_penalties_openai_semantics():
    x = np.array([1.0, 1.0, 1.0, 1.0])
    close(apply_presence_frequency(x, {0: 2, 2: 1}, presence=0.5, frequency=0.25),
          [1 - 0.5 - 0.5, 1, 1 - 0.25 - 0.5, 1])
    # only generated tokens count, not the prompt
    s = Sampler(SamplerConfig(presence_penalty=1.0, frequency_penalty=0.5), prompt_ids=[3, 3, 3])
    s.record(1)
    s.record(1)
    close(s.process(x), [1, 1 - 1.0 - 1.0, 1, 1])
    # negative values encourage repetition
    close(apply_presence_frequency(x, Counter({1: 1}), presence=-1.0, frequency=0.0), [1, 2, 1, 1])


def test_seed_reproduces_and_seeds_differ():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=50) for _ in range(40)]

    def run(seed, **kw):
        s = new_sampler(temperature=1.0, seed=seed, **kw)
        return [s.sample(x).token for x in logits]
    assert run(7) == run(7)
    assert run(7) != run(8)
    acc = lambda t: t % 2 == 0       # noqa: E731
    def run_acc(seed):
        s = new_sampler(temperature=1.0, seed=seed)
        return [s.sample(x, accept=acc).token for x in logits]
    assert run_acc(3) == run_acc(3)
    assert all(t % 2 == 0 for t in run_acc(3))


def test_draws_follow_the_distribution():
    p = np.array([0.5, 0.1, 0.3, 0.1])
    s = new_sampler(temperature=1.0, seed=1)
    n = 8000
    c = np.bincount([s.sample(L(*p), record=False).token for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(c, p, atol=0.025)
    # lazy acceptance: exactly the distribution restricted to accepted tokens
    s = new_sampler(temperature=1.0, seed=2)
    c = np.bincount([s.sample(L(*p), accept=lambda t: t != 0, record=False).token for _ in range(n)],
                    minlength=4) / n
    np.testing.assert_allclose(c, [0, 0.2, 0.6, 0.2], atol=0.025)
    # accept + truncation: top_k=2 keeps {0, 2}; rejecting 0 leaves 2 only
    s = new_sampler(temperature=1.0, top_k=2, seed=3)
    assert {s.sample(L(*p), accept=lambda t: t != 0, record=False).token for _ in range(200)} == {2}
    # nothing kept is accepted -> falls back to the untruncated remainder, restricted
    s = new_sampler(temperature=1.0, top_k=1, seed=4)
    c = np.bincount([s.sample(L(*p), accept=lambda t: t in (1, 3), record=False).token
                     for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(c, [0, 0.5, 0, 0.5], atol=0.04)


def test_greedy_with_accept_walks_in_logit_order():
    x = np.arange(1000, dtype=np.float64)              # best is 999, then 998, ...
    s = new_sampler(temperature=0)
    tried = []

    def acc(t):
        tried.append(t)
        return t < 900
    assert s.sample(x, accept=acc).token == 899
    assert tried == list(range(999, 898, -1))
    with pytest.raises(NoAllowedToken):
        s.sample(x, accept=lambda t: False)


def test_masked_tokens_are_never_drawn():
    allowed = np.zeros(100, dtype=bool)
    allowed[[3, 50, 97]] = True
    s = new_sampler(temperature=2.0, seed=0)
    x = np.random.default_rng(0).normal(size=100)
    assert {s.sample(x, allowed=allowed).token for _ in range(200)} == {3, 50, 97}


def test_logprobs_are_the_penalised_distribution_at_temperature_1():
    x = L(0.5, 0.1, 0.3, 0.1)
    s = new_sampler(temperature=0.2, top_k=1, seed=0)
    d = s.sample(x, logprobs=2)
    assert d.token == 0
    assert d.logprob == pytest.approx(np.log(0.5))
    assert [t for t, _ in d.top] == [0, 2]
    assert [v for _, v in d.top] == pytest.approx([np.log(0.5), np.log(0.3)])
    assert s.sample(x, logprobs=0).top == ()
    # penalties are included
    s2 = new_sampler(temperature=0, frequency_penalty=1.0)
    s2.record(0)
    d2 = s2.sample(x, logprobs=1)
    y = x.copy()
    y[0] -= 1.0
    assert d2.logprob == pytest.approx(log_softmax(y)[d2.token])
    # forced tokens report their logprob too
    d3 = new_sampler().forced(x, 3, logprobs=1)
    assert d3.token == 3 and d3.logprob == pytest.approx(np.log(0.1)) and d3.top[0][0] == 0


def test_top_logprobs_order_and_ties():
    lp = np.array([-1.0, -0.5, -0.5, -3.0])
    assert top_logprobs(lp, 3) == [(1, -0.5), (2, -0.5), (0, -1.0)]
    assert top_logprobs(lp, 10)[-1] == (3, -3.0)
    assert top_logprobs(lp, 0) == []


@pytest.mark.parametrize("kw, word", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 2.0}, "min_p"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"temperature": float("nan")}, "temperature"),
    ({"seed": "x"}, "seed"),
])
def test_bad_settings_name_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplerConfig(**kw).validate()


def test_tiny_temperatures_and_overflowing_penalties_are_their_greedy_limits():
    # found by the server's fuzz run (a 500 "every token is masked"): x / 5e-324 overflowed to +-inf
    x = np.full(300, -30.0, dtype=np.float32)
    x[5], x[9] = 30.0, 29.0
    for t in (5e-324, 1e-300):
        p = distribution(x, t)
        assert p[5] == 1.0 and p.sum() == 1.0
        assert distribution(x, t, allowed=np.arange(300) != 5)[9] == 1.0
    for t in (0.0, 5e-324, 1.0):
        s = Sampler(SamplerConfig(temperature=t, repetition_penalty=5e-324), prompt_ids=[5, 7])
        assert s.sample(x, logprobs=2).token == 5                  # 30 / 5e-324 = +inf: the top
        assert s.sample(x, allowed=np.arange(300) != 5).token == 9
        assert s.sample(x, accept=lambda tok: tok != 5).token == 9
