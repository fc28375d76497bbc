"""MoE router, DeepSeek-V3 / K2 "noaux_tc" (sigmoid scores, bias for selection only, group-limited).

    scores  = sigmoid(logits)                          float32 (computed in float64, rounded once)
    choice  = scores + bias                            float32
    group score = sum of the top-2 choice values of each of n_group equal groups (float32)
    keep the topk_group best groups, other experts' choice = -inf   (transformers' -inf masking)
    idx     = top_k experts by masked choice
    weights = scores[idx]; if norm_topk_prob: w / (sum(w) + 1e-20); w * routed_scaling_factor
              (normalisation and scaling in float64, rounded once to float32)

Tie rule (both for groups and experts): higher value first; equal values -> lower index first.
This is exactly numpy's `argsort(-v, kind="stable")`, which the reference uses, and the output
order: idx[t] is sorted by masked choice, descending. NaN logits count as -inf for selection.

Shape legend: logits [T, E] float32, bias [E] float32, idx [T, top_k] int32, weights [T, top_k] f32.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import check
from ._launch import twin

__all__ = ["router_topk_ref", "router_topk"]


def _sigmoid_f32(x):
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def router_topk_ref(logits, bias, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor):
    T, E = logits.shape
    scores = _sigmoid_f32(logits)
    choice = scores + bias.astype(np.float32)
    choice = np.where(np.isnan(choice), np.float32(-np.inf), choice)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(T, n_group, E // n_group)
        top2 = np.sort(grouped, axis=-1)[..., -2:]
        gscore = top2[..., 0] + top2[..., 1]
        keep = np.argsort(-gscore, axis=-1, kind="stable")[:, :topk_group]
        gmask = np.zeros((T, n_group), bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        choice = np.where(np.repeat(gmask, E // n_group, axis=-1), choice, np.float32(-np.inf))
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, idx, axis=-1).astype(np.float64)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx.astype(np.int32), (w * routed_scaling_factor).astype(np.float32)


@njit(cache=True)
def _beats(v, i, bv, bi):
    """(v, i) ranks before (bv, bi): larger value, ties to the lower index."""
    return v > bv or (v == bv and i < bi)


@twin
@njit(parallel=True, nogil=True, cache=True)
def _router(logits, bias, n_group, topk_group, top_k, norm, rsf, idx, wts):
    T, E = logits.shape
    gsize = E // n_group
    ninf = np.float32(-np.inf)
    for t in prange(T):
        scores = np.empty(E, np.float32)
        choice = np.empty(E, np.float32)
        for e in range(E):
            s = np.float32(1.0 / (1.0 + math.exp(-np.float64(logits[t, e]))))
            scores[e] = s
            c = s + bias[e]
            choice[e] = ninf if math.isnan(c) else c
        if n_group > 1 and topk_group < n_group:
            gscore = np.empty(n_group, np.float32)
            for g in range(n_group):
                m1 = ninf
                m2 = ninf
                for e in range(g * gsize, (g + 1) * gsize):
                    c = choice[e]
                    if c > m1:
                        m2 = m1
                        m1 = c
                    elif c > m2:
                        m2 = c
                gscore[g] = m2 + m1  # the reference's order: second-largest + largest
            keep = np.zeros(n_group, np.bool_)
            for _ in range(topk_group):
                bg = -1
                bv = ninf
                for g in range(n_group):
                    if not keep[g] and (bg < 0 or _beats(gscore[g], g, bv, bg)):
                        bg = g
                        bv = gscore[g]
                keep[bg] = True
            for g in range(n_group):
                if not keep[g]:
                    for e in range(g * gsize, (g + 1) * gsize):
                        choice[e] = ninf
        taken = np.zeros(E, np.bool_)
        tot = 0.0
        for k in range(top_k):
            be = -1
            bv = ninf
            for e in range(E):
                if not taken[e] and (be < 0 or _beats(choice[e], e, bv, be)):
                    be = e
                    bv = choice[e]
            taken[be] = True
            idx[t, k] = be
            tot += np.float64(scores[be])
        den = tot + 1e-20
        for k in range(top_k):
            w = np.float64(scores[idx[t, k]])
            if norm:
                w = w / den
            wts[t, k] = np.float32(w * rsf)


def router_topk(logits, bias, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor):
    """-> (idx int32 [T, top_k], weights float32 [T, top_k]). logits float32 [T, E], bias float32 [E]."""
    logits = check(logits, "logits", np.float32, 2)
    T, E = logits.shape
    bias = check(bias, "bias", np.float32, 1, (E,))
    n_group, topk_group, top_k = int(n_group), int(topk_group), int(top_k)
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group: {n_group} does not divide the {E} experts")
    if n_group > 1 and topk_group < n_group and E // n_group < 2:
        raise ValueError(f"n_group: groups of {E // n_group} expert(s); group-limited routing needs >= 2")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group: expected 1..{n_group}, got {topk_group}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected 1..{E}, got {top_k}")
    idx = np.empty((T, top_k), np.int32)
    w = np.empty((T, top_k), np.float32)
    _router.pick(logits.size * top_k)(logits, bias, n_group, topk_group, top_k, bool(norm_topk_prob), float(routed_scaling_factor), idx, w)
    return idx, w
