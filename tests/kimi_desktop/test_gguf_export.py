"""export-gguf: the file's metadata, tensors and tokenizer, read back with gguf's own reader."""

from __future__ import annotations

import argparse
import json

import ml_dtypes
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from kimi_desktop.gguf_export import bytes_to_unicode, export_gguf, int4_to_q4_0, register  # noqa: E402
from kimi_desktop.offload.formats import QuantConfig, load_linear, pack_int4  # noqa: E402
from kimi_desktop.offload.safetensors import Checkpoint, CheckpointError  # noqa: E402
from kimi_desktop.runtime import load_config, load_tokenizer  # noqa: E402

T = gguf.GGMLQuantizationType
BF16 = np.dtype(ml_dtypes.bfloat16)


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor_map(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def as_array(t) -> np.ndarray:
    """A tensor's values in numpy order ([..., rows, cols]) as float32."""
    shape = tuple(int(s) for s in reversed(t.shape))
    if t.tensor_type == T.BF16:
        return np.asarray(t.data).view(np.uint16).view(BF16).reshape(shape).astype(np.float32)
    if t.tensor_type == T.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


@pytest.fixture(scope="module")
def int4_gguf(tiny_int4, tmp_path_factory):
    return export_gguf(tiny_int4, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reader(int4_gguf):
    return gguf.GGUFReader(int4_gguf)


def test_metadata(tiny_int4, reader):
    cfg = load_config(tiny_int4)
    f = fields(reader)
    a = "deepseek2."
    assert f["general.architecture"] == "deepseek2"
    want = {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": 192, "feed_forward_length": 256, "attention.head_count": 4,
        "attention.head_count_kv": 1, "attention.q_lora_rank": 96, "attention.kv_lora_rank": 64,
        "attention.key_length": 64 + 16, "attention.value_length": 64,
        "attention.key_length_mla": 32 + 16, "attention.value_length_mla": 48,
        "rope.dimension_count": 16, "leading_dense_block_count": 1, "expert_feed_forward_length": 64,
        "expert_count": 16, "expert_used_count": 4, "expert_shared_count": 1,
        "expert_group_count": 1, "expert_group_used_count": 1, "expert_weights_norm": True,
        "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID), "vocab_size": 2048,
        "rope.scaling.type": "yarn", "rope.scaling.original_context_length": 64,
    }
    for k, v in want.items():
        assert f[a + k] == v, k
    approx = {"rope.freq_base": 50000.0, "rope.scaling.factor": 32.0, "rope.scaling.yarn_beta_fast": 1.0,
              "rope.scaling.yarn_beta_slow": 1.0, "rope.scaling.yarn_log_multiplier": 0.1,
              "expert_weights_scale": 2.827, "attention.layer_norm_rms_epsilon": 1e-6}
    for k, v in approx.items():
        assert f[a + k] == pytest.approx(v, rel=1e-6), k
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_tensor_names_shapes_types(tiny_int4, reader):
    tm = tensor_map(reader)
    D, H, R, P, C, V, Q, I, E = 192, 4, 64, 16, 32, 48, 96, 64, 16
    want = {"token_embd.weight": ([D, 2048], T.BF16), "output_norm.weight": ([D], T.F32),
            "output.weight": ([D, 2048], T.BF16)}
    for i in range(3):
        b = f"blk.{i}."
        want.update({
            b + "attn_norm.weight": ([D], T.F32), b + "ffn_norm.weight": ([D], T.F32),
            b + "attn_q_a.weight": ([D, Q], T.BF16), b + "attn_q_a_norm.weight": ([Q], T.F32),
            b + "attn_q_b.weight": ([Q, H * (C + P)], T.BF16),
            b + "attn_kv_a_mqa.weight": ([D, R + P], T.BF16), b + "attn_kv_a_norm.weight": ([R], T.F32),
            b + "attn_k_b.weight": ([C, R, H], T.BF16), b + "attn_v_b.weight": ([R, V, H], T.BF16),
            b + "attn_output.weight": ([H * V, D], T.BF16),
        })
        if i == 0:
            want.update({b + "ffn_gate.weight": ([D, 256], T.BF16), b + "ffn_up.weight": ([D, 256], T.BF16),
                         b + "ffn_down.weight": ([256, D], T.BF16)})
        else:
            want.update({
                b + "ffn_gate_inp.weight": ([D, E], T.F32), b + "exp_probs_b.bias": ([E], T.F32),
                b + "ffn_gate_exps.weight": ([D, I, E], T.Q4_0), b + "ffn_up_exps.weight": ([D, I, E], T.Q4_0),
                b + "ffn_down_exps.weight": ([I, D, E], T.Q4_0),
                b + "ffn_gate_shexp.weight": ([D, I], T.BF16), b + "ffn_up_shexp.weight": ([D, I], T.BF16),
                b + "ffn_down_shexp.weight": ([I, D], T.BF16),
            })
    assert set(tm) == set(want)
    for name, (ne, qtype) in want.items():
        assert tm[name].shape.tolist() == ne, name
        assert tm[name].tensor_type == qtype, name


def test_q4_0_experts_equal_int4_bit_for_bit(tiny_int4, reader):
    cfg = load_config(tiny_int4)
    tm = tensor_map(reader)
    with Checkpoint(tiny_int4) as ck:
        qc = QuantConfig.from_config(cfg.raw, "config.json")
        for layer in (1, 2):
            for proj, shape in (("gate", (64, 192)), ("up", (64, 192)), ("down", (192, 64))):
                got = as_array(tm[f"blk.{layer}.ffn_{proj}_exps.weight"])          # [E, out, in]
                assert got.shape == (16,) + shape
                for e in range(16):
                    lin = load_linear(ck, f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj", qc, shape)
                    want = lin.dequantize()
                    assert np.array_equal(got[e].view(np.uint32), want.view(np.uint32)), (layer, proj, e)


def test_other_tensors_equal_checkpoint(tiny_int4, reader):
    tm = tensor_map(reader)
    with Checkpoint(tiny_int4) as ck:
        def w(name):
            return ck.get(name).astype(np.float32)
        assert np.array_equal(as_array(tm["token_embd.weight"]), w("model.embed_tokens.weight"))
        assert np.array_equal(as_array(tm["output.weight"]), w("lm_head.weight"))
        assert np.array_equal(as_array(tm["output_norm.weight"]), w("model.norm.weight"))
        for i in range(3):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            kv_b = w(p + "self_attn.kv_b_proj.weight").reshape(4, 32 + 48, 64)              # [H, C+V, R]
            assert np.array_equal(as_array(tm[b + "attn_k_b.weight"]), kv_b[:, :32].transpose(0, 2, 1))
            assert np.array_equal(as_array(tm[b + "attn_v_b.weight"]), kv_b[:, 32:])
            assert np.array_equal(as_array(tm[b + "attn_q_b.weight"]), w(p + "self_attn.q_b_proj.weight"))
            assert np.array_equal(as_array(tm[b + "attn_kv_a_norm.weight"]),
                                  w(p + "self_attn.kv_a_layernorm.weight"))
            if i:
                assert np.array_equal(as_array(tm[b + "ffn_gate_inp.weight"]), w(p + "mlp.gate.weight"))
                assert np.array_equal(as_array(tm[b + "exp_probs_b.bias"]),
                                      w(p + "mlp.gate.e_score_correction_bias"))
                assert np.array_equal(as_array(tm[b + "ffn_down_shexp.weight"]),
                                      w(p + "mlp.shared_experts.down_proj.weight"))


def test_tokenizer_metadata(tiny_int4, reader):
    f = fields(reader)
    tok = load_tokenizer(tiny_int4)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "kimi-k2"
    assert len(tokens) == len(types) == 2048
    enc = bytes_to_unicode()
    for b, rank in ((bytes([i]), tok.ranks[bytes([i])]) for i in range(256)):
        assert tokens[rank] == enc[b[0]]
    for name, i in tok.special_ids.items():
        assert tokens[i] == name and types[i] == int(gguf.TokenType.CONTROL)
    assert all(t == int(gguf.TokenType.NORMAL) for t in types[:tok.num_base])
    merges = f["tokenizer.ggml.merges"]
    assert len(merges) == tok.num_base - 256               # a valid BPE: every merged token is a merge
    left, right = merges[0].split(" ")
    assert left + right in tokens[:tok.num_base]
    assert f["tokenizer.ggml.bos_token_id"] == tok.special_ids["[BOS]"]
    assert f["tokenizer.ggml.eos_token_id"] == tok.special_ids["<|im_end|>"]
    assert f["tokenizer.ggml.padding_token_id"] == tok.special_ids["[PAD]"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tok.chat_template


def test_bf16_layout_keeps_bf16_experts(make_ckpt, tmp_path):
    folder = make_ckpt(layout="bf16", shards=1)
    out = export_gguf(folder, tmp_path / "bf16.gguf")
    tm = tensor_map(gguf.GGUFReader(out))
    t = tm["blk.2.ffn_down_exps.weight"]
    assert t.tensor_type == T.BF16 and t.shape.tolist() == [64, 192, 16]
    with Checkpoint(folder) as ck:
        want = np.stack([ck.get(f"model.layers.2.mlp.experts.{e}.down_proj.weight") for e in range(16)])
    assert np.array_equal(as_array(t), want.astype(np.float32))


def test_fp8_layout_exports_dequantized_bf16(make_ckpt, tmp_path):
    folder = make_ckpt(layout="fp8", shards=1)
    out = export_gguf(folder, tmp_path / "fp8.gguf")
    tm = tensor_map(gguf.GGUFReader(out))
    cfg = load_config(folder)
    with Checkpoint(folder) as ck:
        lin = load_linear(ck, "model.layers.1.self_attn.q_b_proj", QuantConfig.from_config(cfg.raw, "c"), (192, 96))
        want = lin.dequantize().astype(BF16).astype(np.float32)
    t = tm["blk.1.attn_q_b.weight"]
    assert t.tensor_type == T.BF16 and np.array_equal(as_array(t), want)


def test_requantized_q4_0_experts_and_f32_weights(make_ckpt, tmp_path):
    folder = make_ckpt(layout="bf16", shards=1)
    out = export_gguf(folder, tmp_path / "q.gguf", experts="q4_0", weights="f32")
    r = gguf.GGUFReader(out)
    tm = tensor_map(r)
    assert tm["blk.1.ffn_up_exps.weight"].tensor_type == T.Q4_0
    assert tm["blk.1.attn_k_b.weight"].tensor_type == T.F32
    assert tm["token_embd.weight"].tensor_type == T.F32
    with Checkpoint(folder) as ck:
        w = ck.get("model.layers.1.mlp.experts.3.up_proj.weight").astype(np.float32)
    got = as_array(tm["blk.1.ffn_up_exps.weight"])[3]
    assert np.abs(got - w).max() <= np.abs(w).max() / 7        # within one Q4_0 step


def test_streamed_pieces_do_not_change_the_file(tiny_int4, int4_gguf, tmp_path, monkeypatch):
    import kimi_desktop.gguf_export as ge

    monkeypatch.setattr(ge, "BLOCK_BYTES", 1000)                 # a few rows per piece
    seen = []
    out = export_gguf(tiny_int4, tmp_path / "small-pieces.gguf", progress=lambda d, t, n: seen.append((d, t)))
    assert out.read_bytes() == int4_gguf.read_bytes()
    assert len(seen) > 100 and seen[-1][0] == seen[-1][1]
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


def test_int4_to_q4_0_layout_and_bad_scales():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (3, 64)).astype(np.int8)
    scale = rng.uniform(0.01, 1, (3, 2)).astype(ml_dtypes.bfloat16)
    blocks = int4_to_q4_0(pack_int4(q), scale, 64).reshape(3, 2, 18)
    d = blocks[..., :2].copy().view("<f2")[..., 0]
    assert np.array_equal(d.astype(np.float32), scale.astype(np.float32))
    qs = blocks[..., 2:]
    u = (q + 8).astype(np.uint8).reshape(3, 2, 32)
    assert np.array_equal(qs & 0xF, u[..., :16]) and np.array_equal(qs >> 4, u[..., 16:])
    for bad in (1e-9, 1e6, 1.0078125 * 2.0 ** -20):      # underflow, overflow, fp16-subnormal rounding
        s = scale.copy()
        s[1, 1] = bad
        with pytest.raises(CheckpointError, match=r"weight_scale\[1, 1\].*fp16"):
            int4_to_q4_0(pack_int4(q), s, 64, where="x.safetensors: tensor 'e.weight_scale'")


def test_not_a_k2_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_failure_while_writing_leaves_no_partial_file(tiny_int4, tmp_path, monkeypatch):
    import kimi_desktop.gguf_export as ge

    def boom(*a, **k):
        raise CheckpointError("x.safetensors: tensor 'e.weight_scale': bad scale")
    monkeypatch.setattr(ge, "int4_to_q4_0", boom)
    with pytest.raises(CheckpointError, match="bad scale"):
        export_gguf(tiny_int4, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_cli_register(tiny_int4, tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="kimi-desktop")
    sub = ap.add_subparsers(dest="command")
    register(sub)
    out = tmp_path / "cli.gguf"
    args = ap.parse_args(["export-gguf", str(tiny_int4), str(out), "--quiet"])
    assert args.func(args) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "deepseek2"
