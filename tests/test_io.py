"""Loading Hugging Face directories (float32 / float16 / bfloat16), saving them back so that
transformers loads the result, and clean errors for bad checkpoints."""
import json
import os
import shutil
import struct
import time

import numpy as np
import pytest
import torch

import engine
from conftest import build_hf
from engine.io import safetensors as st


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama", "llama-tied", "llama3", "mistral",
                                  "phi3", "qwen2", "qwen3", "smollm3"])
def test_save_loads_in_transformers_with_same_logits(hf_dirs, kind, tmp_path):
    from transformers import AutoModelForCausalLM
    _, path = hf_dirs[kind]
    model = engine.load(path)
    model.train_last(1)
    opt = engine.AdamW(model, lr=1e-2)  # change the weights so the saved model is not the input
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    model.forward(tokens, tokens)
    model.backward()
    opt.step()
    out = tmp_path / "saved"
    model.save(str(out))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = model.forward(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    again = engine.load(str(out))
    for n, p in model.params.items():
        assert np.array_equal(again.params[n], p), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_half_precision_checkpoints(tmp_path, dtype):
    hf = build_hf("llama", seed=2).to(dtype)
    hf.save_pretrained(tmp_path)
    model = engine.load(str(tmp_path))
    ref = {n: p.detach().float().numpy() for n, p in hf.named_parameters()}
    assert np.array_equal(model.params["blocks.1.attn.k.weight"], ref["model.layers.1.self_attn.k_proj.weight"])
    assert np.array_equal(model.params["wte.weight"], ref["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_save_half_precision(hf_dirs, tmp_path, dtype):
    from transformers import AutoModelForCausalLM
    model = engine.load(hf_dirs["llama"][1])
    model.save(str(tmp_path), dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    want = {"F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    w = model.params["blocks.0.mlp.up.weight"]
    got = hf.model.layers[0].mlp.up_proj.weight.detach()
    assert got.dtype == want
    assert np.array_equal(got.float().numpy(), torch.tensor(w).to(want).float().numpy())


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3
    x[:3] = [np.inf, -np.inf, np.nan]
    bits = st.f32_to_bf16(x)
    ref = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits[3:], ref[3:]) and np.array_equal(bits[:2], ref[:2])
    assert np.isnan(st.bf16_to_f32(bits[2:3]))[0]


def test_sharded_checkpoint(tmp_path):
    hf = build_hf("gpt2", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = engine.load(str(tmp_path))
    tokens = np.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- bad input ------------------------------------------------------------------------------
def copy_of(hf_dirs, tmp_path, kind="llama"):
    dst = tmp_path / "m"
    shutil.copytree(hf_dirs[kind][1], dst)
    return dst


@pytest.mark.parametrize("kind", ["gpt2-untied", "llama"])
def test_a_tied_config_with_a_distinct_head_loads_as_transformers_runs_it(hf_dirs, tmp_path, kind, capfd):
    """config.json says tied (or, for gpt2, says nothing: tied by default) while the file holds
    an lm_head.weight unlike the embedding: transformers uses that head ("will NOT tie them"),
    so the engine must too, not drop it; and a save keeps it."""
    from transformers import AutoModelForCausalLM
    d = str(copy_of(hf_dirs, tmp_path, kind))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.pop("tie_word_embeddings") if kind.startswith("gpt2") else cfg.update(tie_word_embeddings=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    model = engine.load(d)
    assert "lm_head.weight differs" in capfd.readouterr().err
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    model.save(str(tmp_path / "saved"))
    np.testing.assert_array_equal(engine.load(str(tmp_path / "saved")).forward(tokens), model.forward(tokens))


def test_a_tied_head_copy_in_the_file_stays_tied(hf_dirs, tmp_path):
    """transformers' tied models may carry lm_head.weight equal to the embedding: still tied."""
    from engine.io import safetensors as S
    d = str(copy_of(hf_dirs, tmp_path, "llama-tied"))
    f = os.path.join(d, "model.safetensors")
    tensors = {n: S.SafetensorsFile(f).float32(n) for n in S.SafetensorsFile(f).keys()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    S.write(f, tensors)
    assert engine.load(d).config.tie_embeddings


def test_shard_index_whose_weight_map_is_not_an_object(tmp_path):
    from conftest import small_model
    small_model("gpt2", n_layer=1).save(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(engine.CheckpointError, match="unreadable shard index"):
        engine.load(str(tmp_path))


def test_missing_path():
    with pytest.raises(engine.CheckpointError, match="no-such-dir"):
        engine.load("/tmp/no-such-dir")


def test_unknown_model_type(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(engine.ConfigError, match="unknown model type 't5'"):
        engine.load(str(d))


def test_missing_safetensors(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(engine.CheckpointError, match="no model.safetensors"):
        engine.load(str(d))


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1000])
def test_truncated_safetensors(hf_dirs, tmp_path, keep):
    d = copy_of(hf_dirs, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(engine.CheckpointError, match="model.safetensors"):
        engine.load(str(d))


def test_corrupt_header_and_offsets(tmp_path):
    f = tmp_path / "x.safetensors"
    st.write(str(f), {"a": np.ones((2, 3), np.float32)})
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    for bad in ({"a": {**header["a"], "data_offsets": [0, 10**12]}},
                {"a": {**header["a"], "shape": [2, 4]}},
                {"a": {**header["a"], "dtype": "Q4"}},
                {"a": {**header["a"], "shape": [True, 6]}},
                {"a": {**header["a"], "dtype": ["F32"]}},                   # unhashable
                {"a": {**header["a"], "shape": [2**62, 0], "data_offsets": [0, 0]}},
                {"a": "nonsense"}):
        body = json.dumps(bad).encode()
        f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        with pytest.raises(engine.CheckpointError, match="tensor 'a'"):
            st.SafetensorsFile(str(f))
    f.write_bytes(struct.pack("<Q", 10**15) + raw[8:])
    with pytest.raises(engine.CheckpointError, match="header length"):
        st.SafetensorsFile(str(f))
    f.write_bytes(struct.pack("<Q", 4) + b"{{{{" + raw[8 + n:])
    with pytest.raises(engine.CheckpointError, match="not valid JSON"):
        st.SafetensorsFile(str(f))
    body = json.dumps({**header, "empty": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    assert st.SafetensorsFile(str(f)).raw("empty").shape == (0,)   # an empty buffer is fine
    # json's own limits: past 4300 digits a plain ValueError, deep nesting a RecursionError
    for body in (b'{"a": ' + b"1" * 5000 + b"}", b"[" * 100000 + b"]" * 100000):
        f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        with pytest.raises(engine.CheckpointError, match="not valid JSON"):
            st.SafetensorsFile(str(f))


@pytest.mark.parametrize("name", ["config.json", "generation_config.json",
                                  "model.safetensors.index.json"])
def test_json_files_beyond_jsons_limits_are_named(tmp_path, name):
    from conftest import small_model
    small_model("llama", n_layer=1).save(str(tmp_path))
    if name.endswith("index.json"):
        (tmp_path / "model.safetensors").unlink()
    for body in ('{"n_layer": ' + "1" * 5000 + "}", "[" * 100000 + "]" * 100000):
        (tmp_path / name).write_text(body)
        with pytest.raises(engine.CheckpointError, match=name.replace(".", r"\.")):
            engine.load(str(tmp_path))


def test_a_config_of_a_billion_layers_is_refused_before_the_name_map(tmp_path):
    """The names of 10^9 layers took minutes and GBs before any tensor was looked at."""
    from conftest import small_model
    small_model("llama", n_layer=1).save(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(engine.CheckpointError, match="config.json has 1000000000 layers, and the "
                                                     "checkpoint holds only 12 tensors"):
        engine.load(str(tmp_path))


def test_wrong_tensor_shape(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(engine.CheckpointError, match="mlp.gate.weight.*shape"):
        engine.load(str(d))


def test_tensor_disagreeing_with_config_names_the_directory(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] -= 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(engine.CheckpointError, match=f"^{d}: .*wte.weight.*shape"):
        engine.load(str(d))


def test_tensors_with_no_place_in_the_model_are_refused(tmp_path):
    """A file holding more blocks than config.json says (or an adapter's tensors) would load as
    a different model, silently: refused, naming them. Buffers transformers saves (GPT-2's
    causal mask) and a tied model's copy of lm_head are not weights and are accepted."""
    from conftest import small_model
    for kind, extra_block in (("gpt2", "transformer.h.1.ln_1.weight"), ("llama", "model.layers.1.")):
        d = tmp_path / kind
        small_model(kind, n_layer=2).save(str(d))
        cfg = json.loads((d / "config.json").read_text())
        key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
        cfg[key] = 1
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(engine.CheckpointError, match=f"model of config.json .1 layers. has no "
                                                         f"place for: .*{extra_block}"):
            engine.load(str(d))
    d = tmp_path / "buffers"
    m = small_model("gpt2", n_layer=1)
    m.save(str(d))
    f = st.SafetensorsFile(str(d / "model.safetensors"))
    tensors = {k: f.float32(k) for k in f.keys()}
    st.write(str(d / "model.safetensors"), {**tensors, "transformer.h.0.attn.bias": np.ones((1, 1, 4, 4), np.float32),
                                            "lm_head.weight": tensors["transformer.wte.weight"]})
    assert engine.load(str(d)).params.keys() == m.params.keys()
    st.write(str(d / "model.safetensors"), {**tensors, "score.weight": np.ones((2, 4), np.float32)})
    with pytest.raises(engine.CheckpointError, match="no place for: score.weight"):
        engine.load(str(d))


def test_pickle_only_directory_is_refused(tmp_path, hf_dirs):
    d = copy_of(hf_dirs, tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(engine.CheckpointError, match="safetensors"):
        engine.load(str(d))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    st.write(str(target), {"a": np.zeros(4, np.float32)})
    good = target.read_bytes()

    class Boom:
        shape, nbytes = (4,), 16

        def tobytes(self):
            raise OSError("disk full")

    arrays = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
    real = np.ascontiguousarray
    monkeypatch.setattr(st.np, "ascontiguousarray",
                        lambda a, dtype=None: Boom() if a is arrays["b"] else real(a, dtype=dtype))
    with pytest.raises(engine.CheckpointError, match="m.safetensors: cannot write: disk full"):
        st.write(str(target), arrays)
    assert target.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.safetensors"]


def _snapshot(d) -> dict:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if (d / n).is_file()}


def test_save_over_a_directory_named_config_json_changes_nothing(tmp_path):
    """The destination is checked before anything is replaced: no new weights next to an old
    config, no stray temporary files."""
    from conftest import small_model
    d = tmp_path / "m"
    small_model("gpt2", n_layer=1).save(str(d))
    os.remove(d / "config.json")
    os.mkdir(d / "config.json")
    before = _snapshot(d)
    other = small_model("gpt2", n_layer=1)
    other.params["wte.weight"] += 1.0
    with pytest.raises(engine.InputError, match="config.json exists and is not a file"):
        other.save(str(d))
    assert _snapshot(d) == before
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_failed_save_keeps_the_old_model_whole(tmp_path, monkeypatch):
    from conftest import small_model
    from engine import io
    d = tmp_path / "m"
    old = small_model("llama", n_layer=1)
    old.save(str(d))
    before = _snapshot(d)
    real = io.write_json

    def full_disk(path, obj):   # the last file written fails, after the weights were written
        if path.endswith(os.sep + "config.json"):
            raise engine.CheckpointError(f"{path}: cannot write: No space left on device")
        real(path, obj)

    monkeypatch.setattr(io, "write_json", full_disk)
    new = small_model("llama", n_layer=1, eos_token_id=3)
    new.params["wte.weight"] += 1.0
    with pytest.raises(engine.CheckpointError, match="No space left"):
        new.save(str(d))
    assert _snapshot(d) == before and sorted(os.listdir(d)) == sorted(before)
    with pytest.raises(engine.CheckpointError, match="No space left"):
        new.save(str(tmp_path / "fresh"))
    assert not os.path.exists(tmp_path / "fresh")   # a new directory is not left half-made


def test_write_json_failure_is_named_and_cleaned_up(tmp_path):
    from engine.io import write_json
    os.mkdir(tmp_path / "config.json")
    with pytest.raises(engine.CheckpointError, match=r"config.json: cannot write"):
        write_json(str(tmp_path / "config.json"), {"a": 1})
    with pytest.raises(engine.InputError, match=r"x.json: cannot write as JSON"):
        write_json(str(tmp_path / "x.json"), {"a": object()})
    assert os.listdir(tmp_path) == ["config.json"]


def test_f16_save_refuses_values_beyond_its_range(tmp_path):
    """float16 tops out at 65504: a larger weight would be stored as inf (which tailtune then
    refuses to load). Refused before anything is written, naming the tensor and the value."""
    from conftest import small_model
    model = small_model("llama", n_layer=1)
    model.params["blocks.0.mlp.up.weight"][3, 5] = -7.0e4
    with pytest.raises(engine.InputError, match=r"'model.layers.0.mlp.up_proj.weight': max "
                                                r"\|value\| 70000 .*F16.*'BF16' or 'F32'"):
        model.save(str(tmp_path / "new"), dtype="F16")
    assert not os.path.exists(tmp_path / "new")
    d = tmp_path / "old"
    model.save(str(d))
    before = _snapshot(d)
    with pytest.raises(engine.InputError, match="max"):
        model.save(str(d), dtype="F16")
    assert _snapshot(d) == before and sorted(os.listdir(d)) == sorted(before)
    model.save(str(tmp_path / "bf16"), dtype="BF16")
    assert engine.load(str(tmp_path / "bf16")).params["blocks.0.mlp.up.weight"][3, 5] == -70144.0
    # rounds down to the largest float16, not to inf: allowed
    model.params["blocks.0.mlp.up.weight"][3, 5] = 65519.0
    model.save(str(tmp_path / "f16"), dtype="F16")
    assert engine.load(str(tmp_path / "f16")).params["blocks.0.mlp.up.weight"][3, 5] == 65504.0


@pytest.mark.parametrize("spoil,match", [
    (lambda p: p["blocks.0.ln1.weight"].__setitem__(0, np.nan), "blocks.0.ln1.weight holds NaN"),
    (lambda p: p.__setitem__("ln_f.weight", np.ones(5, np.float32)), r"ln_f.weight is float32 \(5,\)"),
    (lambda p: p.__setitem__("ln_f.weight", np.ones(16)), "ln_f.weight is float64"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, monkeypatch, spoil, match):
    """A NaN weight (a diverged loop), an array of another shape or dtype put in params by
    hand: refused before anything is written, instead of a file engine.load calls corrupt."""
    from conftest import small_model
    model = small_model("llama", n_layer=1)
    spoil(model.params)
    with pytest.raises(engine.InputError, match=match + ".*nothing was saved"):
        model.save(str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(engine.InputError, match="save path is empty"):
        small_model("llama", n_layer=1).save("")
    assert os.listdir(tmp_path) == []


def test_staging_folders_of_killed_saves_are_removed(tmp_path):
    """A save or checkpoint killed outright leaves its <name>.tmp<pid> staging folder; the next
    save removes those whose process is gone and that nothing wrote to for ten minutes, and
    leaves a running process's alone."""
    import subprocess
    from conftest import small_model
    from engine.train import _write_dir
    dead = subprocess.Popen(["true"])   # a pid whose process has ended
    dead.wait()
    model = small_model("llama", n_layer=1)
    d = tmp_path / "m"
    model.save(str(d))
    old = time.time() - 3600

    def staging(path, age=old):
        path.mkdir()
        (path / "model.safetensors.tmp").write_bytes(b"x" * 100)
        for p in (path / "model.safetensors.tmp", path):
            os.utime(p, (age, age))
    staging(d / f".save.tmp{dead.pid}")
    staging(d / f".save.tmp{os.getppid()}")                  # a live process's
    staging(d / f".save.tmp{dead.pid + 1}", time.time())      # written just now: maybe another host's
    staging(tmp_path / f"checkpoint.tmp{dead.pid}")
    model.save(str(d))
    assert sorted(n for n in os.listdir(d) if n.startswith(".")) == sorted(
        [f".save.tmp{os.getppid()}", f".save.tmp{dead.pid + 1}"])
    _write_dir(str(tmp_path / "checkpoint"), lambda t: os.makedirs(t))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m"]


def test_on_windows_no_process_is_probed_with_kill(monkeypatch):
    """os.kill(pid, 0) terminates the process on Windows: there a staging folder's pid is never
    probed (the folder is kept), instead of killing whatever process has that pid now."""
    from engine import io as engine_io
    calls = []
    monkeypatch.setattr(engine_io, "_WINDOWS", True, raising=False)
    monkeypatch.setattr(engine_io.os, "kill", lambda *a: calls.append(a))
    assert engine_io._alive(12345) and calls == []


def test_run_directory_loads_its_final_model(tmp_path):
    """`--model RUN_DIR` of a finished run means RUN_DIR/model; an unfinished run says what to
    use instead of only 'no config.json'."""
    from conftest import small_model
    from engine.io.resolve import resolve_model_path
    model = small_model("gpt2", n_layer=1)
    run = tmp_path / "run"
    model.save(str(run / "model"))
    (run / "metrics.jsonl").write_text("")
    assert resolve_model_path(str(run)) == str(run / "model")
    loaded = engine.load(str(run))
    assert all(np.array_equal(loaded.params[n], p) for n, p in model.params.items())
    unfinished = tmp_path / "unfinished"
    model.save(str(unfinished / "checkpoint"))
    with pytest.raises(engine.CheckpointError, match=r"without a final model/.*"
                                                     r"unfinished/checkpoint.*--resume"):
        engine.load(str(unfinished))
    (tmp_path / "empty").mkdir()
    with pytest.raises(engine.CheckpointError, match="empty: no config.json"):
        engine.load(str(tmp_path / "empty"))


def test_a_config_no_hugging_face_model_holds_is_refused_and_can_still_be_kept(tmp_path):
    """GPT-2 with grouped-query attention trains, but transformers has no such model: save
    refuses before writing anything, names the field and how to keep the work (pickle), and
    the pickled model comes back with its weights and configuration."""
    import pickle
    cfg = engine.Config.gpt2(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                             d_ff=32, max_seq_len=16)
    model = engine.Model(cfg)
    with pytest.raises(engine.ConfigError, match="n_kv_head must equal n_head.*nothing was saved"
                                                 ".*pickle"):
        model.save(str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
    back = pickle.loads(pickle.dumps(model))
    assert back.config == cfg
    assert all(np.array_equal(back.params[n], model.params[n]) for n in model.params)
    x = np.arange(8).reshape(1, 8)
    np.testing.assert_array_equal(back.forward(x), model.forward(x))
    # a Llama whose width is no multiple of its heads (head_dim given apart): transformers'
    # LlamaConfig refuses to load it, so it is not saved as one
    odd = engine.Model(engine.Config.llama(vocab_size=32, n_layer=1, n_head=6, n_kv_head=6,
                                           d_model=50, head_dim=24, d_ff=16, max_seq_len=16))
    with pytest.raises(engine.ConfigError, match="d_model a multiple of n_head.*d_model=50, n_head=6"):
        odd.save(str(tmp_path / "odd"))
    assert not os.path.exists(tmp_path / "odd")


def test_a_failed_save_names_the_target_not_its_staging_folder(tmp_path, monkeypatch):
    """A full disk (or a file-size limit) while saving: the error names the directory the user
    asked for and the reason, not the hidden staging folder inside it."""
    import engine.io as io
    from conftest import small_model
    from engine.train import save_checkpoint

    def too_large(path, *a, **k):
        raise engine.CheckpointError(f"{path}: cannot write: File too large")
    monkeypatch.setattr(io, "write_safetensors", too_large)
    model = small_model("llama", n_layer=1)
    d = str(tmp_path / "m")
    with pytest.raises(engine.CheckpointError) as e:
        model.save(d)
    assert str(e.value) == f"{d}: could not save the model: model.safetensors: cannot write: File too large"
    ck = str(tmp_path / "run" / "checkpoint")
    with pytest.raises(engine.CheckpointError) as e:
        save_checkpoint(ck, model, engine.ByteTokenizer(), engine.AdamW(model), {"step": 1})
    assert str(e.value) == f"{ck}: could not write the checkpoint: File too large"
    assert os.listdir(tmp_path / "run") == []
