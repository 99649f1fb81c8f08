"""bos / eos / pad ids and generation_config.json survive load -> save: transformers generates
from a tailtune-saved model exactly as from its source, and stops at the same token."""
import json
import os

import numpy as np
import pytest
import torch

import engine
from conftest import SMOLLM2, build_hf, small_model

PROMPT = [5, 17, 33, 2]


def _greedy(path, n=12) -> list:
    """transformers' greedy continuation of PROMPT with the model's own generation config."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def _ids(path) -> tuple:
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    return c.get("bos_token_id"), c.get("eos_token_id"), c.get("pad_token_id")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen3"])
def test_saved_model_stops_where_the_source_does(kind, tmp_path):
    hf = build_hf(kind, seed=1)
    with torch.no_grad():
        free = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    # eos = a token the model generates a few steps in: neither transformers' defaults (llama 2,
    # gpt2 50256) nor the source's ids would stop it there
    eos = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    for c in (hf.config, hf.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = 3, eos, 0
    src, dst = tmp_path / "src", tmp_path / "saved"
    hf.save_pretrained(src)
    model = engine.load(str(src))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        3, eos, 0)
    model.save(str(dst))
    assert _ids(dst) == _ids(src) == (3, eos, 0)
    want = _greedy(src)
    assert want[-1] == eos and len(want) < 12          # the source stops early
    assert _greedy(dst) == want
    assert engine.load(str(dst)).config == model.config


def test_source_generation_config_is_copied(tmp_path):
    from transformers import GenerationConfig
    hf = build_hf("llama", seed=2)
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 1, [2, 0], 2
    src = tmp_path / "src"
    hf.save_pretrained(src)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=2, temperature=0.2,
                     top_p=0.9, do_sample=True).save_pretrained(src)
    model = engine.load(str(src))
    assert model.config.eos_token_id == [2, 0]
    model.save(str(tmp_path / "saved"))
    with open(src / "generation_config.json") as f:
        want = json.load(f)
    with open(tmp_path / "saved" / "generation_config.json") as f:
        assert json.load(f) == want
    assert _ids(tmp_path / "saved") == (1, [2, 0], 2)
    again = engine.load(str(tmp_path / "saved")).config
    assert again == model.config and again.generation == want
    # resumed runs compare to_dict() and hash it: equal and JSON-able after a save and load
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(model.config.to_dict(),
                                                                     sort_keys=True)


def test_config_ids_round_trip_and_build_generation_config(tmp_path):
    model = small_model("llama", n_layer=2, bos_token_id=7, eos_token_id=(8, 9))
    cfg = model.config
    assert cfg.eos_token_id == [8, 9] and cfg.generation is None  # a tuple becomes a list
    assert engine.Config.from_dict(cfg.to_dict()) == cfg
    model.save(str(tmp_path))
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f) == {"bos_token_id": 7, "eos_token_id": [8, 9]}
    assert _ids(tmp_path) == (7, [8, 9], None)
    # a generation_config.json that holds only the ids is rebuilt from them, not kept
    assert engine.load(str(tmp_path)).config == cfg


def test_unknown_ids_are_saved_as_null(tmp_path):
    """Not left out: transformers would fill in GPT-2's 50256, beyond this vocabulary."""
    from transformers import AutoConfig
    small_model("gpt2", n_layer=1).save(str(tmp_path))
    assert _ids(tmp_path) == (None, None, None)
    c = AutoConfig.from_pretrained(str(tmp_path))
    assert (c.bos_token_id, c.eos_token_id) == (None, None)
    assert engine.load(str(tmp_path)).config.eos_token_id is None


@pytest.mark.parametrize("field,value", [("eos_token_id", "2"), ("eos_token_id", []),
                                         ("bos_token_id", True), ("pad_token_id", [0]),
                                         ("eos_token_id", [2, None])])
def test_bad_token_ids_are_refused(field, value, hf_dirs, tmp_path):
    with pytest.raises(engine.ConfigError, match=f"Config.{field} must be a token"):
        small_model("llama", n_layer=1, **{field: value})
    _, src = hf_dirs["llama"]
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    for name in ("config.json", "model.safetensors"):
        if name == "config.json":
            (tmp_path / name).write_text(json.dumps({**hf, field: value}))
        else:
            os.symlink(os.path.join(src, name), tmp_path / name)
    with pytest.raises(engine.ConfigError, match=f"config.json: {field}="):
        engine.load(str(tmp_path))


def test_unreadable_generation_config_is_named(hf_dirs, tmp_path):
    _, src = hf_dirs["gpt2"]
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(src, name), tmp_path / name)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(engine.CheckpointError, match="generation_config.json: not a JSON object"):
        engine.load(str(tmp_path))


@pytest.mark.slow
def test_smollm2_gguf_ids_reach_the_saved_config(require_smollm2, tmp_path):
    from engine.io.gguf import read_metadata
    meta = read_metadata(SMOLLM2)
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")] == [1, 2, 2]
    model = engine.load("smollm2")
    model.save(str(tmp_path))
    assert _ids(tmp_path) == (1, 2, 2)
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert engine.load(str(tmp_path)).config == model.config
    assert np.array_equal(engine.load(str(tmp_path)).params["wte.weight"],
                          model.params["wte.weight"])
