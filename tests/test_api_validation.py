"""Arguments, configs and files the public API used to accept silently (wrong results) or reject
with a raw Python error: each now gets an engine error naming the problem."""
import json
import os

import numpy as np
import pytest

import engine
from engine import data as D
from engine import schedules
from engine.io import hf_names
from engine.io.safetensors import SafetensorsFile, write as write_safetensors
from engine.prefix_cache import PrefixCache
from conftest import small_model


def small(kind="gpt2", n_layer=2, **kw):
    return small_model(kind, n_layer, **kw)


@pytest.fixture(scope="module")
def model():
    return small()


# ---- silently wrong -----------------------------------------------------------------------
def test_clip_grad_norm_rejects_a_negative_max_norm(model):
    model.unfreeze()
    model.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    model.backward()
    before = {n: g.copy() for n, g in model.grads.items()}
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(engine.InputError, match="max_norm must be a number >= 0"):
            engine.clip_grad_norm(model, bad)
    for n, g in model.grads.items():  # untouched (a negative coef used to flip every sign)
        np.testing.assert_array_equal(g, before[n])
    model.zero_grad()


@pytest.mark.parametrize("kw,match", [
    (dict(decay=-2), r"decay must be a number in \(0, 1\], got -2"),
    (dict(decay=0), "decay"),
    (dict(decay=1.5), "decay"),
    (dict(t0=-0.1), r"t0 must be a number in \(0, 1\]"),
    (dict(t0=0), r"t0 must be a number in \(0, 1\]"),
    (dict(t0=1.5), "t0"),
    (dict(threshold=-1), "threshold must be a number >= 0"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(every=0), "every must be an integer >= 1"),
    (dict(every=2.5), "every"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(k=True), "k=True"),
    (dict(k=1.0), "k=1.0"),
])
def test_schedule_parameters_are_checked(kw, match):
    args = dict(name="lr-decay", n_layer=4, k=2) | kw
    with pytest.raises(engine.InputError, match=match):
        schedules.make(**args)


def test_lr_decay_scales_stay_in_0_1():
    s = schedules.make("lr-decay", 4, 4, decay=1.0)
    assert [s.lr_scale(i, 0) for i in range(4)] == [1.0] * 4


def _examples(n=6, T=12, V=64):
    rng = np.random.default_rng(0)
    lens = rng.integers(4, T + 2, n)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, V, int(offsets[-1])).astype(np.int32)
    data = D.TokenData(tokens, np.ones_like(tokens, np.uint8), offsets, "examples", "mem")
    return D.Examples(data, T)


def _fill(m, ex, d):
    c = PrefixCache(m, ex, 1, directory=str(d))
    x, _, idx = next(D.eval_batches(ex, np.arange(len(ex)), len(ex), 0))
    h = c.hidden(idx, x)
    return c, x, idx, h


@pytest.mark.parametrize("damage", ["truncate store", "truncate filled", "garbage filled",
                                    "other dtype"])
