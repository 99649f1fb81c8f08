"""GGUF export (engine/io/gguf_write.py): what it writes is checked against independent readers
and writers: the `gguf` package's GGUFReader, llama.cpp's converter (the SmolLM2 file it wrote,
and its q / k permutation as tests/gguf_fixtures.py spells it), transformers' GGUF loader, and
NumPy for the rounding of each type."""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

import engine
import engine.cli
from engine.errors import CheckpointError, ConfigError, InputError
from engine.io.gguf import GGUFFile
from engine.io.gguf_write import GGUF_DTYPES, save_gguf, tokenizer_metadata
from engine.tokenizer import ByteTokenizer, TokenizerError

from gguf_fixtures import converter_rope_factors, llamacpp_permute

TEXTS = ["Hello world! 12345 def f(x):\n    return x ** 2\n\n", "  Ünïcödé 日本語 🎉 tabs\tand\r\n",
         "<|im_start|>user\nhi<|im_end|> <|endoftext|> 3.14159", "a" * 300 + " b  c   d"]


@pytest.fixture(scope="module")
def smol_tok(require_smollm2_session):
    return engine.load_tokenizer(require_smollm2_session)


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A byte-level BPE of 263 tokens with GPT-2's split and a user-defined token."""
    d = tmp_path_factory.mktemp("small_tok")
    (d / "tokenizer.json").write_text(_bpe_json(_BYTELEVEL, ["<tool>"]))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return engine.load_tokenizer(str(d))


def _tiny(vocab=49152, d_model=64, d_ff=96, n_head=4, n_kv_head=2, head_dim=None,
          family=engine.Config.llama, n_layer=2, **kw):
    cfg = family(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                              d_model=d_model, d_ff=d_ff, head_dim=head_dim, max_seq_len=128,
                              rope_theta=5000.0, **kw)
    m = engine.Model(cfg, seed=3)
    rng = np.random.default_rng(0)
    for a in m.params.values():   # norms away from 1, so a swapped or dropped one shows
        a += (0.3 if a.ndim == 1 else 0.02) * rng.standard_normal(a.shape).astype(np.float32)
    return m


def _transformers_logits(out, ids) -> tuple[np.ndarray, object]:
    """transformers' GGUF loader on the file `out` (a pathlib.Path): its logits of `ids`, and
    its model."""
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits.numpy(), hf


def _raw(path, name) -> tuple[str, np.ndarray]:
    """A tensor as the gguf package's reader gives it: (type name, array in numpy order)."""
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    return t.tensor_type.name, np.asarray(t.data)


def test_real_model_round_trip_and_tokenizer_as_llamacpp_wrote_it(tmp_path, smol_tok,
                                                                   require_smollm2_session):
    """SmolLM2 after a step on its last 2 blocks, saved F32: engine.load gives every weight bit
    for bit, and the tokenizer keys equal those llama.cpp's converter wrote in the source."""
    m = engine.load(require_smollm2_session)
    m.train_last(2)
    opt = engine.AdamW(m, lr=1e-3)
    ids = np.array([smol_tok.encode(TEXTS[0] + TEXTS[1])])
    m.forward(ids[:, :-1], ids[:, 1:])
    m.backward()
    opt.step()
    out = str(tmp_path / "tuned.gguf")
    m.save(out, tokenizer=smol_tok)
    back = engine.load(out)
    assert set(back.params) == set(m.params)
    for n, a in m.params.items():
        np.testing.assert_array_equal(back.params[n], a, err_msg=n)
    src, got = GGUFFile(require_smollm2_session).metadata, GGUFFile(out).metadata
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
              "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.vocab_size",
              "llama.context_length", "llama.embedding_length", "llama.block_count",
              "llama.feed_forward_length", "llama.attention.head_count",
              "llama.attention.head_count_kv", "llama.rope.freq_base",
              "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
              "general.architecture"):
        assert got[k] == src[k], k
    np.testing.assert_array_equal(got["tokenizer.ggml.token_type"], src["tokenizer.ggml.token_type"])
    assert "tokenizer.ggml.eot_token_id" not in got   # the source has none either
    tok = engine.load_tokenizer(out)
    for t in TEXTS:
        assert tok.encode(t) == smol_tok.encode(t)
    chat = [{"role": "user", "content": "Triage this claim."}]
    assert tok.chat_prompt(chat) == smol_tok.chat_prompt(chat)


def test_qk_rows_are_permuted_as_llamacpp_does(tmp_path, small_tok):
    """Read with the gguf package's own reader: q and k as llama.cpp's converter permutes them,
    everything else as the engine holds it, norms F32."""
    m = _tiny(vocab=300, n_head=4, n_kv_head=2)
    out = str(tmp_path / "m.gguf")
    save_gguf(m, out, small_tok)
    p = m.params
    for name, want in (("blk.1.attn_q.weight", llamacpp_permute(p["blocks.1.attn.q.weight"], 4, 4)),
                       ("blk.1.attn_k.weight", llamacpp_permute(p["blocks.1.attn.k.weight"], 4, 2)),
                       ("blk.1.attn_v.weight", p["blocks.1.attn.v.weight"]),
                       ("blk.0.ffn_down.weight", p["blocks.0.mlp.down.weight"]),
                       ("blk.0.attn_norm.weight", p["blocks.0.ln1.weight"]),
                       ("token_embd.weight", p["wte.weight"])):
        kind, a = _raw(out, name)
        assert kind == "F32"
        np.testing.assert_array_equal(a, want, err_msg=name)


