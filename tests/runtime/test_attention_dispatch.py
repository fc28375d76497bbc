"""dispatch.attend(): the naive and absorbed forms, numpy references and numba kernels, agree with
MLA's definition in float64 on awkward sizes; attention_form() picks the form from the options."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.offload.formats import Fp8BlockLinear, PlainLinear, quantize_fp8_block
from kimi_desktop.runtime.dispatch import Options, attend, attention_form

H, C, P, V, R = 3, 16, 8, 12, 24           # awkward: no size a multiple of another's tile


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def mla_f64(q, kv, pe, w, start, scale):
    """MLA by its definition, per head, in float64: keys [k_nope | k_pe], values from the latent.
    q [T, H, C+P], kv [N, R], pe [N, P], w [H*(C+V), R] -> [T, H, V]."""
    q, kv, pe = (np.asarray(a, np.float64) for a in (q, kv, pe))
    w = np.asarray(w, np.float64).reshape(H, C + V, R)
    T, N = q.shape[0], kv.shape[0]
    out = np.zeros((T, H, V))
    for h in range(H):
        k = np.concatenate([kv @ w[h, :C].T, pe], axis=1)             # [N, C+P]
        v = kv @ w[h, C:].T                                            # [N, V]
        s = q[:, h] @ k.T * scale                                      # [T, N]
        s[np.arange(N)[None, :] > start + np.arange(T)[:, None]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v
    return out


def inputs(T, start, seed):
    rng = np.random.default_rng(seed)
    N = start + T
    q = rng.standard_normal((T, H, C + P)).astype(np.float32)
    kv = rng.standard_normal((N, R)).astype(np.float32)
    pe = rng.standard_normal((N, P)).astype(np.float32)
    w = (rng.standard_normal((H * (C + V), R)) * 0.3).astype(ml_dtypes.bfloat16)
    return q, kv, pe, w


FORMS = {  # options -> the form attention_form must pick for a prefill (T > 1) with a bf16 kv_b
    "naive_kernel": Options(attn_impl="naive"),
    "naive_ref": Options(kernels=False, attn_impl="naive"),
    "absorb_kernel": Options(attn_impl="absorb"),
    "absorb_ref": Options(kernels=False, attn_impl="absorb"),
}


@pytest.mark.parametrize("T,start", [(1, 0), (1, 37), (5, 7), (19, 0)])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_computes_mla(form, T, start):
    q, kv, pe, w = inputs(T, start, seed=T + start)
    kv_b, opts, scale = PlainLinear(w), FORMS[form], np.float32(0.21)
    assert attention_form(opts, T, start + T, H, C, V, kv_b) == form
    got = attend(q.copy(), kv, pe, kv_b, start, scale, opts)
    assert got.shape == (T, H, V) and got.dtype == np.float32
    assert rel_err(got, mla_f64(q, kv, pe, w.astype(np.float32), start, scale)) < 1e-5


def test_fp8_kv_b_uses_the_absorbed_reference_with_kernels():
    """The absorbed kernels read bf16 rows in place; an FP8 kv_b is dequantized (a temporary)."""
    q, kv, pe, w = inputs(3, 4, seed=1)
    wq, scale_inv = quantize_fp8_block(w.astype(np.float32), (128, 128))
    kv_b = Fp8BlockLinear(wq, scale_inv, (128, 128))
    opts = Options(attn_impl="absorb")
    assert attention_form(opts, 3, 7, H, C, V, kv_b) == "absorb_ref"
    got = attend(q, kv, pe, kv_b, 4, np.float32(0.3), opts)
    assert rel_err(got, mla_f64(q, kv, pe, kv_b.dequantize(), 4, 0.3)) < 1e-5


def test_auto_picks_naive_for_prefill_while_the_expanded_latent_fits():
    kv_b = PlainLinear(inputs(1, 0, 0)[3])
    expanded = 10 * H * (C + V) * 4                    # bytes of a 10-token cache expanded by kv_b
    auto = Options(naive_max_bytes=expanded)
    assert attention_form(auto, 4, 10, H, C, V, kv_b) == "naive_kernel"
    assert attention_form(auto, 4, 11, H, C, V, kv_b) == "absorb_kernel"     # one token too many
    assert attention_form(auto, 1, 5, H, C, V, kv_b) == "absorb_kernel"      # decode: always absorbed
    assert attention_form(Options(kernels=False, naive_max_bytes=expanded), 4, 10, H, C, V, kv_b) == "naive_ref"


@pytest.mark.parametrize("kw,field", [(dict(attn_impl="flash"), "attn_impl"),
                                      (dict(naive_max_bytes=-1), "naive_max_bytes")])
def test_bad_options_are_rejected(kw, field):
    with pytest.raises(ValueError, match=field):
        Options(**kw)