def test_damaged_disk_prefix_cache_is_rebuilt(tmp_path, capsys, damage):
    m = small("llama").train_last(1)
    ex = _examples()
    c, x, idx, want = _fill(m, ex, tmp_path)
    base = os.path.join(tmp_path, c.key)
    del c
    if damage == "truncate store":
        # r+ used to pad this with zeros that `filled` passed off as computed activations
        os.truncate(base + ".npy", os.path.getsize(base + ".npy") // 2)
    elif damage == "truncate filled":
        os.truncate(base + ".filled.npy", 20)
    elif damage == "garbage filled":
        with open(base + ".filled.npy", "r+b") as f:
            f.seek(-2, os.SEEK_END)
            f.write(b"\xff\x07")
    else:
        np.save(base + ".npy", np.zeros((3, 3), np.float64))
    capsys.readouterr()
    c2 = PrefixCache(m, ex, 1, directory=str(tmp_path))
    assert "rebuilding" in capsys.readouterr().err
    assert not c2.filled.any()
    np.testing.assert_array_equal(c2.hidden(idx, x), want)
    assert c2.computed == len(ex)
    del c2
    c3 = PrefixCache(m, ex, 1, directory=str(tmp_path))   # whole again: reused, no note
    assert "rebuilding" not in capsys.readouterr().err and c3.filled.all()
    np.testing.assert_array_equal(c3.hidden(idx, x), want)
    assert c3.computed == 0


def test_nan_weights_in_safetensors_are_refused(tmp_path):
    small().save(str(tmp_path))
    f = str(tmp_path / "model.safetensors")
    st = SafetensorsFile(f)
    _, _, _, begin, end = st.entries["transformer.h.1.mlp.c_proj.bias"]
    with open(f, "r+b") as fh:
        fh.seek(st.data_start + begin)
        fh.write(b"\xff" * (end - begin))
    with pytest.raises(engine.CheckpointError,
                       match=r"model.safetensors: tensor 'transformer.h.1.mlp.c_proj.bias' holds NaN"):
        engine.load(str(tmp_path))


def test_adamw_arguments(model):
    with pytest.raises(engine.InputError, match=r"betas\[0\] must be a number in \[0, 1\), got 1.5"):
        engine.AdamW(model, lr=1e-3, betas=(1.5, 0.9))
    with pytest.raises(engine.InputError, match=r"betas\[1\]"):
        engine.AdamW(model, lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(engine.InputError, match="betas must be a pair"):
        engine.AdamW(model, betas=0.9)
    with pytest.raises(engine.InputError, match="learning rate must be a number >= 0, got '1e-3'"):
        engine.AdamW(model, lr="1e-3")
    with pytest.raises(engine.InputError, match="learning rate"):
        engine.AdamW(model, lr=float("inf"))
    with pytest.raises(engine.InputError, match="weight_decay"):
        engine.AdamW(model, weight_decay=-0.1)
    with pytest.raises(engine.InputError, match="needs an engine Model, got NoneType"):
        engine.AdamW(None, lr=1e-3)
    with pytest.raises(engine.InputError, match="momentum"):
        engine.SGD(model, momentum=-0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(rope_theta=-5.0), r"Config.rope_theta must be a finite number > 0, got -5.0"),
    (dict(init_std="x"), r"Config.init_std must be a finite number >= 0, got 'x'"),
    (dict(norm_eps="1e-5"), r"Config.norm_eps must be a finite number > 0, got '1e-5'"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(norm_eps=1e308), r"Config.norm_eps must be at most 1"),          # every logit NaN
    (dict(rope_theta=1e-300), r"Config.rope_theta must be at least 1"),
    (dict(tie_embeddings="false"), r"Config.tie_embeddings must be True or False, got 'false'"),
    (dict(attn_bias=1), "attn_bias"),
    (dict(attn_out_bias="no"), r"Config.attn_out_bias must be True or False, got 'no'"),
    (dict(model_type="gemma3"), r"Config.model_type='gemma3'; expected one of \('gpt2', 'llama', "
                                r"'mistral', 'phi3', 'qwen2', 'qwen3', 'smollm3', 'bert', 'roberta', "
                                r"'xlm-roberta', 'distilbert'\)"),
    (dict(pooler_act="gelu"), r"Config.pooler_act='gelu'; expected one of \('tanh', 'relu'\)"),
    (dict(position_offset=-1), r"Config.position_offset must be an integer from 0 to max_seq_len"),
    (dict(position_offset=2, positions="rope"), r"position_offset needs learned positions"),
    (dict(sliding_window=0), r"Config.sliding_window must be a positive integer, got 0"),
    (dict(sliding_window=2.5), r"Config.sliding_window must be a positive integer, got 2.5"),
    (dict(qk_norm=1), r"Config.qk_norm must be True or False, got 1"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_type is one of \('linear', "
                                                            r"'llama3'\)"),
    (dict(rope_scaling={"rope_type": "linear"}), r"needs exactly the keys \['factor', 'rope_type'\]"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), r"rope_scaling\['factor'\] must be "
                                                                 r"a number from 1e-6 to 1e9"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                        "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
     "high_freq_factor must be above low_freq_factor"),
    (dict(rope_scaling=[8.0]), "rope_scaling must be a dict"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 1e-300}), r"must be a number from 1e-6"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 10 ** 400}), r"must be a number from 1e-6"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 0.5, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     "a llama3 factor stretches the context, it must be at least 1"),
    (dict(rope_theta=10 ** 400), r"Config.rope_theta must be a finite number > 0"),
    (dict(rope_theta=1e39), r"Config.rope_theta must be at least 1 and a float32"),
    (dict(no_rope_blocks=[0, 0]), r"Config.no_rope_blocks must be distinct block indices below "
                                  r"n_layer=1"),
    (dict(no_rope_blocks=[1]), r"Config.no_rope_blocks must be distinct block indices"),
    (dict(no_rope_blocks=[True]), r"Config.no_rope_blocks must be distinct block indices"),
    (dict(no_rope_blocks=[0, "a"]), r"Config.no_rope_blocks must be distinct block indices"),
    (dict(qk_norm=True, norm="layernorm"), r"Config.qk_norm needs norm='rmsnorm'"),
    (dict(n_layers=2), r"unknown Config fields: \['n_layers'\]"),
    (dict(n_head="2"), "Config.n_head must be a positive integer, got '2'"),
])
def test_config_fields_are_type_checked(kw, match):
    with pytest.raises(engine.ConfigError, match=match):
        engine.Config.llama(**{**dict(vocab_size=10, n_layer=1, n_head=2, n_kv_head=1, d_model=8,
                                      d_ff=8), **kw})


