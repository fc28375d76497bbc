"""The one copy of INT4 unpacking and FP8 block dequantization (offload.formats), as the kernels'
references call it: bit views (uint16 scales, uint8 codes), row slices, widths that are not a whole
number of groups; against element-by-element float64 readings of the format description."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.offload.formats import dequantize_fp8_block, dequantize_int4, int4_nibbles, unpack_int4

rng = np.random.default_rng(11)


def int4_f64(packed, scale_f32, n, group):
    """W[r, c] = (nibble (c % 8) of word c // 8, lowest first) - 8, times scale[r, c // group]."""
    p = packed.astype(np.int64) & 0xFFFFFFFF
    w = np.zeros((packed.shape[0], n))
    for c in range(n):
        w[:, c] = (((p[:, c // 8] >> (4 * (c % 8))) & 0xF) - 8) * scale_f32[:, c // group].astype(np.float64)
    return w


@pytest.mark.parametrize("out,n,group", [(5, 64, 32), (3, 40, 32), (4, 1000, 32), (6, 36, 12), (2, 8, 8)])
def test_dequantize_int4(out, n, group):
    W = -(-n // 8)
    packed = rng.integers(-2**31, 2**31, (out, W), dtype=np.int64).astype(np.int32)   # every nibble value
    groups = -(-n // group) + 1                                                         # one extra column
    scale = (rng.random((out, groups), dtype=np.float32) * 0.02 + 1e-3).astype(ml_dtypes.bfloat16)
    want = int4_f64(packed, scale.astype(np.float32), n, group)
    for s in (scale, scale.view(np.uint16)):                   # ml_dtypes, or the kernels' bit view
        got = dequantize_int4(packed, s, n, group)
        assert got.dtype == np.float32 and got.shape == (out, n)
        np.testing.assert_array_equal(got, want)               # exact: a 4-bit integer times a bf16
    np.testing.assert_array_equal(dequantize_int4(packed.view(np.uint32), scale, n, group), want)
    q = want / scale.astype(np.float64)[:, np.arange(n) // group]                 # exact: the integers
    np.testing.assert_array_equal(unpack_int4(packed, n), q)
    nib = int4_nibbles(packed, n)
    assert nib.dtype == np.uint8 and nib.shape == (out, n) and nib.max() <= 15
    np.testing.assert_array_equal(nib.astype(np.int16) - 8, unpack_int4(packed, n))


def test_int4_of_no_rows():
    assert dequantize_int4(np.zeros((0, 4), np.int32), np.zeros((0, 1), ml_dtypes.bfloat16), 32, 32).shape == (0, 32)


def fp8_f64(codes, scale_inv, block, row0):
    b0, b1 = block
    w = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            w[r, c] *= float(scale_inv[(row0 + r) // b0, c // b1])
    return w


@pytest.mark.parametrize("out,n,block", [(7, 33, (4, 16)), (130, 300, (128, 128)), (9, 20, (3, 20))])
def test_dequantize_fp8_block_rows(out, n, block):
    codes = rng.integers(0, 256, (out, n)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 1                          # no NaN codes
    s = (rng.random((-(-out // block[0]), -(-n // block[1])), dtype=np.float32) + 0.5)
    for r0, r1 in ((0, out), (1, out - 2), (block[0] - 1, out), (2, 2)):
        want = fp8_f64(codes[r0:r1], s, block, r0)
        for w in (codes[r0:r1], codes[r0:r1].view(ml_dtypes.float8_e4m3fn)):
            got = dequantize_fp8_block(w, s, block, row0=r0)
            assert got.dtype == np.float32 and got.shape == (r1 - r0, n)
            np.testing.assert_array_equal(got, want.astype(np.float32))   # one rounding of code * scale
