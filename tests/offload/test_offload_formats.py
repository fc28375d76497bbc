"""Weight formats: INT4 pack-quantized (against compressed-tensors), FP8 block, plain; loading."""
import math
import re
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from kimi_desktop.offload import formats
from kimi_desktop.offload.formats import (
    Fp8BlockLinear, Int4Linear, PlainLinear, QuantConfig, load_linear, pack_int4, quantize_fp8_block,
    quantize_int4, unpack_int4,
)
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError, write_safetensors

rng = np.random.default_rng(7)

K2_THINKING_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": 32, "dynamic": False, "observer": "minmax",
                            "actorder": None, "block_structure": None},
            },
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                   "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    },
}
FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}


def msg(*parts) -> str:
    return ".*".join(re.escape(str(p)) for p in parts)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def ct():
    """compressed-tensors' own packing and dequantization (the reference for the INT4 format)."""
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    class CT:
        pass
    c = CT()
    c.torch, c.pack, c.unpack, c.dequantize = torch, helpers.pack_to_int32, helpers.unpack_from_int32, dequantize
    c.args = lambda g: QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=g)
    c.scheme = lambda g: QuantizationScheme(targets=["Linear"], weights=c.args(g))
    c.compressor = PackedQuantizationCompressor
    c.bf16 = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return c