def test_config_gpt2_overrides_checked_like_from_dict():
    with pytest.raises(engine.ConfigError, match=r"unknown Config fields: \['n_layers'\]"):
        engine.Config.gpt2(n_layers=2)
    with pytest.raises(engine.ConfigError, match="needs a dict"):
        engine.Config.from_dict([("n_layer", 2)])


def test_train_last_rejects_bool(model):
    with pytest.raises(engine.InputError, match="got True"):
        model.train_last(True)


# ---- config.json --------------------------------------------------------------------------
GPT2_HF = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 2,
           "n_head": 4, "layer_norm_epsilon": 1e-5}
LLAMA_HF = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("base,key", [(GPT2_HF, k) for k in ("n_embd", "vocab_size", "n_layer", "n_head")]
                         + [(LLAMA_HF, k) for k in ("hidden_size", "num_attention_heads",
                                                    "intermediate_size", "vocab_size")])
def test_config_json_missing_key(base, key):
    hf = {k: v for k, v in base.items() if k != key}
    with pytest.raises(engine.ConfigError, match=f"config.json has no '{key}'"):
        hf_names.config_from_hf(hf)


@pytest.mark.parametrize("base,change,match", [
    (LLAMA_HF, dict(num_attention_heads=0), "config.json: num_attention_heads=0 is not a positive integer"),
    (LLAMA_HF, dict(rope_theta="abc"), "config.json: rope_theta='abc' is not a number"),
    (LLAMA_HF, dict(rope_scaling=[1]), r"config.json: rope_scaling=\[1\] is not an object"),
    (LLAMA_HF, dict(rope_parameters={"rope_theta": "1e4", "rope_type": "default"}),
     "config.json: rope_parameters.rope_theta=.1e4. is not a number"),
    (LLAMA_HF, dict(attention_bias="false"), "config.json: attention_bias='false' is not true or false"),
    (GPT2_HF, dict(tie_word_embeddings="false"), "config.json: tie_word_embeddings='false'"),
    (GPT2_HF, dict(layer_norm_epsilon="1e-5"), "config.json: layer_norm_epsilon='1e-5' is not a number"),
    (GPT2_HF, dict(n_inner="64"), "config.json: n_inner='64'"),
])
def test_config_json_bad_values(base, change, match):
    with pytest.raises(engine.ConfigError, match=match):
        hf_names.config_from_hf({**base, **change})


def test_rope_scaling_dicts_are_not_shared():
    """The config keeps its own copy, and config.json gets another: transformers writes into
    the dicts it is given (rope_theta), and a caller may change theirs."""
    from transformers import LlamaConfig
    mine = {"rope_type": "linear", "factor": 2.0}
    cfg = engine.Config.llama(vocab_size=10, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=8,
                              rope_scaling=mine)
    mine["factor"] = 8.0
    LlamaConfig(**hf_names.config_to_hf(cfg))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    engine.Model(cfg)


