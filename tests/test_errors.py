"""Bad input gets an engine error naming the problem, before any kernel runs."""
import os

import numpy as np
import pytest

import engine


@pytest.fixture(scope="module")
def model():
    cfg = engine.Config.gpt2(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=12)
    return engine.Model(cfg)


def test_token_id_out_of_range(model):
    with pytest.raises(engine.InputError, match="id 50, outside the vocabulary 0..49"):
        model.forward(np.array([[1, 2, 50]]))
    with pytest.raises(engine.InputError, match="id -1"):
        model.forward(np.array([[1, -1]]))


def test_target_out_of_range_and_ignore_index(model):
    tokens = np.array([[1, 2, 3]])
    with pytest.raises(engine.InputError, match="targets holds id 77"):
        model.forward(tokens, np.array([[1, 77, 2]]))
    with pytest.raises(engine.InputError, match="targets holds id -5"):
        model.forward(tokens, np.array([[1, -5, 2]]))
    assert np.isfinite(model.forward(tokens, np.array([[-100, 4, 2]])))
    assert np.isnan(model.forward(tokens, np.full((1, 3), -100)))  # nothing to average, as torch


def test_sequence_longer_than_positions(model):
    with pytest.raises(engine.InputError, match="sequence length 13 exceeds the model's context of 12"):
        model.forward(np.zeros((1, 13), np.int64))


@pytest.mark.parametrize("bad,match", [
    (np.zeros((1, 4), np.float32), "integers, got dtype float32"),
    (np.zeros(4, np.int64), "2-D .batch, time., got shape \\(4,\\)"),
    (np.zeros((1, 2, 3), np.int64), "2-D"),
    (np.zeros((0, 3), np.int64), "empty"),
    ("hello", "2-D integer array"),
])
def test_wrong_dtype_or_rank(model, bad, match):
    with pytest.raises(engine.InputError, match=match):
        model.forward(bad)


def test_targets_shape_mismatch(model):
    with pytest.raises(engine.InputError, match="targets shape"):
        model.forward(np.zeros((2, 3), np.int64), np.zeros((2, 4), np.int64))


def test_backward_without_forward():
    m = engine.Model(engine.Config.gpt2(vocab_size=20, n_layer=1, n_head=1, d_model=8, max_seq_len=8))
    with pytest.raises(engine.InputError, match="needs the tape of a forward"):
        m.backward()
    m.forward(np.zeros((1, 3), np.int64))  # no targets: nothing to differentiate
    with pytest.raises(engine.InputError, match="needs the tape of a forward"):
        m.backward()
    m.forward(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64))
    m.backward()
    with pytest.raises(engine.InputError, match="needs the tape of a forward"):
        m.backward()  # the tape is consumed
    m.forward(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64))
    m.forward(np.zeros((1, 3), np.int64))   # an evaluation in between replaces the tape
    with pytest.raises(engine.InputError, match="any later forward"):
        m.backward()


def test_freeze_pattern_matching_nothing(model):
    with pytest.raises(engine.InputError, match="'blocks.9.\\*' matches no parameter"):
        model.freeze("blocks.9.*")
    with pytest.raises(engine.InputError, match="matches no parameter"):
        model.unfreeze("transformer.h.0.*")


@pytest.mark.parametrize("k", [-1, 3, 1.5])
def test_train_last_out_of_range(model, k):
    with pytest.raises(engine.InputError, match="0..2"):
        model.train_last(k)


def test_bad_config():
    with pytest.raises(engine.ConfigError, match="n_head=6 must be a multiple of n_kv_head=4"):
        engine.Config.llama(n_head=6, n_kv_head=4, d_model=48)
    with pytest.raises(engine.ConfigError, match="not divisible"):
        engine.Config.gpt2(d_model=10, n_head=3)
    with pytest.raises(engine.ConfigError, match="norm="):
        engine.Config(norm="batchnorm")


def test_errors_are_value_errors_too(model):
    """Callers catching ValueError (the usual habit for bad arguments) still catch these."""
    with pytest.raises(ValueError):
        model.forward(np.array([[99]]))


