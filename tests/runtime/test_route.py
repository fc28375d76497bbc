"""noaux_tc routing (model.route, the one implementation) against a float64 brute-force reference.

The reference ranks with an explicit key (higher value first, equal values: lower index first) and
checks that every decision boundary of its float64 answer is wider than float32 rounding, so the
expected experts hold on any machine; exact ties are built from equal inputs (equal bits everywhere).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kimi_desktop.runtime.model import route

MARGIN = 1e-5      # float32 rounding of sigmoid + bias is ~1e-7: wider gaps rank the same everywhere


def cfg(n_group, topk_group, top_k, norm, rsf=2.827):
    return SimpleNamespace(n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                           norm_topk_prob=norm, routed_scaling_factor=rsf)


def _ranked(values, ids):
    """ids ordered by (value descending, id ascending)."""
    return sorted(ids, key=lambda i: (-values[i], i))


def route64(logits, bias, c):
    """(idx [T, K], weights float64 [T, K], narrowest decision gap) by brute force in float64."""
    T, E = logits.shape
    size = E // c.n_group
    idx, wts, gap = [], [], np.inf
    for t in range(T):
        s = 1.0 / (1.0 + np.exp(-logits[t].astype(np.float64)))
        choice = s + bias.astype(np.float64)
        groups = list(range(c.n_group))
        if c.n_group > 1:
            gscore = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in groups]
            order = _ranked(gscore, groups)
            if c.topk_group < c.n_group:
                gap = min(gap, gscore[order[c.topk_group - 1]] - gscore[order[c.topk_group]])
            groups = order[:c.topk_group]
        cand = _ranked(choice, [e for g in groups for e in range(g * size, (g + 1) * size)])
        top = cand[:c.num_experts_per_tok]
        if len(cand) > len(top):
            gap = min(gap, choice[top[-1]] - choice[cand[len(top)]])
        w = s[top]
        if c.norm_topk_prob:
            w = w / w.sum()
        idx.append(top)
        wts.append(w * c.routed_scaling_factor)
    return np.array(idx), np.array(wts), gap


CASES = [  # T, E, n_group, topk_group, top_k
    (1, 384, 1, 1, 8), (17, 256, 8, 4, 8), (3, 64, 8, 3, 6), (5, 16, 4, 1, 4), (3, 384, 1, 1, 8)]


@pytest.mark.parametrize("T,E,ng,tg,k", CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_float64(T, E, ng, tg, k, norm):
    r = np.random.default_rng(T * E + ng + k)
    logits = r.standard_normal((T, E)).astype(np.float32)
    bias = (r.standard_normal(E) * 0.1).astype(np.float32)
    c = cfg(ng, tg, k, norm)
    want_idx, want_w, gap = route64(logits, bias, c)
    assert gap > MARGIN, f"test data too close to a tie ({gap:.2g}): pick another seed"
    idx, w = route(logits, bias, c)
    assert w.dtype == np.float32 and idx.shape == w.shape == (T, k)
    np.testing.assert_array_equal(idx, want_idx)            # in rank order, best first
    np.testing.assert_allclose(w, want_w, rtol=1e-6)


def test_route_ties_go_to_the_lower_index():
    E = 16
    logits = np.zeros((2, E), np.float32)                   # token 0: all equal
    logits[1, :] = -1.0
    logits[1, [3, 9, 12]] = 1.0                             # token 1: three equal winners, then ties
    idx, w = route(logits, np.zeros(E, np.float32), cfg(1, 1, 5, True, 1.0))
    assert idx.tolist() == [[0, 1, 2, 3, 4], [3, 9, 12, 0, 1]]
    np.testing.assert_allclose(w[0], np.full(5, 0.2), rtol=1e-6)
    # equal groups: the lower groups are kept
    idx, _ = route(np.zeros((1, E), np.float32), np.zeros(E, np.float32), cfg(4, 2, 3, True))
    assert idx.tolist() == [[0, 1, 2]]


def test_route_keeps_groups_by_their_top_two():
    E = 16
    logits = np.full((1, E), -5.0, np.float32)
    logits[0, [0, 1]] = 3.0                 # group 0: the best pair
    logits[0, 13] = 4.0                     # group 3: the best single expert, a weak second
    idx, w = route(logits, np.zeros(E, np.float32), cfg(4, 1, 2, True, 1.0))
    assert idx.tolist() == [[0, 1]] and abs(float(w.sum()) - 1.0) < 1e-6
    idx, _ = route(logits, np.zeros(E, np.float32), cfg(4, 2, 3, True, 1.0))
    assert idx.tolist() == [[13, 0, 1]]


def test_bias_chooses_but_does_not_weigh():
    E = 8
    logits = np.linspace(1.0, -1.0, E, dtype=np.float32)[None]   # expert 0 best without bias
    bias = np.zeros(E, np.float32)
    bias[7] = 5.0                                                  # pulls the worst expert in first
    idx, w = route(logits, bias, cfg(1, 1, 2, False, 1.0))
    assert idx.tolist() == [[7, 0]]
    s = 1.0 / (1.0 + np.exp(-logits[0, [7, 0]].astype(np.float64)))
    np.testing.assert_allclose(w[0], s, rtol=1e-6)