def test_qwen2_config_json():
    """Qwen2: biases on q, k, v and none on the output or the MLP, whatever attention_bias or
    mlp_bias keys say (transformers' Qwen2 reads neither); windowed attention refused."""
    q = {**LLAMA_HF, "model_type": "qwen2", "attention_bias": False, "mlp_bias": True}
    cfg = hf_names.config_from_hf(q)
    assert (cfg.model_type, cfg.attn_bias, cfg.attn_out_bias, cfg.mlp_bias) == ("qwen2", True,
                                                                                  False, False)
    assert hf_names.config_from_hf(hf_names.config_to_hf(cfg)) == cfg
    del q["max_position_embeddings"]    # transformers' Qwen2Config default, not LlamaConfig's
    assert hf_names.config_from_hf(q).max_seq_len == 32768
    with pytest.raises(engine.ConfigError, match="qwen2 use_sliding_window=true is not supported"):
        hf_names.config_from_hf({**q, "use_sliding_window": True})
    with pytest.raises(engine.ConfigError, match="qwen2 rope scaling .*yarn"):
        hf_names.config_from_hf({**q, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_NO_TYPE = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}


@pytest.mark.parametrize("change", [
    dict(rope_scaling=LLAMA3_ROPE, rope_theta=5e5),                   # Llama 3.2's config.json
    dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5}),          # as transformers 5 saves it
    dict(rope_scaling={**_NO_TYPE, "type": "llama3"}),                 # the older key
    dict(rope_scaling={**LLAMA3_ROPE, "rope_theta": 7e4}, rope_theta=5e5),   # theta inside wins
    # a non-empty rope_scaling replaces rope_parameters whole (its theta too), default or not
    dict(rope_scaling=LLAMA3_ROPE, rope_parameters={**LLAMA3_ROPE, "factor": 8.0, "rope_theta": 9e4}),
    dict(rope_scaling={"rope_type": "default"}, rope_parameters={"rope_type": "linear",
                                                                   "factor": 4.0}),
    # transformers applies the linear x4 of rope_scaling over a default rope_parameters
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
         rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(rope_parameters={"type": "linear", "factor": 4.0, "rope_theta": 1e4}),
    # llama3's original context: missing, the model's max positions (a top-level key is not
    # read into it)
    dict(rope_scaling=LLAMA3_ROPE, original_max_position_embeddings=4096),
    dict(rope_scaling={k: v for k, v in LLAMA3_ROPE.items()
                       if k != "original_max_position_embeddings"}),
])
def test_rope_read_as_transformers_reads_it(change):
    """transformers' LlamaConfig is the oracle: its rope_parameters after reading the same
    config.json give the engine's theta and rope_scaling."""
    import copy
    from transformers import LlamaConfig
    hf = {**LLAMA_HF, **change}
    want = LlamaConfig(**copy.deepcopy(hf)).rope_parameters
    cfg = hf_names.config_from_hf(hf)
    assert cfg.rope_theta == want["rope_theta"]
    if want["rope_type"] == "default":
        assert cfg.rope_scaling is None
    else:
        assert cfg.rope_scaling == {k: want[k] for k in cfg.rope_scaling}
        assert set(cfg.rope_scaling) == {"rope_type", *engine.config.ROPE_SCALING_KEYS[want["rope_type"]]}
    assert hf_names.config_from_hf(hf_names.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("change,match", [
    (dict(rope_scaling={**LLAMA3_ROPE, "rope_type": "yarn"}), "rope scaling rope_scaling type 'yarn' "
                                                              "is not supported"),
    (dict(rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}),
     "config.json has no 'rope_scaling.low_freq_factor'"),
    (dict(rope_scaling={"type": ["linear"], "factor": 2.0}), "type \\['linear'\\] is not a string"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling rope_scaling type "
                                                            "'dynamic' is not supported .only "
                                                            "default, linear, llama3"),
])
def test_rope_scaling_refusals(change, match):
    with pytest.raises(engine.ConfigError, match=match):
        hf_names.config_from_hf({**LLAMA_HF, **change})


def test_smollm3_config_json():
    """SmolLM3's no_rope_layers (1 = rotary) become the blocks without; absent, every
    no_rope_layer_interval-th block, as transformers' SmolLM3Config makes them; compared with
    SmolLM3Config itself."""
    import copy
    from transformers import SmolLM3Config
    base = {**LLAMA_HF, "model_type": "smollm3", "num_hidden_layers": 8}
    for change in ({}, {"no_rope_layer_interval": 3}, {"no_rope_layers": [1, 0, 0, 1, 1, 1, 1, 0]},
                   {"no_rope_layers": [1, 0, 0, 1, 1, 1, 1, 0, 0, 0]}):   # longer: the first 8
        hf = {**base, **change}
        want = SmolLM3Config(**copy.deepcopy(hf)).no_rope_layers[:8]
        cfg = hf_names.config_from_hf(hf)
        assert cfg.no_rope_blocks == [i for i, f in enumerate(want) if not f]
        assert cfg.tie_embeddings     # SmolLM3Config's default
        assert hf_names.config_from_hf(hf_names.config_to_hf(cfg)) == cfg
    with pytest.raises(engine.ConfigError, match="no_rope_layers must be 8 flags of 0 or 1"):
        hf_names.config_from_hf({**base, "no_rope_layers": [1, 0]})
    # no rope_theta: SmolLM3Config's default, not Llama's
    no_theta = {k: v for k, v in base.items() if k != "rope_theta"}
    assert hf_names.config_from_hf(no_theta).rope_theta == SmolLM3Config(
        **copy.deepcopy(no_theta)).rope_parameters["rope_theta"] == 2e6
    # SmolLM3 windows the layers layer_types names even with use_sliding_window false
    with pytest.raises(engine.ConfigError, match="smollm3 layer_types with sliding_attention"):
        hf_names.config_from_hf({**base, "sliding_window": 3,
                                 "layer_types": ["full_attention", "sliding_attention"] * 4})
    with pytest.raises(engine.ConfigError, match="cannot save as llama: it needs no_rope_blocks=None"):
        hf_names.config_to_hf(engine.Config.from_dict({**hf_names.config_from_hf(base).to_dict(),
                                                       "model_type": "llama"}))