def dequant_int4_ref(packed, scale, shape, group) -> np.ndarray:
    """float64, written from the format description, element by element over nibbles."""
    out_f, in_f = shape
    p = packed.astype(np.int64) & 0xFFFFFFFF
    w = np.zeros((out_f, in_f))
    for c in range(in_f):
        u = (p[:, c // 8] >> (4 * (c % 8))) & 0xF
        w[:, c] = (u - 8) * scale[:, c // group].astype(np.float64)
    return w


def dequant_fp8_ref(q, s, block) -> np.ndarray:
    """float64, one block at a time."""
    b0, b1 = block
    w = q.astype(np.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= float(s[i, j])
    return w


# --------------------------------------------------------------------------- INT4 packing

@pytest.mark.parametrize("shape", [(7, 8), (7, 37), (5, 96), (3, 1), (16, 300)])
def test_int4_packing_matches_compressed_tensors(ct, shape):
    q = rng.integers(-8, 8, shape).astype(np.int8)
    theirs = ct.pack(ct.torch.from_numpy(q), 4).numpy()               # their packer pads at the end
    ours = pack_int4(q)
    assert ours.dtype == np.int32 and ours.shape == (shape[0], math.ceil(shape[1] / 8))
    assert np.array_equal(ours, theirs)                                # bit-exact, padding included
    assert np.array_equal(unpack_int4(theirs, shape[1]), q)            # their pack -> our unpack
    back = ct.unpack(ct.torch.from_numpy(ours), 4, shape).numpy()     # our pack -> their unpack
    assert np.array_equal(back, q)


def test_unpack_handles_sign_bit():
    q = np.full((2, 8), 7, dtype=np.int8)  # nibble 7 = 15: the int32 is negative
    packed = pack_int4(q)
    assert (packed < 0).all()
    assert np.array_equal(unpack_int4(packed, 8), q)


@pytest.mark.parametrize("shape, group", [((7, 96), 32), ((33, 64), 32), ((4, 36), 12)])
def test_int4_dequantize_matches_references(ct, shape, group):
    w = rng.standard_normal(shape).astype(np.float32)
    packed, scale = quantize_int4(w, group)
    lin = Int4Linear(packed, scale, shape, group)
    ours = lin.dequantize()
    assert ours.dtype == np.float32 and ours.shape == shape
    ref = dequant_int4_ref(packed, scale, shape, group)
    assert np.array_equal(ours, ref)                                   # q * bf16 scale is exact in f32
    assert np.array_equal(lin.dequantize(slice(2, 5)), ref[2:5])
    # compressed-tensors' unpack + dequantize, fp32 scale (exact)
    q = ct.unpack(ct.torch.from_numpy(packed), 4, shape)
    theirs = ct.dequantize(q, ct.bf16(scale).float(), args=ct.args(group)).numpy()
    assert np.array_equal(ours, theirs)
    # the whole decompressor, which returns the scale's dtype (bf16)
    sd = {"weight_packed": ct.torch.from_numpy(packed), "weight_scale": ct.bf16(scale),
          "weight_shape": ct.torch.tensor(shape)}
    dec = ct.compressor.decompress(sd, ct.scheme(group))["weight"]
    assert np.array_equal(dec.float().numpy(), ours.astype(ml_dtypes.bfloat16).astype(np.float32))
    # and their compressor, given our scale, packs what we pack
    comp = ct.compressor.compress({"weight": ct.torch.from_numpy(w), "weight_scale": ct.bf16(scale)},
                                  ct.scheme(group))
    assert np.array_equal(comp["weight_packed"].numpy(), packed)


def test_quantize_int4_properties():
    w = rng.standard_normal((6, 128)).astype(np.float32)
    w[2, 32:64] = 0  # an all-zero group
    packed, scale = quantize_int4(w, 32)
    assert packed.shape == (6, 16) and scale.shape == (6, 4) and scale.dtype == ml_dtypes.bfloat16
    q = unpack_int4(packed, 128)
    assert q.min() >= -7 and q.max() <= 7                              # K2's QAT grid: [-7, 7]
    assert (np.abs(q).reshape(6, 4, 32).max(-1) >= 6).sum() >= 23      # the range is used
    deq = Int4Linear(packed, scale, (6, 128)).dequantize()           # group inferred from scale
    assert np.all(np.isfinite(deq)) and not deq[2, 32:64].any()
    s = np.repeat(scale.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(deq - w) <= s * 0.5 + 1e-6)


# --------------------------------------------------------------------------- FP8

@pytest.mark.parametrize("shape, block", [((300, 200), (128, 128)), ((256, 128), (128, 128)),
                                          ((13, 11), (3, 5))])
def test_fp8_block_dequantize_and_matmul(shape, block):
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, (shape[0], 1))
    q, s = quantize_fp8_block(w, block)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == shape
    assert s.dtype == np.float32 and s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    assert np.all(np.isfinite(q.astype(np.float32)))
    lin = Fp8BlockLinear(q, s, block)
    ref = dequant_fp8_ref(q, s, block)
    assert rel_err(lin.dequantize(), ref) < 1e-6
    assert rel_err(lin.dequantize(slice(1, shape[0] - 2)), ref[1:-2]) < 1e-6
    assert rel_err(ref, w) < 0.07                                      # e4m3: 3 mantissa bits
    x = rng.standard_normal((5, shape[1])).astype(np.float32)
    assert rel_err(lin.matmul(x), x.astype(np.float64) @ ref.T) < 1e-5
    assert rel_err(lin.matmul(x[1]), x[1].astype(np.float64) @ ref.T) < 1e-5


# --------------------------------------------------------------------------- matmul, all formats

def make_linears(out_f, in_f, group):
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    packed, scale = quantize_int4(w, group)
    q, s = quantize_fp8_block(w, (4, 16))
    yield "bf16", PlainLinear(w.astype(ml_dtypes.bfloat16)), w.astype(ml_dtypes.bfloat16).astype(np.float64)
    yield "f32", PlainLinear(w), w.astype(np.float64)
    yield "int4", Int4Linear(packed, scale, (out_f, in_f), group), dequant_int4_ref(packed, scale, w.shape, group)
    yield "fp8", Fp8BlockLinear(q, s, (4, 16)), dequant_fp8_ref(q, s, (4, 16))


@pytest.mark.parametrize("temp_bytes", [formats.MAX_TEMP_BYTES, 1000])  # one block / many blocks
def test_matmul_all_formats(monkeypatch, temp_bytes):
    monkeypatch.setattr(formats, "MAX_TEMP_BYTES", temp_bytes)
    for out_f, in_f, group in [(37, 36, 12), (7, 96, 32), (1, 40, 8)]:
        for name, lin, ref in make_linears(out_f, in_f, group):
            assert lin.shape == (out_f, in_f)
            assert lin.dequantize(slice(1, 1)).shape == (0, in_f), name
            assert np.array_equal(lin.dequantize(), ref.astype(np.float32)) or name == "fp8", name
            for x in (rng.standard_normal(in_f).astype(np.float32),
                      rng.standard_normal((3, in_f)).astype(np.float32)):
                y = lin.matmul(x)
                assert y.dtype == np.float32 and y.shape == x.shape[:-1] + (out_f,), name
                assert rel_err(y, x.astype(np.float64) @ ref.T) < 1e-5, (name, out_f, in_f)
            with pytest.raises(ValueError):
                lin.matmul(np.zeros(in_f + 1, np.float32))


def test_nbytes_is_stored_bytes():
    packed, scale = quantize_int4(np.ones((8, 64), np.float32), 32)
    assert Int4Linear(packed, scale, (8, 64), 32).nbytes == 8 * 8 * 4 + 8 * 2 * 2
    q, s = quantize_fp8_block(np.ones((8, 64), np.float32), (128, 128))
    assert Fp8BlockLinear(q, s).nbytes == 8 * 64 + 4
    assert PlainLinear(np.ones((8, 64), ml_dtypes.bfloat16)).nbytes == 8 * 64 * 2


@pytest.mark.parametrize("fmt", ["int4", "fp8", "bf16"])
def test_matmul_makes_no_full_fp32_copy(fmt):
    n = 4096
    if fmt == "int4":  # random nibbles and scales: no need to quantize 16M values
        lin = Int4Linear(rng.integers(-2**31, 2**31, (n, n // 8), dtype=np.int64).astype(np.int32),
                         rng.uniform(0.5, 1, (n, n // 32)).astype(ml_dtypes.bfloat16), (n, n), 32)
    elif fmt == "fp8":
        lin = Fp8BlockLinear(rng.integers(0, 0x7F, (n, n), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
                             np.ones((n // 128, n // 128), np.float32))
    else:
        lin = PlainLinear(rng.integers(0, 0x3F00, (n, n), dtype=np.uint16).view(ml_dtypes.bfloat16))
    x = rng.standard_normal((2, n)).astype(np.float32)
    tracemalloc.start()
    try:
        y = lin.matmul(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert y.shape == (2, n)
    assert peak < n * n * 4 // 2, f"peak {peak / 2**20:.1f} MiB vs full fp32 {n * n * 4 / 2**20:.0f} MiB"
    rows = slice(1000, 1003)  # and the blocks add up to the right answer
    assert rel_err(y[:, rows], x.astype(np.float64) @ lin.dequantize(rows).T.astype(np.float64)) < 1e-5


# --------------------------------------------------------------------------- QuantConfig

def test_k2_thinking_quant_config():
    qc = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    assert qc.method == "compressed-tensors" and qc.group_size == 32
    for e in (0, 383):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert qc.kind(f"model.layers.1.mlp.experts.{e}.{proj}") == "int4"
    for plain in ("model.layers.1.self_attn.q_a_proj", "model.layers.60.self_attn.kv_b_proj",
                  "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.7.mlp.shared_experts.down_proj",
                  "lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        assert qc.kind(plain) == "plain", plain


def test_fp8_and_plain_quant_config():
    qc = QuantConfig.from_config(FP8_CONFIG, "config.json")
    assert qc.method == "fp8" and qc.block_size == (128, 128)
    assert qc.kind("model.layers.1.mlp.experts.0.up_proj") == "fp8" == qc.kind("lm_head")
    plain = QuantConfig.from_config({"hidden_size": 8}, "config.json")
    assert plain.method == "plain" and plain.kind("model.layers.1.mlp.experts.0.up_proj") == "plain"


@pytest.mark.parametrize("edit, field", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8), "group_0.weights.num_bits"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "weights.symmetric"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="channel"), "weights.strategy"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "weights.actorder"),
    (lambda q: q.update(format="float-quantized"), "quantization_config.format"),
    (lambda q: q.update(quant_method="awq"), "quantization_config.quant_method"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "input_activations"),
    (lambda q: q.update(ignore=["re:(("]), "bad regex"),
])
def test_unsupported_quant_config(edit, field):
    import copy
    config = copy.deepcopy(K2_THINKING_CONFIG)
    edit(config["quantization_config"])
    with pytest.raises(CheckpointError, match=msg("/ckpt/config.json", field)):
        QuantConfig.from_config(config, "/ckpt/config.json")


@pytest.mark.parametrize("bs", [None, [128], [128, 0], "128x128"])
def test_bad_fp8_block_size(bs):
    config = {"quantization_config": dict(FP8_CONFIG["quantization_config"], weight_block_size=bs)}
    with pytest.raises(CheckpointError, match=msg("config.json", "weight_block_size")):
        QuantConfig.from_config(config, "config.json")


# --------------------------------------------------------------------------- load_linear

EXPERT = "model.layers.1.mlp.experts.5.gate_proj"
ATTN = "model.layers.1.self_attn.q_a_proj"


def int4_tensors(prefix, shape, group=32, shape_dtype=np.int64):
    w = rng.standard_normal(shape).astype(np.float32)
    packed, scale = quantize_int4(w, group)
    return {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scale,
            f"{prefix}.weight_shape": np.array(shape, dtype=shape_dtype)}


def open_ckpt(folder, tensors) -> Checkpoint:
    write_safetensors(folder / "model.safetensors", tensors)
    return Checkpoint(folder)


def test_load_linear_every_format(tmp_path):
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    fp8 = QuantConfig.from_config(
        {"quantization_config": dict(FP8_CONFIG["quantization_config"], weight_block_size=[16, 32])},
        "config.json")
    w = rng.standard_normal((40, 64)).astype(np.float32)
    q, s = quantize_fp8_block(w, (16, 32))
    tensors = {**int4_tensors(EXPERT, (48, 64)),
               **int4_tensors("model.layers.1.mlp.experts.5.down_proj", (64, 48), 16, np.int32),
               f"{ATTN}.weight": w.astype(ml_dtypes.bfloat16),
               "model.layers.2.mlp.experts.0.up_proj.weight": q,
               "model.layers.2.mlp.experts.0.up_proj.weight_scale_inv": s}
    ckpt = open_ckpt(tmp_path, tensors)
    lin = load_linear(ckpt, EXPERT, k2, (48, 64))
    assert isinstance(lin, Int4Linear) and lin.group == 32
    assert np.array_equal(lin.packed, tensors[f"{EXPERT}.weight_packed"])
    assert not lin.packed.flags.owndata                                   # a view of the mapped file
    with pytest.raises(CheckpointError, match="divisible by group_size 32"):
        load_linear(ckpt, "model.layers.1.mlp.experts.5.down_proj", k2, (64, 48))
    k2_16 = QuantConfig(method="compressed-tensors", group_size=16, targets=("Linear",), ignore=k2.ignore)
    assert load_linear(ckpt, "model.layers.1.mlp.experts.5.down_proj", k2_16, (64, 48)).group == 16
    plain = load_linear(ckpt, ATTN, k2, (40, 64))
    assert isinstance(plain, PlainLinear) and plain.weight.dtype == ml_dtypes.bfloat16
    f8 = load_linear(ckpt, "model.layers.2.mlp.experts.0.up_proj", fp8, (40, 64))
    assert isinstance(f8, Fp8BlockLinear) and f8.block == (16, 32)
    assert rel_err(f8.dequantize(), dequant_fp8_ref(q, s, (16, 32))) < 1e-6
    assert isinstance(load_linear(ckpt, ATTN, fp8, (40, 64)), PlainLinear)  # bf16 in an fp8 checkpoint


def test_load_linear_missing_weight_scale(tmp_path):
    tensors = int4_tensors(EXPERT, (48, 64))
    del tensors[f"{EXPERT}.weight_scale"]
    ckpt = open_ckpt(tmp_path, tensors)
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=msg(f"'{EXPERT}.weight_scale'", "missing",
                                                  tmp_path / "model.safetensors")):
        load_linear(ckpt, EXPERT, k2, (48, 64))


def test_load_linear_wrong_group(tmp_path):
    ckpt = open_ckpt(tmp_path, int4_tensors(EXPERT, (48, 64), group=16))  # config says 32
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=msg(tmp_path / "model.safetensors", f"'{EXPERT}.weight_scale'",
                                                  "expected shape (48, 2)", "group_size 32", "found (48, 4)")):
        load_linear(ckpt, EXPERT, k2, (48, 64))


def test_load_linear_weight_shape_mismatch(tmp_path):
    tensors = int4_tensors(EXPERT, (48, 64))
    tensors[f"{EXPERT}.weight_shape"] = np.array([48, 63], np.int64)
    ckpt = open_ckpt(tmp_path, tensors)
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=msg(tmp_path / "model.safetensors", f"'{EXPERT}.weight_shape'",
                                                  "expected (48, 64)", "found (48, 63)")):
        load_linear(ckpt, EXPERT, k2, (48, 64))


def test_load_linear_wrong_packed_shape_or_dtype(tmp_path):
    ckpt = open_ckpt(tmp_path, int4_tensors(EXPERT, (48, 64)))
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=msg(tmp_path / "model.safetensors", f"'{EXPERT}.weight_packed'",
                                                  "expected shape (96, 8)", "found (48, 8)")):
        load_linear(ckpt, EXPERT, k2, (96, 64))  # config.json implies another shape
    with pytest.raises(CheckpointError, match=msg(f"'{EXPERT}.weight'", "missing", "weight_packed")):
        load_linear(ckpt, EXPERT, QuantConfig(), (48, 64))  # plain config, int4 tensors


def test_load_linear_fp8_without_scale_inv(tmp_path):
    q, _ = quantize_fp8_block(rng.standard_normal((40, 64)).astype(np.float32))
    ckpt = open_ckpt(tmp_path, {f"{ATTN}.weight": q})
    fp8 = QuantConfig.from_config(FP8_CONFIG, "config.json")
    with pytest.raises(CheckpointError, match=msg(tmp_path / "model.safetensors", f"'{ATTN}.weight'",
                                                  f"'{ATTN}.weight_scale_inv' is missing")):
        load_linear(ckpt, ATTN, fp8, (40, 64))
    with pytest.raises(CheckpointError, match=msg(f"'{ATTN}.weight'", "expected dtype BF16", "found F8_E4M3")):
        load_linear(ckpt, ATTN, QuantConfig(), (40, 64))  # fp8 weight, but config.json has no fp8


def test_load_linear_reads_only_weight_shape(tmp_path):
    ckpt = open_ckpt(tmp_path, int4_tensors(EXPERT, (48, 64)))
    k2 = QuantConfig.from_config(K2_THINKING_CONFIG, "config.json")
    views, reads = [], []
    real_get, real_read = ckpt.get, ckpt.read
    ckpt.get = lambda name: views.append(name) or real_get(name)
    ckpt.read = lambda name: reads.append(name) or real_read(name)
    load_linear(ckpt, EXPERT, k2, (48, 64))
    assert reads == [f"{EXPERT}.weight_shape"]  # the only one whose values are read (pread, not the mapping)
    assert sorted(views) == [f"{EXPERT}.weight_packed", f"{EXPERT}.weight_scale"]