def test_warns_when_torch_loaded_openmp_first():
    """torch loaded first initializes libgomp with spinning threads, which Numba then shares:
    tailtune says so (and what to do) instead of silently running slower."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda code, **kw: subprocess.run([sys.executable, "-c", code], capture_output=True,  # noqa: E731
                                            text=True, timeout=300, env={**env, **kw})
    late = run("import torch; import engine")
    assert late.returncode == 0 and "OMP_WAIT_POLICY=PASSIVE" in late.stderr
    assert "OMP_WAIT_POLICY" not in run("import engine; import torch").stderr
    assert "OMP_WAIT_POLICY" not in run("import torch; import engine", OMP_WAIT_POLICY="passive").stderr
    # Numba's workqueue layer starts no OpenMP threads: nothing to slow down
    assert "OMP_WAIT_POLICY" not in run("import torch; import engine",
                                        NUMBA_THREADING_LAYER="workqueue").stderr


def test_compiled_stamp_is_the_same_for_every_name_of_the_interpreter(monkeypatch):
    """python, python3 and the console script's python3.11 are one interpreter sharing one
    cache: a second name must not compile (and say so) again."""
    import sys
    from engine.warmup import _stamp
    before = _stamp()
    monkeypatch.setattr(sys, "executable", "/elsewhere/bin/python3.11")
    assert _stamp() == before


def test_a_stamp_folder_that_refuses_writes_sends_the_stamp_home(monkeypatch, tmp_path):
    """A read-only install that os.access calls writable (Windows says so of every folder):
    the compiled-kernels stamp goes to the user's cache instead of failing the model's
    construction, and the next process finds it there and compiles nothing."""
    import subprocess
    from engine import warmup
    blocker = tmp_path / "install"
    blocker.write_text("a file where the stamp's folder would be")   # makedirs / open fail
    monkeypatch.setattr(warmup, "_stamp", lambda: str(blocker / "tailtune-compiled-x"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runs = []
    monkeypatch.setattr(warmup.subprocess, "run",
                        lambda *a, **k: runs.append(a) or subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(warmup, "_done", False)
    monkeypatch.delenv("TAILTUNE_WARMUP_CHILD", raising=False)
    monkeypatch.delenv("NUMBA_DISABLE_JIT", raising=False)
    warmup.ensure_compiled(quiet=True)
    assert len(runs) == 1 and (tmp_path / "home" / ".cache" / "tailtune" / "tailtune-compiled-x").exists()
    monkeypatch.setattr(warmup, "_done", False)
    warmup.ensure_compiled(quiet=True)
    assert len(runs) == 1


def test_optional_packages_missing_or_broken_are_told_apart(monkeypatch, tmp_path):
    """A missing optional package says how to install it; one that is installed but fails to
    import (gguf 0.10 needs sentencepiece without declaring it) names what is missing instead
    of claiming the package is absent."""
    import sys
    from engine.errors import optional_import
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(engine.CheckpointError, match=r"reading GGUF files needs the 'gguf' package: "
                                                     r"pip install 'tailtune\[hf\]'"):
        optional_import("gguf", error=engine.CheckpointError, what="reading GGUF files")
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import sentencepiece_not_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(engine.CheckpointError, match="'brokenpkg' package is installed but does "
                                                     "not import .*sentencepiece_not_here"):
        optional_import("brokenpkg", error=engine.CheckpointError, what="x")


def test_a_compile_stamp_vouches_for_its_own_kernel_cache_only(monkeypatch, tmp_path):
    """A stamp sent to the home folder (its cache's folder refused it) must not make a process
    with another, empty NUMBA_CACHE_DIR skip compiling: that process would run fresh code, not
    reproduced bit for bit by later runs."""
    from engine.warmup import _stamp
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "a"))
    a = _stamp()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "b"))
    assert os.path.basename(_stamp()) != os.path.basename(a)


@pytest.mark.parametrize("returncode,output,match", [
    (-9, "", r"killed by SIGKILL \(out of memory\?\)"),
    (1, "Traceback ...\nOpenBLAS error: Memory allocation still failed after 10 retries\n",
     r"exit status 1: Traceback ... \| OpenBLAS error: Memory allocation still failed"),
])
def test_a_failed_compile_is_one_error_and_the_next_try_compiles_again(monkeypatch, tmp_path,
                                                                       returncode, output, match):
    """The compiling child killed (the out-of-memory killer) or failing: an engine error saying
    why (the CLI prints it on one line), not a RuntimeError with blank lines; and a caller that
    tries again compiles again instead of running fresh code."""
    import subprocess
    from engine import warmup
    monkeypatch.setattr(warmup, "_stamp", lambda: str(tmp_path / "tailtune-compiled-x"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    runs = []
    monkeypatch.setattr(warmup.subprocess, "run", lambda *a, **k: runs.append(a) or
                        subprocess.CompletedProcess(a, returncode, output, ""))
    monkeypatch.setattr(warmup, "_done", False)
    monkeypatch.delenv("TAILTUNE_WARMUP_CHILD", raising=False)
    monkeypatch.delenv("NUMBA_DISABLE_JIT", raising=False)
    for attempt in (1, 2):
        with pytest.raises(engine.TailtuneError, match="compiling the kernels failed.*" + match):
            warmup.ensure_compiled(quiet=True)
        assert len(runs) == attempt