@pytest.mark.parametrize("bias", [False, True])
def test_qwen3_config_json(bias):
    """Qwen3: per-head q / k norms; attention_bias on all four projections as llama's; no MLP
    biases whatever mlp_bias says; heads as wide as head_dim says."""
    q = {**LLAMA_HF, "model_type": "qwen3", "attention_bias": bias, "mlp_bias": True,
         "head_dim": 20}
    cfg = hf_names.config_from_hf(q)
    assert (cfg.model_type, cfg.qk_norm, cfg.attn_bias, cfg.attn_out_bias, cfg.mlp_bias,
            cfg.head_dim) == ("qwen3", True, bias, bias, False, 20)
    assert hf_names.config_from_hf(hf_names.config_to_hf(cfg)) == cfg
    with pytest.raises(engine.ConfigError, match="qwen3 use_sliding_window=true is not supported"):
        hf_names.config_from_hf({**q, "use_sliding_window": True})


@pytest.mark.parametrize("family,change,match", [
    # llama has one attention_bias for all four projections
    ("llama", dict(attn_bias=True, attn_out_bias=False), "cannot save as llama: it needs "
                                                         "attn_out_bias=True, this model has False"),
    ("qwen2", dict(mlp_bias=True), "cannot save as qwen2: it needs mlp_bias=False"),
    ("qwen2", dict(attn_out_bias=True), "cannot save as qwen2: it needs attn_out_bias=False"),
    ("gpt2", dict(attn_out_bias=False), "cannot save as gpt2: it needs attn_out_bias=True"),
    ("llama", dict(qk_norm=True), "cannot save as llama: it needs qk_norm=False"),
    ("qwen3", dict(qk_norm=False), "cannot save as qwen3: it needs qk_norm=True"),
    ("qwen3", dict(attn_bias=True, attn_out_bias=False), "cannot save as qwen3: it needs "
                                                          "attn_out_bias=True"),
])
def test_bias_layouts_no_family_holds_are_refused_on_save(tmp_path, family, change, match):
    cfg = getattr(engine.Config, family)(**{**dict(vocab_size=10, n_layer=1, n_head=2,
                                                   n_kv_head=2, d_model=8, d_ff=8), **change})
    with pytest.raises(engine.ConfigError, match=match):
        engine.Model(cfg).save(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_architecture_omits_fields_added_later_at_their_absent_value():
    """Run fingerprints hash Config.architecture(): a config that uses none of attn_out_bias,
    qk_norm, rope_scaling, no_rope_blocks and sliding_window hashes the fields it had before they existed, so earlier runs
    still resume."""
    before = {"model_type", "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim",
              "d_ff", "max_seq_len", "norm", "norm_eps", "mlp", "positions", "rope_theta",
              "attn_bias", "mlp_bias", "tie_embeddings", "init_std"}
    assert set(engine.Config.gpt2().architecture()) == before
    assert set(engine.Config.llama(attn_bias=True).architecture()) == before
    assert set(engine.Config.qwen2().architecture()) == before | {"attn_out_bias"}
    assert set(engine.Config.qwen3().architecture()) == before | {"qk_norm"}
    assert set(engine.Config.smollm3().architecture()) == before | {"no_rope_blocks"}
    assert set(engine.Config.mistral().architecture()) == before | {"sliding_window"}
    assert set(engine.Config.llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
               .architecture()) == before | {"rope_scaling"}


def test_config_json_nulls_mean_defaults():
    cfg = hf_names.config_from_hf({**LLAMA_HF, "head_dim": None, "rope_scaling": None,
                                   "num_key_value_heads": None})
    assert (cfg.head_dim, cfg.n_kv_head) == (8, 4)
    assert hf_names.config_from_hf({**GPT2_HF, "n_inner": None}).d_ff == 128


def test_config_json_error_through_load(tmp_path):
    small().save(str(tmp_path))
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(engine.ConfigError, match="config.json has no 'n_embd'"):
        engine.load(str(tmp_path))


# ---- checkpoint files ---------------------------------------------------------------------
def test_wrong_c_attn_bias_named_as_in_the_file(tmp_path):
    small().save(str(tmp_path))
    f = str(tmp_path / "model.safetensors")
    st = SafetensorsFile(f)
    tensors = {n: st.float32(n) for n in st.keys()}
    tensors["transformer.h.1.attn.c_attn.bias"] = np.zeros(20, np.float32)
    write_safetensors(f, tensors)
    with pytest.raises(engine.CheckpointError,
                       match=r"tensor 'transformer.h.1.attn.c_attn.bias' has shape \(20,\), "
                             r"expected \(96,\)"):
        engine.load(str(tmp_path))


def test_gguf_found_by_magic_without_the_extension(tmp_path):
    from gguf_fixtures import write_tiny_llama
    want = write_tiny_llama(tmp_path / "model.bin")
    m = engine.load(str(tmp_path / "model.bin"))
    np.testing.assert_array_equal(m.params["ln_f.weight"], want["ln_f.weight"])
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    with pytest.raises(engine.CheckpointError, match="not a model"):
        engine.load(str(tmp_path / "junk.bin"))


def test_save_dtype_and_path(model, tmp_path):
    with pytest.raises(engine.InputError, match="save dtype 'F64' is not supported; choose one of "
                                                "F32, F16, BF16"):
        model.save(str(tmp_path / "out"), dtype="F64")
    assert not (tmp_path / "out").exists()        # refused before anything is written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(engine.InputError, match="afile is an existing file; Model.save writes a "
                                                "directory"):
        model.save(str(tmp_path / "afile"))
    with pytest.raises(engine.InputError, match="cannot create the directory"):
        model.save(str(tmp_path / "afile" / "sub"))