@pytest.mark.parametrize("tied,head_dim", [(True, None), (False, 24)])
def test_transformers_loads_the_export(tmp_path, small_tok, tied, head_dim):
    """transformers' GGUF loader (its own dequantization, permutation and tokenizer conversion)
    gives the engine's logits and ids; tied and untied heads, heads wider than d_model / n_head.
    (SmolLM2's tokenizer is checked above against what llama.cpp wrote: transformers takes 40 s
    to convert it.)"""
    from transformers import AutoTokenizer
    tok = small_tok
    m = _tiny(vocab=300, tie_embeddings=tied, head_dim=head_dim, n_head=3, n_kv_head=1,
              d_model=48, d_ff=80)
    out = tmp_path / "m.gguf"
    m.save(str(out), tokenizer=tok)
    ids = tok.encode(TEXTS[0] + TEXTS[2])[:60]
    want, hf = _transformers_logits(out, ids)
    got = m.forward(np.array([ids]))
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    ht = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    for t in TEXTS:
        assert ht(t)["input_ids"] == tok.encode(t)


def test_mistral_is_written_as_llama(tmp_path, small_tok):
    """As llama.cpp's converter writes Mistral: a llama file, q / k permuted, no window (llama.cpp
    has none for llama), so its context length is the window, where the two agree. Read back,
    it is the same model as a llama one; transformers' GGUF loader gives the engine's logits."""
    m = _tiny(vocab=300, family=engine.Config.mistral, sliding_window=40)
    out = tmp_path / "m.gguf"
    m.save(str(out), tokenizer=small_tok)
    assert GGUFFile(str(out)).metadata["general.architecture"] == "llama"
    kind, a = _raw(str(out), "blk.1.attn_q.weight")
    np.testing.assert_array_equal(a, llamacpp_permute(m.params["blocks.1.attn.q.weight"], 4, 4))
    back = engine.load(str(out))
    assert (back.config.model_type, back.config.sliding_window) == ("llama", None)
    assert back.config.context_length == m.config.context_length == 40 < m.config.max_seq_len
    for n, p in m.params.items():
        np.testing.assert_array_equal(back.params[n], p, err_msg=n)
    ids = small_tok.encode(TEXTS[0] + TEXTS[2])[:40]
    want, hf = _transformers_logits(out, ids)
    np.testing.assert_allclose(m.forward(np.array([ids])), want, atol=2e-4 * np.abs(want).max(),
                               rtol=0)


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen2", False), ("qwen3", True)])
def test_qwen_round_trip_and_transformers(tmp_path, small_tok, family, tied):
    """llama.cpp's qwen2 and qwen3 layouts: q and k rows as they are (its rotary runs in the
    NeoX layout); qwen2's biases on q, k, v only, qwen3's per-head q / k norms, both F32;
    engine.load gives every weight back bit for bit, and transformers' GGUF loader gives the
    engine's logits."""
    # qwen3: heads 128 wide, as Qwen3's (transformers' GGUF loader reads no key_length for
    # qwen3 and takes its default, 128)
    m = _tiny(vocab=300, family=getattr(engine.Config, family), tie_embeddings=tied, n_head=3,
              n_kv_head=1, d_model=48, d_ff=80, head_dim=128 if family == "qwen3" else None)
    out = tmp_path / "m.gguf"
    m.save(str(out), tokenizer=small_tok)
    assert GGUFFile(str(out)).metadata["general.architecture"] == family
    p = m.params
    raw = {"blk.1.attn_q.weight": p["blocks.1.attn.q.weight"],
           "blk.1.attn_k.weight": p["blocks.1.attn.k.weight"]}
    if family == "qwen2":
        assert "blocks.1.attn.q.bias" in p and "blocks.1.attn.o.bias" not in p
        raw.update({"blk.1.attn_k.bias": p["blocks.1.attn.k.bias"],
                    "blk.0.attn_q.bias": p["blocks.0.attn.q.bias"]})
    else:
        raw.update({"blk.1.attn_q_norm.weight": p["blocks.1.attn.q_norm.weight"],
                    "blk.0.attn_k_norm.weight": p["blocks.0.attn.k_norm.weight"]})
    for name, want in raw.items():
        kind, a = _raw(str(out), name)
        assert kind == "F32"
        np.testing.assert_array_equal(a, want, err_msg=name)
    assert not any(t.name.endswith(("attn_output.bias", "ffn_up.bias"))
                   for t in gguf.GGUFReader(str(out)).tensors)
    back = engine.load(str(out))
    got, want = back.config.architecture(), m.config.architecture()
    assert got.pop("norm_eps") == pytest.approx(want.pop("norm_eps"), rel=1e-6)  # float32 in GGUF
    assert got == want
    for n, a in m.params.items():
        np.testing.assert_array_equal(back.params[n], a, err_msg=n)
    ids = small_tok.encode(TEXTS[0] + TEXTS[2])[:60]
    want, hf = _transformers_logits(out, ids)
    assert type(hf).__name__ == f"{family.capitalize()}ForCausalLM"
    got = m.forward(np.array([ids]))
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_llama3_rope_scaling_round_trip(tmp_path, small_tok):
    """Llama 3.1 / 3.2's rope scaling: written as llama.cpp's converter writes it (a
    rope_freqs.weight of per-frequency factors; with Llama 3's theta one of the heads'
    frequencies is in the smoothed band), read back as the same rope_scaling, and the GGUF's
    model gives the logits of transformers' LlamaForCausalLM with that rope_scaling.
    (transformers' GGUF loader has no place for rope_freqs: the model it builds from the
    safetensors is the oracle.) Other constants than Llama 3's are recovered from the factors."""
    import copy
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from conftest import HF_CONFIGS
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**copy.deepcopy(HF_CONFIGS["llama3"]), "vocab_size": 300,
                                         "rope_theta": 500000.0, "rope_scaling": dict(sc)})).eval()
    hf.save_pretrained(tmp_path / "hf")
    m = engine.load(str(tmp_path / "hf"))
    assert m.config.rope_scaling == sc
    out = str(tmp_path / "m.gguf")
    m.save(out, tokenizer=small_tok)
    kind, factors = _raw(out, "rope_freqs.weight")
    want = converter_rope_factors(m.config.head_dim, m.config.rope_theta, 8.0)
    assert kind == "F32" and ((want > 1) & (want < 8)).any() and (want == 1).any()
    np.testing.assert_allclose(factors, want, rtol=1e-6)
    back = engine.load(out)
    assert back.config.rope_scaling == sc
    ids = np.array([small_tok.encode(TEXTS[0] + TEXTS[1] + TEXTS[2])[:60]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(back.forward(ids), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    # other constants than Llama 3's: constants with the same factors are found
    from engine.layers import rope_frequencies
    m.config.rope_scaling = {**sc, "original_max_position_embeddings": 4096,
                             "high_freq_factor": 3.0}
    m._rope = None
    m.save(out, tokenizer=small_tok)
    back = engine.load(out)
    np.testing.assert_allclose(rope_frequencies(back.config), rope_frequencies(m.config),
                               rtol=2e-6)
    np.testing.assert_allclose(back.forward(ids), m.forward(ids), atol=1e-5 * np.abs(ref).max(),
                               rtol=0)


def test_smollm3_round_trip(tmp_path, small_tok):
    """llama.cpp's smollm3: q / k rows permuted as llama's, no rotary embedding in every 4th
    block (a rule of llama.cpp's, not a key of the file): read back as the same blocks and
    weights. A SmolLM3 leaving out other blocks cannot be written (llama.cpp would run it
    otherwise). (transformers' GGUF loader has no smollm3; llama.cpp is checked by hand.)"""
    m = _tiny(vocab=300, family=engine.Config.smollm3, n_layer=8, n_head=4, n_kv_head=2)
    assert m.config.no_rope_blocks == [3, 7]
    assert [b.rope for b in m.blocks] == [True, True, True, False] * 2
    out = str(tmp_path / "m.gguf")
    m.save(out, tokenizer=small_tok)
    assert GGUFFile(out).metadata["general.architecture"] == "smollm3"
    kind, a = _raw(out, "blk.3.attn_q.weight")
    np.testing.assert_array_equal(a, llamacpp_permute(m.params["blocks.3.attn.q.weight"], 4, 4))
    back = engine.load(out)
    assert (back.config.model_type, back.config.no_rope_blocks) == ("smollm3", [3, 7])
    for n, p in m.params.items():
        np.testing.assert_array_equal(back.params[n], p, err_msg=n)
    ids = np.array([small_tok.encode(TEXTS[0])[:40]])
    np.testing.assert_array_equal(back.forward(ids), m.forward(ids))
    three = _tiny(vocab=300, family=engine.Config.smollm3, n_layer=3)   # every block roped
    three.save(str(tmp_path / "3.gguf"), tokenizer=small_tok)
    assert engine.load(str(tmp_path / "3.gguf")).config.no_rope_blocks is None
    other = _tiny(vocab=300, family=engine.Config.smollm3, n_layer=8, no_rope_blocks=[1, 5])
    with pytest.raises(engine.ConfigError, match=r"no rotary embedding in blocks \[1, 5\]"):
        other.save(str(tmp_path / "o.gguf"), tokenizer=small_tok)


def test_a_model_no_family_can_save_is_refused_before_training(tmp_path, small_tok):
    """q/k/v biases without the output's, and MLP biases: llama.cpp runs such a llama file,
    no Hugging Face family holds it, and a run would end unable to save. The finetune command
    says so before training and leaves nothing."""
    m = _tiny(vocab=300, attn_bias=True, attn_out_bias=False, mlp_bias=True)
    m.save(str(tmp_path / "m.gguf"), tokenizer=small_tok)
    data = tmp_path / "d.txt"
    data.write_text("hello world, " * 400)
    out = tmp_path / "run"
    code = engine.cli.main(["finetune", "--model", str(tmp_path / "m.gguf"), "--data", str(data),
                            "--out", str(out), "--steps", "2", "--seq-len", "32"])
    assert code == 2 and not out.exists()


def test_review_refusals_and_bos(tmp_path, small_tok):
    """A qwen2 with heads other than d_model / n_head (llama.cpp's qwen2 reads no head width),
    a gpt2 without the output bias: refused before writing. A tokenizer with no bos of its own
    (Qwen2.5's) gets the model config's, as llama.cpp's converter takes it from config.json."""
    q = _tiny(vocab=300, family=engine.Config.qwen2, n_head=4, n_kv_head=2, d_model=64,
              head_dim=32)
    with pytest.raises(engine.ConfigError, match="llama.cpp's qwen2 has heads of d_model / n_head"):
        q.save(str(tmp_path / "q.gguf"), tokenizer=small_tok)
    g = engine.Model(engine.Config.gpt2(vocab_size=300, n_layer=1, n_head=2, d_model=64,
                                        attn_out_bias=False))
    with pytest.raises(engine.ConfigError, match="cannot write a gpt2 GGUF: it needs "
                                                 "attn_out_bias=True"):
        g.save(str(tmp_path / "g.gguf"), tokenizer=small_tok)
    assert not list(tmp_path.iterdir())
    assert small_tok.bos_id is None
    m = _tiny(vocab=300, bos_token_id=7)
    m.save(str(tmp_path / "b.gguf"), tokenizer=small_tok)
    assert GGUFFile(str(tmp_path / "b.gguf")).metadata["tokenizer.ggml.bos_token_id"] == 7
    assert engine.load(str(tmp_path / "b.gguf")).config.bos_token_id == 7


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_round_trip_and_transformers(tmp_path, small_tok, tied):
    """llama.cpp's GPT-2 layout: q, k, v rows in one attn_qkv (as the gguf package reads it),
    position table, biases; engine.load gives every weight back and transformers' GGUF loader
    the engine's logits (its GPT-2 import sizes the position table at 1024 whatever the file
    says, hence 1024 here)."""
    cfg = engine.Config.gpt2(vocab_size=300, n_layer=2, n_head=4, d_model=64, max_seq_len=1024,
                             tie_embeddings=tied)
    m = engine.Model(cfg, seed=2)
    rng = np.random.default_rng(0)
    for a in m.params.values():
        a += (0.3 if a.ndim == 1 else 0.05) * rng.standard_normal(a.shape).astype(np.float32)
    out = tmp_path / "g.gguf"
    m.save(str(out), tokenizer=small_tok)
    p = m.params
    for name, want in (("blk.1.attn_qkv.weight", np.concatenate(
                            [p[f"blocks.1.attn.{x}.weight"] for x in "qkv"])),
                       ("blk.1.attn_qkv.bias", np.concatenate(
                            [p[f"blocks.1.attn.{x}.bias"] for x in "qkv"])),
                       ("position_embd.weight", p["wpe.weight"]),
                       ("output_norm.bias", p["ln_f.bias"])):
        np.testing.assert_array_equal(_raw(str(out), name)[1], want, err_msg=name)
    back = engine.load(str(out))
    got, want_cfg = back.config.architecture(), m.config.architecture()
    assert got.pop("norm_eps") == pytest.approx(want_cfg.pop("norm_eps"))   # GGUF keeps float32
    assert got == want_cfg
    for n, a in p.items():
        np.testing.assert_array_equal(back.params[n], a, err_msg=n)
    ids = small_tok.encode(TEXTS[0] + TEXTS[1])[:50]
    want, hf = _transformers_logits(out, ids)
    np.testing.assert_allclose(m.forward(np.array([ids])), want, atol=2e-5 * np.abs(want).max(),
                               rtol=0)


def _gpt2_file(path, drop=(), **meta):
    """A one-block GPT-2 GGUF written with the gguf package directly (not by save_gguf)."""
    from gguf_fixtures import write_gguf
    C, V, T = 8, 16, 12
    r = np.random.default_rng(0).standard_normal
    tensors = {"token_embd.weight": r((V, C)), "position_embd.weight": r((T, C)),
               "output_norm.weight": r(C), "output_norm.bias": r(C)}
    for g, rows in (("attn_norm", C), ("attn_qkv", 3 * C), ("attn_output", C), ("ffn_norm", C),
                    ("ffn_up", 4 * C), ("ffn_down", C)):
        cols = () if "norm" in g else (4 * C,) if g == "ffn_down" else (C,)
        tensors[f"blk.0.{g}.weight"], tensors[f"blk.0.{g}.bias"] = r((rows, *cols)), r(rows)
    for k in drop:
        del tensors[k]
    md = {"gpt2.block_count": 1, "gpt2.context_length": T, "gpt2.embedding_length": C,
          "gpt2.feed_forward_length": 4 * C, "gpt2.attention.head_count": 2,
          "gpt2.attention.layer_norm_epsilon": 1e-5, **meta}
    return write_gguf(path, "gpt2", md, {k: v.astype(np.float32) for k, v in tensors.items()})


def test_gpt2_files_from_elsewhere(tmp_path):
    from engine.io.gguf import load_gguf
    cfg, params = load_gguf(_gpt2_file(tmp_path / "ok.gguf"))
    assert (cfg.model_type, cfg.n_head, cfg.d_ff, cfg.max_seq_len, cfg.tie_embeddings) == (
        "gpt2", 2, 32, 12, True)
    assert params["blocks.0.attn.v.bias"].shape == (8,)
    with pytest.raises(CheckpointError, match="missing tensor 'blk.0.attn_qkv.bias' \\(needed "
                       "for blocks.0.attn.q.bias \\+ blocks.0.attn.k.bias \\+ blocks.0.attn.v.bias"):
        load_gguf(_gpt2_file(tmp_path / "a.gguf", drop=["blk.0.attn_qkv.bias"]))
    with pytest.raises(ConfigError, match="grouped-query attention in a gpt2 GGUF"):
        load_gguf(_gpt2_file(tmp_path / "b.gguf", **{"gpt2.attention.head_count_kv": 1}))


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32, rounding to nearest even, from the bits."""
    b = a.view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
    return b.astype(np.uint32).view(np.float32)


# (block size, the largest rounding error in a block as a share of its largest magnitude; for
# the types with a minimum, of its range), from ggml-quants.c's quantize_row_*_ref: half a
# step, but a full one for Q5_0 and Q4_0, whose levels run -16..15 (-8..7) with the largest
# magnitude at the end of 16 (8) steps: a value as large on the other side is clipped a step.
_BLOCKS = {"Q8_0": (32, 1 / 127 / 2), "Q5_0": (32, 1 / 16), "Q4_0": (32, 1 / 8),
           "Q5_1": (32, 1 / 31 / 2), "Q4_1": (32, 1 / 15 / 2)}


@pytest.mark.parametrize("dtype", list(GGUF_DTYPES))
def test_each_type_rounds_as_it_should(tmp_path, smol_tok, dtype):
    """Read back by engine.load: F32 exact, F16 and BF16 as NumPy rounds, block types within
    each block's quantization step. A matrix whose rows do not split into 32-element blocks
    (ffn_down's 80) is written F16 instead; norms F32."""
    m = _tiny(d_ff=80)
    out = str(tmp_path / "m.gguf")
    save_gguf(m, out, smol_tok, dtype=dtype.lower())
    f = GGUFFile(out)
    assert f.metadata["general.file_type"] == GGUF_DTYPES[dtype]
    assert f.tensor_info("blk.0.ffn_norm.weight").type_name == "F32"
    assert f.tensor_info("blk.0.attn_q.weight").type_name == dtype
    assert f.tensor_info("blk.0.ffn_down.weight").type_name == ("F32" if dtype == "F32" else
                                                                "BF16" if dtype == "BF16" else "F16")
    back = engine.load(out)
    for n, a in m.params.items():
        got = back.params[n]
        kind = f.tensor_info(_gguf_name(n)).type_name
        if kind == "F32":
            np.testing.assert_array_equal(got, a, err_msg=n)
        elif kind == "F16":
            np.testing.assert_array_equal(got, a.astype(np.float16).astype(np.float32), err_msg=n)
        elif kind == "BF16":
            np.testing.assert_array_equal(got, _bf16(a), err_msg=n)
        else:
            size, share = _BLOCKS[kind]
            blocks, err = a.reshape(-1, size), np.abs(got - a).reshape(-1, size)
            span = (blocks.max(1) - blocks.min(1) if kind.endswith("_1")
                    else np.abs(blocks).max(1))
            # half a step, plus what storing the scale (and minimum) as float16 moves: 2^-11 of
            # the most levels times the step (the span), and of the minimum (at most `big`)
            big = np.abs(blocks).max(1)
            assert (err.max(1) <= span * share + (span + big) * 2.0**-11 + 1e-7).all(), n
            assert err.max() > 0, n   # quantized, not passed through


def _gguf_name(n: str) -> str:
    if n.startswith("blocks."):
        _, i, rest = n.split(".", 2)
        return _GGUF_OF[rest].format(i=i)
    return _GGUF_OF[n]


_GGUF_OF = {"wte.weight": "token_embd.weight", "ln_f.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "ln1.weight": "blk.{i}.attn_norm.weight",
            "ln2.weight": "blk.{i}.ffn_norm.weight", "attn.q.weight": "blk.{i}.attn_q.weight",
            "attn.k.weight": "blk.{i}.attn_k.weight", "attn.v.weight": "blk.{i}.attn_v.weight",
            "attn.o.weight": "blk.{i}.attn_output.weight", "mlp.gate.weight": "blk.{i}.ffn_gate.weight",
            "mlp.up.weight": "blk.{i}.ffn_up.weight", "mlp.down.weight": "blk.{i}.ffn_down.weight"}


# ---- tokenizers from other sources ----------------------------------------------------------

def _export_tokenizer(tmp_path, tok, vocab):
    m = _tiny(vocab=vocab, d_model=32, d_ff=64)
    out = str(tmp_path / "t.gguf")
    save_gguf(m, out, tok)
    return out


def test_tokenizer_json_source_gets_its_llamacpp_name(tmp_path, smol_tok):
    """SmolLM2's tokenizer saved as tokenizer.json (as a finetune run keeps it) and read back
    has no GGUF name any more: the split is recognised as llama.cpp's 'smollm' again."""
    smol_tok.save(tmp_path / "tok")
    tok = engine.load_tokenizer(str(tmp_path / "tok"))
    assert tok.gguf_pre is None
    out = _export_tokenizer(tmp_path, tok, 49152)
    assert GGUFFile(out).metadata["tokenizer.ggml.pre"] == "smollm"
    back = engine.load_tokenizer(out)
    for t in TEXTS:
        assert back.encode(t) == smol_tok.encode(t)


def _bpe_json(pre: dict, extra_added=(), ignore_merges=False, special_added=()) -> str:
    """A small byte-level BPE tokenizer.json: the 256 byte symbols, a few merges, <|endoftext|>."""
    from engine.tokenizer import _byte_to_unicode
    b2u = _byte_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("1", "2")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    for t, special in [(t, False) for t in extra_added] + [(t, True) for t in special_added]:
        added.append({"id": len(vocab) + len(added), "content": t, "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": False, "special": special})
    return json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                       "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
                       "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                   "trim_offsets": True, "use_regex": True},
                       "model": {"type": "BPE", "dropout": None, "unk_token": None,
                                 "continuing_subword_prefix": None, "end_of_word_suffix": None,
                                 "fuse_unk": False, "byte_fallback": False,
                                 "ignore_merges": ignore_merges,
                                 "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}})


_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
              "use_regex": True}
_LLAMA3 = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
                                  "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _tok_dir(tmp_path, body: str, config=None):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(body, encoding="utf-8")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>"} if config is None else config))
    return engine.load_tokenizer(str(tmp_path / "tok"))


# The pre-tokenizer names llama.cpp's llama-vocab.cpp accepts (of the llama.cpp that
# llama-cpp-python 0.3.36 vendors; the ones whose split and merge rule tailtune knows). It
# refuses to load a file with any name it does not list.
LLAMACPP_PRE_NAMES = {"gpt-2", "phi-2", "smollm", "starcoder", "llama3", "llama-v3", "llama-bpe",
                      "falcon3", "qwen2", "deepseek-r1-qwen", "mpt", "olmo", "refact",
                      "command-r", "codeshell", "exaone", "minerva-7b", "dbrx", "smaug-bpe"}


def test_written_names_are_llamacpps():
    from engine.io.gguf_write import _PRE_CANDIDATES
    from engine.tokenizer import _PRE_SPLITS
    assert set(_PRE_CANDIDATES) <= LLAMACPP_PRE_NAMES
    assert LLAMACPP_PRE_NAMES <= set(_PRE_SPLITS)   # and read back


@pytest.mark.parametrize("pre,name,ignore", [(_BYTELEVEL, "gpt-2", False),
                                             (_LLAMA3, "llama-bpe", True)])
def test_known_splits_are_named_and_user_tokens_kept(tmp_path, pre, name, ignore):
    """GPT-2's split and Llama 3's (written the way their tokenizer.json files spell them, with
    the merge rule each has), and a user-defined added token (llama.cpp type 4, matched whole
    but not special)."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(_bpe_json(pre, ["<tool>"], ignore_merges=ignore))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = engine.load_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 263
    out = _export_tokenizer(tmp_path, tok, 300)
    meta = GGUFFile(out).metadata
    assert meta["tokenizer.ggml.pre"] == name
    types = meta["tokenizer.ggml.token_type"]
    n = tok.vocab_size
    assert list(types[n - 2:n]) == [3, 4] and (types[:n - 2] == 1).all() and (types[n:] == 5).all()
    assert meta["tokenizer.ggml.tokens"][n:n + 2] == [f"[PAD{n}]", f"[PAD{n + 1}]"]
    assert meta["tokenizer.ggml.eos_token_id"] == n - 2
    back = engine.load_tokenizer(out)
    for t in ["hello world 12345", "say <tool> then <|endoftext|>", TEXTS[1]]:
        assert back.encode(t) == tok.encode(t)
        assert back.decode(back.encode(t)) == t


@pytest.mark.parametrize("pre,ignore", [(_BYTELEVEL, True), (_LLAMA3, False)])
def test_a_merge_rule_llamacpp_would_not_follow_is_refused(tmp_path, pre, ignore):
    """llama.cpp decides ignore_merges by the pre-tokenizer's name: a split with the other rule
    has no name that says it ("hello" would be one token in one and two in the other)."""
    tok = _tok_dir(tmp_path, _bpe_json(pre, ignore_merges=ignore))
    with pytest.raises(TokenizerError, match=f"ignore_merges {str(ignore).lower()}"):
        _export_tokenizer(tmp_path, tok, 300)


def test_added_tokens_outside_the_byte_alphabet_survive(tmp_path):
    """DeepSeek-style specials and a token with a space are matched whole by llama.cpp; read
    back and exported again they stay the same strings and types."""
    tok = _tok_dir(tmp_path, _bpe_json(_BYTELEVEL, ["<tool call>"], special_added=["<｜User｜>"]))
    first = _export_tokenizer(tmp_path, tok, 300)
    back = engine.load_tokenizer(first)
    text = "hello <｜User｜> world <tool call> hello"
    assert back.encode(text) == tok.encode(text)
    assert tok.encode("<｜User｜>") == [tok.vocab_size - 1]
    m = _tiny(vocab=300, d_model=32, d_ff=64)
    save_gguf(m, tmp_path / "again.gguf", back)
    a, b = GGUFFile(first).metadata, GGUFFile(str(tmp_path / "again.gguf")).metadata
    assert a["tokenizer.ggml.tokens"] == b["tokenizer.ggml.tokens"]
    np.testing.assert_array_equal(a["tokenizer.ggml.token_type"], b["tokenizer.ggml.token_type"])
    assert a["tokenizer.ggml.tokens"][tok.vocab_size - 2:tok.vocab_size] == ["<tool call>", "<｜User｜>"]
    assert list(a["tokenizer.ggml.token_type"][tok.vocab_size - 2:tok.vocab_size]) == [4, 3]
    assert (a["tokenizer.ggml.token_type"][tok.vocab_size:] == 5).all()   # padding rows stay unused


@pytest.mark.parametrize("templates", [{"default": "D {{ messages }}", "tool_use": "T"},
                                       {"rag": "R", "tool-use": "T"}])
def test_named_chat_templates_round_trip(tmp_path, small_tok, templates):
    tok = engine.load_tokenizer(small_tok.source)
    tok.chat_template = templates
    out = _export_tokenizer(tmp_path, tok, 300)
    assert engine.load_tokenizer(out).chat_template == templates


def test_end_of_text_falls_back_as_llamacpps_converter_does(tmp_path):
    """Without an eos token in the tokenizer, the model config's eos id (llama.cpp's converter
    reads config.json too); with neither, refused: the file cannot say "none", and llama.cpp's
    byte-level vocabulary then takes id 11 as end of text."""
    body = json.loads(_bpe_json(_BYTELEVEL))
    body["added_tokens"][0]["content"] = "<|stop|>"   # special, but no end token by name
    tok = _tok_dir(tmp_path, json.dumps(body), config={})
    assert tok.eos_ids == ()
    with pytest.raises(TokenizerError, match="names an end-of-text token.*id 11.*"
                       "tokenizer_config.json"):
        _export_tokenizer(tmp_path, tok, 300)
    m = _tiny(vocab=300, d_model=32, d_ff=64, eos_token_id=tok.vocab_size - 1)
    save_gguf(m, tmp_path / "m.gguf", tok)
    meta = GGUFFile(str(tmp_path / "m.gguf")).metadata
    assert meta["tokenizer.ggml.eos_token_id"] == tok.vocab_size - 1
    assert engine.load_tokenizer(str(tmp_path / "m.gguf")).eos_id == tok.vocab_size - 1


@pytest.mark.parametrize("attr,match", [("lstrip", "'<\\|end\\|>' strips spaces before"),
                                        ("rstrip", "'<\\|end\\|>'\\) take the whitespace after")])
def test_tokens_that_strip_spaces_are_refused(tmp_path, attr, match):
    """(Stripping after a token is written only as llama.cpp's Phi-3 rule:
    test_tokenizer_spm.py.)"""
    body = json.loads(_bpe_json(_BYTELEVEL, special_added=["<|end|>"]))
    body["added_tokens"][-1][attr] = True
    tok = _tok_dir(tmp_path, json.dumps(body))
    with pytest.raises(TokenizerError, match=match):
        _export_tokenizer(tmp_path, tok, 300)


def test_unknown_split_is_refused_and_nothing_written(tmp_path):
    tok = _tok_dir(tmp_path, _bpe_json(
        {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, _BYTELEVEL]}))
    with pytest.raises(TokenizerError, match="pre-tokenizer .*WhitespaceSplit.* not one of"):
        _export_tokenizer(tmp_path, tok, 300)
    assert os.listdir(tmp_path) == ["tok"]


def test_byte_tokenizer_is_refused_with_the_way_out(tmp_path):
    """No merges, no GGUF vocabulary (llama.cpp requires the key, the writer refuses it empty)."""
    with pytest.raises(TokenizerError, match="needs BPE merges.*Hugging Face layout"):
        _export_tokenizer(tmp_path, ByteTokenizer(), 260)
    assert os.listdir(tmp_path) == []


def test_added_bos_is_said_and_other_additions_refused(smol_tok):
    from tokenizers.processors import TemplateProcessing
    tok = engine.load_tokenizer(smol_tok.source)
    tok.backend.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="$A $B",
                                                    special_tokens=[("<|im_start|>", 1)])
    meta = tokenizer_metadata(tok, 49152)
    assert meta["add_bos"] is True and meta["add_eos"] is False
    tok.backend.post_processor = TemplateProcessing(single="$A <|im_end|>", pair="$A $B",
                                                    special_tokens=[("<|im_end|>", 2)])
    meta = tokenizer_metadata(tok, 49152)
    assert meta["add_bos"] is False and meta["add_eos"] is True
    tok.backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="$A $B",
                                                    special_tokens=[("<|endoftext|>", 0)])
    with pytest.raises(TokenizerError, match="only say 'add BOS' and 'add EOS'"):
        tokenizer_metadata(tok, 49152)


# ---- bad input: a clear error, and no file (an existing one whole) -------------------------

def test_bad_input(tmp_path, smol_tok):
    m = _tiny(d_model=32, d_ff=64)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="Q4_K.*llama-quantize"):
        save_gguf(m, out, smol_tok, dtype="Q4_K")
    with pytest.raises(InputError, match="carries its tokenizer"):
        m.save(str(out))
    with pytest.raises(InputError, match="is a directory"):
        save_gguf(m, tmp_path, smol_tok)
    with pytest.raises(TokenizerError, match="49152 tokens, the model only 1000"):
        save_gguf(_tiny(vocab=1000, d_model=32, d_ff=64), out, smol_tok)
    gqa = engine.Model(engine.Config.gpt2(vocab_size=49152, n_layer=1, n_head=2, n_kv_head=1,
                                          d_model=16))
    with pytest.raises(ConfigError, match="gpt2 GGUF.*without grouped-query attention"):
        save_gguf(gqa, out, smol_tok)
    odd = engine.Model(engine.Config.llama(vocab_size=49152, n_layer=1, n_head=2, n_kv_head=1,
                                           d_model=16, d_ff=32, norm="layernorm"))
    with pytest.raises(ConfigError, match="llama GGUF: it needs norm='rmsnorm'"):
        save_gguf(odd, out, smol_tok)
    m.params["blocks.1.mlp.up.weight"][3, 4] = np.nan
    with pytest.raises(InputError, match="NaN.*nothing was saved"):
        save_gguf(m, out, smol_tok)
    with pytest.raises(CheckpointError, match="cannot write"):
        save_gguf(_tiny(d_model=32, d_ff=64), tmp_path / "no" / "such" / "m.gguf", smol_tok)
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_values_beyond_float16_are_refused_for_float16_types(tmp_path, small_tok):
    m = _tiny(vocab=300, d_model=32, d_ff=64)
    m.params["blocks.0.mlp.up.weight"][0, 0] = 1e5
    for dtype in ("F16", "Q8_0"):
        with pytest.raises(InputError, match="blocks.0.mlp.up.weight holds values up to 1e\\+05"):
            save_gguf(m, tmp_path / "m.gguf", small_tok, dtype=dtype)
    assert os.listdir(tmp_path) == []
    save_gguf(m, tmp_path / "m.gguf", small_tok, dtype="BF16")   # bfloat16 has float32's range
    assert engine.load(str(tmp_path / "m.gguf")).params["blocks.0.mlp.up.weight"][0, 0] == 99840.0


@pytest.mark.parametrize("tied", [True, False])
def test_four_bit_types_keep_the_output_projection_at_eight(tmp_path, small_tok, tied):
    m = _tiny(vocab=320, d_model=64, d_ff=96, tie_embeddings=tied)
    save_gguf(m, tmp_path / "m.gguf", small_tok, dtype="Q4_0")
    f = GGUFFile(str(tmp_path / "m.gguf"))
    assert f.tensor_info("token_embd.weight").type_name == ("Q8_0" if tied else "Q4_0")
    if not tied:
        assert f.tensor_info("output.weight").type_name == "Q8_0"
    assert f.tensor_info("blk.1.ffn_up.weight").type_name == "Q4_0"


def test_gpt2_position_table_stays_f32(tmp_path, small_tok):
    """As llama.cpp's converter and llama-quantize keep it, whatever the type."""
    m = engine.Model(engine.Config.gpt2(vocab_size=300, n_layer=1, n_head=2, d_model=64,
                                        max_seq_len=64))
    save_gguf(m, tmp_path / "g.gguf", small_tok, dtype="Q4_0")
    f = GGUFFile(str(tmp_path / "g.gguf"))
    assert f.tensor_info("position_embd.weight").type_name == "F32"
    assert f.tensor_info("blk.0.attn_qkv.weight").type_name == "Q4_0"