# ---- Model --------------------------------------------------------------------------------
def test_ragged_tokens_and_huge_unsigned_ids(model):
    with pytest.raises(engine.InputError, match="rows given have different lengths"):
        model.forward([[1, 2, 3], [1]])
    with pytest.raises(engine.InputError, match="id 9223372036854775813, outside"):
        model.forward(np.array([[2**63 + 5]], dtype=np.uint64))
    with pytest.raises(engine.InputError, match="targets holds id -7"):   # -100 amid the ids
        model.forward(np.array([[1, 2, 3]]), np.array([[-100, -7, 2]]))
    assert model.forward(np.array([[1, 2]], np.uint8)).shape == (1, 2, 64)


def test_freeze_patterns_must_be_strings(model):
    with pytest.raises(engine.InputError, match="patterns must be strings"):
        model.unfreeze(5)
    with pytest.raises(engine.InputError, match="patterns must be strings"):
        model.freeze(["blocks.0.*"])


def test_kv_cache_arguments(model):
    with pytest.raises(engine.InputError, match="new_cache batch must be a positive integer, got -1"):
        model.new_cache(-1, 4)
    with pytest.raises(engine.InputError, match="new_cache length"):
        model.new_cache(1, 2.5)
    ok = np.array([[1, 2, 3]])
    with pytest.raises(engine.InputError, match="pos0 must be an integer >= 0, got -3"):
        model.forward_cached(ok, model.new_cache(1, 8), -3)
    with pytest.raises(engine.InputError, match="tokens have batch 2, the cache was made for batch 1"):
        model.forward_cached(np.ones((2, 2), np.int64), model.new_cache(1, 8), 0)
    with pytest.raises(engine.InputError, match="cache must be the list of 2 .k, v. pairs"):
        model.forward_cached(ok, [], 0)
    with pytest.raises(engine.InputError, match="cache entries must be"):
        model.forward_cached(ok, [(np.zeros((1, 8, 4, 8)), np.zeros((1, 8, 4, 8)))] * 2, 0)
    strided = [(k[:, ::2], v[:, ::2]) for k, v in model.new_cache(2, 16)]   # a view, not a copy
    with pytest.raises(engine.InputError, match="cache entries must be .k, v. C-contiguous"):
        model.forward_cached(np.ones((2, 2), np.int64), strided, 0)
    with pytest.raises(engine.InputError, match="do not fit the cache of length 8"):
        model.forward_cached(ok, model.new_cache(1, 8), 6)


def test_model_constructor_arguments(model):
    with pytest.raises(engine.ConfigError, match="Model needs an engine.Config, got dict"):
        engine.Model({"n_layer": 2})
    p = dict(model.params)
    with pytest.raises(engine.CheckpointError,
                       match="'ln_f.weight' must be a floating-point NumPy array, got list"):
        engine.Model(model.config, {**p, "ln_f.weight": [1.0] * 32})
    with pytest.raises(engine.CheckpointError, match="'ln_f.weight' must be a floating-point NumPy "
                                                     "array, got dtype <U1"):
        engine.Model(model.config, {**p, "ln_f.weight": np.array(["a"] * 32)})
    with pytest.raises(engine.CheckpointError, match="params must be a dict"):
        engine.Model(model.config, list(p.items()))


# ---- generate -----------------------------------------------------------------------------
@pytest.mark.parametrize("args,kw,match", [
    (("hello",), {}, "prompt ids must be integer token ids, got str"),
    (([[1, 2]],), {}, r"prompt ids must hold integer token ids, got \[1, 2\]"),
    (([1, 2.0],), {}, "got 2.0"),
    ((np.array([[1, 2]]),), {}, r"flat sequence of token ids, got shape \(1, 2\)"),
    (([1],), dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
    (([1],), dict(stop="ab"), "stop must be integer token ids, got str"),
    (([1],), dict(stop=5), "stop must be a list of integer token ids, got int"),
    (([1],), dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (([1],), dict(temperature="1"), "temperature"),
    (([1],), dict(top_k=0), "top_k must be None or an integer >= 1, got 0"),
    (([1],), dict(top_k=-3, temperature=1.0), "top_k"),
    (([1],), dict(top_p=float("nan")), "top_p"),
    (([1],), dict(seed=-1), "seed must be None or an integer >= 0"),
    (([1],), dict(on_token=3), "on_token"),
])
def test_generate_arguments(model, args, kw, match):
    with pytest.raises(engine.InputError, match=match):
        engine.generate(model, *args, max_new_tokens=kw.pop("max_new_tokens", 2), **kw)


def test_generate_still_takes_arrays_and_tuples(model):
    a = engine.generate(model, np.array([1, 2]), max_new_tokens=3, stop=np.array([7]))
    assert a == engine.generate(model, (1, 2), max_new_tokens=3, stop=(7,))
    assert len(a) in (1, 2, 3)


def test_prefix_and_start_must_be_integers(model):
    x = np.zeros((1, 4), np.int64)
    for bad in (2.0, "2", None):
        with pytest.raises(engine.InputError, match="prefix upto="):
            model.prefix(x, bad)
        with pytest.raises(engine.InputError, match="start="):
            model.forward(x, x, hidden=np.zeros((1, 4, model.config.d_model), np.float32), start=bad)


@pytest.mark.parametrize("args,match", [
    ((1e-3, "10"), "integers total > 0"), ((1e-3, None), "integers total > 0"),
    ((1e-3, 10, -1), "warmup >= 0"), (("x", 10), "schedule lr"), ((1e-3, 10, 0, float("nan")), "min_lr"),
])
def test_cosine_schedule_arguments(args, match):
    with pytest.raises(engine.InputError, match=match):
        engine.CosineSchedule(*args)


def test_optimizer_load_state_dict_checks_everything_first(model):
    """Each bad state_dict holds a valid entry for one parameter (different from the state now)
    before a bad one for another: nothing at all is taken, not even t or lr."""
    model.train_last(1)
    opt = engine.AdamW(model)
    good = opt.state_dict()
    first, n = list(good["state"])[:2]
    shape = good["state"][n]["m"].shape
    ones = {k: np.ones_like(v) for k, v in good["state"][first].items() if k in ("m", "v")}
    valid = {first: {**ones, "t": 7}}
    bad = [({}, "needs 't'"),
           ({**good, "t": "3"}, "needs 't'"),
           ({**good, "t": 9, "lr": "x"}, "state_dict lr"),
           ({"t": 9, "lr": 0.5, "state": {**valid, n: {"buf": np.zeros(shape, np.float32)}}}, "no such entry"),
           ({"t": 9, "lr": 0.5, "state": {**valid, n: {"m": [0.0]}}}, "finite array"),
           ({"t": 9, "lr": 0.5, "state": {**valid, n: {"v": -np.ones(shape, np.float32)}}}, "negative"),
           ({"t": 9, "lr": 0.5, "state": {**valid, n: {"t": "3"}}}, "must be of type int"),
           ({"t": 9, "lr": 0.5, "state": {**valid, "nope": {}}}, "not trainable")]
    for d, match in bad:
        with pytest.raises(engine.InputError, match=match):
            opt.load_state_dict(d)
    assert (opt.t, opt.lr) == (good["t"], good["lr"])
    for k, st in opt.state.items():
        assert st["t"] == 0 and not st["m"].any() and not st["v"].any(), k
    opt.load_state_dict({"t": 9, "lr": 0.5, "state": valid})       # and a valid one is taken
    assert opt.t == 9 and opt.state[first]["t"] == 7 and opt.state[first]["m"].all()
    model.unfreeze()


def test_a_model_pickled_before_the_newer_fields_still_runs(tmp_path):
    """A GPT-2 pickled before attn_out_bias, qk_norm and rope_scaling existed (their
    attributes removed here as the old code never set them) unpickles with the meaning it had:
    the output bias kept, the same logits, the same run fingerprint, and it saves."""
    import pickle
    from engine.train import fingerprint
    m = small()
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 9))
    want, fp = m.forward(ids), fingerprint(m)
    for name in ("attn_out_bias", "qk_norm", "rope_scaling"):
        del m.config.__dict__[name]
    del m.config.__dict__["no_rope_blocks"]
    for b in m.blocks:
        del b.__dict__["q_norm"], b.__dict__["k_norm"]
    old = pickle.loads(pickle.dumps(m))
    assert old.config.attn_out_bias is True
    np.testing.assert_array_equal(old.forward(ids), want)
    assert fingerprint(old) == fp
    old.save(str(tmp_path / "saved"))