def test_paths_long_names_and_links(tmp_path, small_tok):
    m = _tiny(vocab=300, d_model=32, d_ff=64)
    long = tmp_path / ("x" * 245 + ".gguf")   # a legal name: no room for a suffix on it
    save_gguf(m, long, small_tok)
    assert engine.load(str(long)).config.n_layer == 2
    (tmp_path / "real.gguf").write_bytes(b"old")
    os.symlink(tmp_path / "real.gguf", tmp_path / "link.gguf")
    m.save(str(tmp_path / "link.gguf"), tokenizer=small_tok)
    assert os.path.islink(tmp_path / "link.gguf")
    assert engine.load(str(tmp_path / "real.gguf")).config.n_layer == 2
    assert sorted(os.listdir(tmp_path)) == sorted([long.name, "real.gguf", "link.gguf"])


def test_failure_while_writing_leaves_the_old_file(tmp_path, smol_tok, monkeypatch):
    from engine.io import gguf_write
    out = tmp_path / "m.gguf"
    save_gguf(_tiny(d_model=32, d_ff=64), out, smol_tok)
    before = out.read_bytes()
    real, calls = gguf_write._converted, []

    def failing(*a):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*a)
    monkeypatch.setattr(gguf_write, "_converted", failing)
    with pytest.raises(CheckpointError, match="m.gguf: cannot write: No space left"):
        save_gguf(_tiny(d_model=32, d_ff=64), out, smol_tok)
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]