def test_a_trained_model_pickles_and_copies(tmp_path):
    """multiprocessing and joblib pickle what they hand to workers: a model with gradients and
    an optimizer attached comes back with the same outputs and trainable set, untracked by
    that optimizer (a step on the original leaves the copy alone)."""
    import copy
    import pickle
    from conftest import small_model
    m = small_model("llama", n_layer=2).train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))
    m.forward(x, y)
    m.backward()
    copies = (pickle.loads(pickle.dumps(m)), copy.deepcopy(m))
    for c in copies:
        assert c.trainable == m.trainable
        assert all(np.array_equal(c.grads[n], m.grads[n]) for n in m.grads)
        np.testing.assert_array_equal(c.forward(x), m.forward(x))
    before = {n: m.params[n].copy() for n in m.trainable}
    opt.step()
    for c in copies:
        assert all(np.array_equal(c.params[n], before[n]) for n in before)
        c.forward(x, y)
        c.backward()
        engine.AdamW(c, lr=1e-2).step()
        assert not all(np.array_equal(c.params[n], before[n]) for n in before)


def _one_step(m, opt, seed=0):
    tok = np.random.default_rng(seed).integers(0, m.config.vocab_size, (2, 9))
    m.zero_grad()
    m.forward(tok[:, :-1], tok[:, 1:])
    m.backward()
    opt.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_and_optimizer_still_free_state_on_freeze(how):
    """Copied together (a checkpoint in memory, a multiprocessing hand-off), the optimizer still
    follows its model: freezing a parameter frees its state there too, and the copy trains as
    the original does."""
    import copy
    import pickle
    runs = []
    for copied in (False, True):
        m = small_model("llama", n_layer=2)
        m.train_last(1)
        opt = engine.AdamW(m, lr=1e-2)
        for s in range(3):
            _one_step(m, opt, s)
        if copied:
            m, opt = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
        n = m.trainable[0]
        m.freeze(n)
        assert n not in opt.state, "the frozen parameter's state was kept"
        m.unfreeze(n)
        _one_step(m, opt, 3)
        runs.append(m.params)
    for n in runs[0]:
        assert np.array_equal(runs[0][n], runs[1][n]), n


def test_weights_changed_between_forward_and_backward_are_refused():
    """An optimizer step or a replaced parameter between forward and backward would mix the old
    weights' activations with the new weights (torch refuses the same order)."""
    m = small_model("llama", n_layer=2)
    m.train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    tok = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 9))
    m.forward(tok[:, :-1], tok[:, 1:])
    m.backward()
    m.forward(tok[:, :-1], tok[:, 1:])
    opt.step()
    with pytest.raises(engine.InputError, match="weights changed between forward"):
        m.backward()
    m.forward(tok[:, :-1], tok[:, 1:])
    n = m.trainable[0]
    m.params[n] = m.params[n].copy()
    with pytest.raises(engine.InputError, match="weights changed between forward"):
        m.backward()
    m.forward(tok[:, :-1], tok[:, 1:])
    m.backward()                                    # the usual order still works


@pytest.mark.parametrize("spoil, match", [
    (lambda p: np.lib.stride_tricks.as_strided(p, writeable=False), "read-only"),
    (lambda p: np.asfortranarray(p.reshape(p.shape[0], -1)).reshape(p.shape) if p.ndim == 1
     else np.asfortranarray(p), "not C-contiguous"),
])
def test_a_parameter_the_optimizer_cannot_write_is_named(spoil, match):
    m = small_model("llama", n_layer=2)
    m.train_last(1)
    opt = engine.SGD(m, lr=1e-2)
    n = next(n for n in m.trainable if m.params[n].ndim == 2)
    m.params[n] = spoil(m.params[n])
    tok = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 9))
    m.forward(tok[:, :-1], tok[:, 1:])
    m.backward()
    with pytest.raises(engine.InputError, match=f"parameter '{n}' must be a writable C-contiguous.*{match}"):
        opt.step()


def test_nesterov_needs_momentum():
    with pytest.raises(engine.InputError, match="nesterov=True needs momentum"):
        engine.SGD(small_model("llama", n_layer=1), lr=0.1, nesterov=True)


def test_a_step_after_zero_grad_without_backward_changes_nothing():
    """torch's zero_grad() sets .grad to None and AdamW then skips the parameter; here too, a
    step with no backward since zero_grad leaves every weight as it was (Adam's moments alone
    would move them)."""
    m = small_model("llama", n_layer=2)
    m.train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    _one_step(m, opt)
    before = {n: p.copy() for n, p in m.params.items()}
    m.zero_grad()
    opt.step()
    assert all(np.array_equal(before[n], m.params[n]) for n in before)
    _one_step(m, opt, 1)                              # and the next real step moves them
    assert not all(np.array_equal(before[n], m.params[n]) for n in m.trainable)