def test_save_to_a_directory_with_the_tokenizer(tmp_path, smol_tok):
    m = _tiny(d_model=32, d_ff=64)
    m.save(str(tmp_path / "d"), tokenizer=smol_tok)
    assert engine.load_tokenizer(str(tmp_path / "d")).encode(TEXTS[0]) == smol_tok.encode(TEXTS[0])
    assert engine.load(str(tmp_path / "d")).config.vocab_size == 49152


def test_cli_export(tmp_path, smol_tok):
    m = _tiny(d_model=32, d_ff=64)
    m.save(str(tmp_path / "run"), tokenizer=smol_tok)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "engine.cli", "export", *args],
                              capture_output=True, text=True, timeout=300)
    r = run("--model", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "Q8_0" in r.stdout and "49152 tokens" in r.stdout
    assert GGUFFile(str(tmp_path / "m.gguf")).tensor_info("blk.0.attn_q.weight").type_name == "Q8_0"
    r = run("--model", str(tmp_path / "run"), "--out", str(tmp_path / "x.bin"))
    assert r.returncode == 2 and "name the file *.gguf" in r.stderr
    r = run("--model", str(tmp_path / "run"), "--out", str(tmp_path / "x.gguf"), "--dtype", "q6_k")
    assert r.returncode == 2 and "error: GGUF dtype 'q6_k' is not supported" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x.gguf").exists()
    m.save(str(tmp_path / "bare"))   # no tokenizer files
    r = run("--model", str(tmp_path / "bare"), "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_run_in_llamacpp_example(tmp_path, capsys, require_smollm2_session):
    """The example exports and answers; without llama-cpp-python it prints llama.cpp's command."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import run_in_llamacpp
    finally:
        sys.path.pop(0)
    out = tmp_path / "smol.gguf"
    rc = run_in_llamacpp.main(["--model", require_smollm2_session, "--out", str(out),
                               "--max-new-tokens", "6"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists() and "tailtune:  '" in text
    assert ("llama-cli -m " + str(out)) in text or "same greedy tokens" in text


@pytest.mark.parametrize("window", [None, 40])
def test_phi3_round_trip_and_transformers(tmp_path, small_tok, window):
    """As llama.cpp's converter writes Phi-3: q, k, v in one attn_qkv and gate, up in one
    ffn_up (rows in that order), no permutation (llama.cpp runs its rotary in the NeoX layout),
    the window in phi3.attention.sliding_window (0: none). Read back bit for bit with the
    window; transformers' GGUF loader gives the engine's logits."""
    # (Phi-3's vocabulary size: transformers' Phi3Config pads with id 32000, its default)
    m = _tiny(vocab=32064, family=engine.Config.phi3, n_head=4, n_kv_head=2,
              sliding_window=window)
    out = tmp_path / "m.gguf"
    m.save(str(out), tokenizer=small_tok)
    meta = GGUFFile(str(out)).metadata
    assert meta["general.architecture"] == "phi3"
    assert (meta["phi3.attention.sliding_window"], meta["phi3.context_length"]) == (window or 0, 128)
    p = m.params
    kind, a = _raw(str(out), "blk.1.attn_qkv.weight")
    np.testing.assert_array_equal(a, np.concatenate([p[f"blocks.1.attn.{x}.weight"] for x in "qkv"]))
    kind, a = _raw(str(out), "blk.0.ffn_up.weight")
    np.testing.assert_array_equal(a, np.concatenate([p["blocks.0.mlp.gate.weight"],
                                                     p["blocks.0.mlp.up.weight"]]))
    back = engine.load(str(out))
    assert (back.config.model_type, back.config.sliding_window) == ("phi3", window)
    for n, x in p.items():
        np.testing.assert_array_equal(back.params[n], x, err_msg=n)
    ids = small_tok.encode(TEXTS[0] + TEXTS[2])[:40]
    want, hf = _transformers_logits(out, ids)
    assert type(hf).__name__ == "Phi3ForCausalLM"
    np.testing.assert_allclose(m.forward(np.array([ids])), want, atol=2e-4 * np.abs(want).max(),
                               rtol=0)
