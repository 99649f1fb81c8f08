"""The fine-tuning workflow end to end: exact resume after Ctrl-C, the saved model in
transformers, and clear errors for bad runs that lose nothing already saved."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import engine
from engine.cli import main as cli
from conftest import signal_after_steps


def tiny_model_dir(path, seed=0):
    """A small random Llama with the byte tokenizer, saved as a Hugging Face directory."""
    cfg = engine.Config.llama(vocab_size=257, n_layer=4, n_head=4, n_kv_head=2, d_model=64,
                              d_ff=96, max_seq_len=128)
    engine.Model(cfg, seed=seed).save(str(path))
    engine.ByteTokenizer().save(str(path))
    return str(path)


def text_file(path, n_bytes=60_000):
    import inspect
    import json as json_mod
    import textwrap
    text = textwrap.dedent(inspect.getsource(json_mod.decoder) + inspect.getsource(json_mod.encoder))
    path.write_text(text[:n_bytes])
    return str(path)


def run_args(model, data, out, *extra):
    return ["finetune", "--model", model, "--data", data, "--out", out, "--train-last", "2",
            "--steps", "60", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-3",
            "--sample-tokens", "0", *extra]


def weights(d):
    return engine.load(os.path.join(d, "model")).params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return tiny_model_dir(base / "model"), text_file(base / "data.txt")


def test_sigint_then_resume_gives_the_uninterrupted_weights(tiny, tmp_path):
    model, data = tiny
    straight = str(tmp_path / "straight")
    assert cli(run_args(model, data, straight)) == 0
    out = str(tmp_path / "interrupted")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *run_args(model, data, out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 6):
        if time.time() > deadline or proc.poll() is not None:  # wait for a few steps, then Ctrl-C
            proc.kill()
            pytest.fail(f"the run did not reach 6 steps: {proc.communicate()[0][-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log
    assert "interrupted at step" in log
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert 0 < state["step"] < 60, "the signal should land mid-run"
    assert not os.path.exists(os.path.join(out, "model"))
    assert cli(run_args(model, data, out, "--resume", out)) == 0
    a, b = weights(straight), weights(out)
    for n in a:
        assert np.array_equal(a[n], b[n]), n
    steps = [r["step"] for r in map(json.loads, open(metrics)) if "loss" in r]
    assert steps == list(range(1, 61))  # each step logged once


def test_run_outputs_and_frozen_blocks_untouched(tiny, tmp_path):
    model, data = tiny
    out = str(tmp_path / "run")
    assert cli(run_args(model, data, out)) == 0
    assert {"run.json", "metrics.jsonl", "summary.json", "model", "loss.png"} <= set(os.listdir(out))
    assert not os.path.exists(os.path.join(out, "checkpoint"))  # superseded by model/
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["eval_loss_after"] < s["eval_loss_before"]
    base, tuned = engine.load(model).params, weights(out)
    for n in base:
        frozen = not (n.startswith(("blocks.2.", "blocks.3.", "ln_f.")))
        assert np.array_equal(base[n], tuned[n]) == frozen, n
    assert engine.load_tokenizer(os.path.join(out, "model")).encode("abc") == [97, 98, 99]


@pytest.mark.parametrize("kind,name", [("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("llama3", "Llama"),
                                       ("smollm3", "SmolLM3"), ("mistral", "Mistral"),
                                       ("phi3", "Phi3")])
def test_other_families_run_and_load_in_transformers(tmp_path, kind, name):
    """The whole workflow on a Qwen2 (q, k, v biases, tied head), a Qwen3 (q / k norms), a
    Llama with Llama 3's rope scaling, a SmolLM3 (blocks without rope), a Mistral (a sliding
    window as long as the runs' sequences) and a Phi-3 (fused q, k, v and gate, up tensors),
    built by transformers: the trained block's parameters
    change, the frozen ones do not, and transformers loads the run's model to the engine's
    logits."""
    import copy
    import torch
    import transformers
    from conftest import HF_CONFIGS
    window = {"sliding_window": 48} if kind == "mistral" else {}   # the runs' --seq-len
    config = getattr(transformers, f"{name}Config")(**{**copy.deepcopy(HF_CONFIGS[kind]),
                                                       "vocab_size": 257, **window})
    src = tmp_path / "src"
    torch.manual_seed(4)
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(src)
    engine.ByteTokenizer().save(str(src))
    big = engine.load(str(src))
    out = str(tmp_path / "run")
    data = text_file(tmp_path / "data.txt", 20_000)
    assert cli(["finetune", "--model", str(src), "--data", data, "--out", out, "--train-last", "1",
                "--steps", "15", "--batch-size", "4", "--seq-len", "48", "--lr", "3e-3",
                "--sample-tokens", "0"]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["eval_loss_after"] < s["eval_loss_before"]
    tuned = engine.load(os.path.join(out, "model"))
    assert tuned.config.model_type == name.lower()
    assert tuned.config.sliding_window == window.get("sliding_window")
    assert tuned.config.rope_scaling == big.config.rope_scaling == HF_CONFIGS[kind].get("rope_scaling")
    top = f"blocks.{tuned.config.n_layer - 1}."
    for n, a in big.params.items():
        assert np.array_equal(a, tuned.params[n]) == (not n.startswith((top, "ln_f."))), n
    own = top + {"qwen2": "attn.q.bias", "qwen3": "attn.k_norm.weight"}.get(kind, "attn.q.weight")
    assert not np.array_equal(big.params[own], tuned.params[own])
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"),
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == f"{name}ForCausalLM"
    ids = np.random.default_rng(0).integers(0, 257, (2, 30))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(tuned.forward(ids), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---- bad input ------------------------------------------------------------------------------
def fails(capsys, argv, match):
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err, err


def test_malformed_jsonl_names_file_and_line(tiny, tmp_path, capsys):
    model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": }\n')
    fails(capsys, run_args(model, str(bad), str(tmp_path / "o")), f"{bad}:2: not valid JSON")
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"text": "x"}\n')
    fails(capsys, run_args(model, str(bad), str(tmp_path / "o")), f"{bad}:2: a row needs")


def test_empty_data_file(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails(capsys, run_args(tiny[0], str(empty), str(tmp_path / "o")), "the data file is empty")


def test_seq_len_above_context(tiny, tmp_path, capsys):
    fails(capsys, run_args(tiny[0], tiny[1], str(tmp_path / "o")) + ["--seq-len", "500"],
          "--seq-len 500 exceeds the model's context of 128")


def test_train_last_larger_than_depth(tiny, tmp_path, capsys):
    argv = run_args(tiny[0], tiny[1], str(tmp_path / "o"))
    argv[argv.index("--train-last") + 1] = "9"
    fails(capsys, argv, "--train-last 9: the model has 4 blocks")


def test_output_dir_of_another_run_is_left_alone(tiny, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "run.json").write_text('{"other": true}')
    (out / "notes.txt").write_text("keep me")
    fails(capsys, run_args(tiny[0], tiny[1], str(out)), "already holds a different run")
    assert sorted(os.listdir(out)) == ["notes.txt", "run.json"]
    (out / "run.json").unlink()
    fails(capsys, run_args(tiny[0], tiny[1], str(out)), "already holds other files")
    assert (out / "notes.txt").read_text() == "keep me"


def test_the_same_command_again_is_recognised_with_relative_paths(tiny, tmp_path, monkeypatch, capsys):
    """run.json records the data path absolute; the command as typed (relative) is the same run,
    not "a different run" whose directory the message tells the user to delete."""
    model, data = tiny
    monkeypatch.chdir(os.path.dirname(data))
    argv = [a if a != "60" else "2" for a in run_args(model, os.path.basename(data), "rel")]
    assert cli(argv) == 0
    fails(capsys, argv, "already holds this same run, finished")


def test_stopped_before_the_first_step_leaves_no_directory(tiny, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the evaluation before training (minutes on long held-out data): no
    checkpoint can exist yet, so the directory goes, and the same command simply runs again."""
    import engine.trainer as TR
    model, data = tiny
    out = tmp_path / "early"
    argv = [a if a != "60" else "2" for a in run_args(model, data, str(out))]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(TR, "evaluate", interrupted)
        assert cli(argv) == 130
    assert not out.exists()
    assert cli(argv) == 0
    # a --sample-prompt longer than the context is refused before the directory exists
    long = tmp_path / "long"
    fails(capsys, run_args(model, data, str(long), "--sample-prompt", "x" * 300, "--sample-tokens", "5"),
          "--sample-prompt is 300 tokens, the model's context 128")
    assert not long.exists()


def test_save_every_leaves_checkpoints_a_killed_run_resumes_from(tiny, tmp_path):
    """--save-every 3: checkpoint/ holds the latest multiple of 3 while the run goes on, and a
    run killed outright (SIGKILL: no handler runs, nothing is saved at the end) resumes from it
    to the uninterrupted run's weights."""
    model, data = tiny
    straight = str(tmp_path / "straight")
    assert cli(run_args(model, data, straight)) == 0
    out = str(tmp_path / "killed")
    argv = run_args(model, data, out, "--save-every", "3")
    # the run kills itself right after its 7th step, as the out-of-memory killer would
    code = ("import os, signal, sys\nimport engine.train as T\nfrom engine.cli import main\n"
            "real = T.Progress.update\n"
            "def update(self, step, *a):\n"
            "    real(self, step, *a)\n"
            "    if step + 1 == 7:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"T.Progress.update = update\nsys.exit(main({argv!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 6 and not os.path.exists(os.path.join(out, "model"))
    assert cli(argv + ["--resume", out]) == 0
    a, b = weights(straight), weights(out)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_a_run_still_going_is_not_resumed_into(tiny, tmp_path, capsys):
    """--resume of a run whose process is still training (it holds the --out directory's lock,
    as an interrupted one never does): refused before anything is written; once it has ended,
    the same command resumes."""
    import fcntl
    model, data = tiny
    out = str(tmp_path / "busy")
    argv = run_args(model, data, out)
    with signal_after_steps(3):
        assert cli(argv) == 130
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)          # what the still-running process would hold
    try:
        fails(capsys, argv + ["--resume", out], "another process is training into this directory")
    finally:
        os.close(fd)
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    assert cli(argv + ["--resume", out]) == 0


def test_a_filesystem_without_locks_trains_unguarded(monkeypatch, tmp_path):
    import errno
    import fcntl
    import engine.train as T

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    said = []
    assert T._lock_out(str(tmp_path), said.append) is None      # not "another process is training"
    assert "--out is not locked (the filesystem refuses flock" in said[0]


def test_a_platform_without_flock_says_the_run_is_not_locked(monkeypatch, tmp_path):
    """Windows has no fcntl: the run trains, and says that --out is not guarded."""
    import builtins
    import engine.train as T
    real_import = builtins.__import__

    def no_fcntl(name, *a, **k):
        if name == "fcntl":
            raise ImportError("No module named 'fcntl'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_fcntl)
    said = []
    assert T._lock_out(str(tmp_path), said.append) is None
    assert said == [T._UNLOCKED.format(why="this platform has no flock")]


def test_resume_into_a_new_directory(tiny, tmp_path):
    """Ctrl-C after step 6 (sent from inside the run), then --resume into another --out: the
    same weights as a straight run."""
    model, data = tiny
    argv = lambda out: [a if a != "60" else "12" for a in run_args(model, data, out)]  # noqa: E731
    assert cli(argv(str(tmp_path / "straight"))) == 0
    straight = engine.load(str(tmp_path / "straight" / "model")).params
    with signal_after_steps(6, signal.SIGINT):
        assert cli(argv(str(tmp_path / "partial"))) == 130
    new = str(tmp_path / "continued")
    assert cli(argv(new) + ["--resume", str(tmp_path / "partial")]) == 0
    resumed = engine.load(os.path.join(new, "model")).params
    assert all(np.array_equal(straight[n], resumed[n]) for n in straight)


def test_resume_keeps_the_runs_settings_and_works_from_another_directory(tiny, tmp_path, monkeypatch,
                                                                        capsys):
    """A run started with relative paths (model and data) and telemetry / held-out evaluation every few steps,
    interrupted, then resumed from another working directory with only the command the
    interruption prints (pasted into a shell: the folder's name has a space and a quote): the
    resumed steps keep recording, and an explicit flag still wins."""
    import shlex
    import shutil
    model, data = tiny
    work = tmp_path / "my work's"
    work.mkdir()
    shutil.copy(data, work / "data.txt")
    shutil.copytree(model, work / "base")
    monkeypatch.chdir(work)
    argv = run_args("base", "data.txt", "run", "--telemetry-every", "2", "--eval-every", "4")
    argv[argv.index("--steps") + 1] = "12"
    with signal_after_steps(5, signal.SIGINT):
        assert cli(argv) == 130
    printed = capsys.readouterr().out
    command = shlex.split(printed.split("continue with `")[1].split("`")[0])
    fails(capsys, argv, "this same run, unfinished (continue it with --resume")  # the same command again
    monkeypatch.chdir(tmp_path)
    assert command[command.index("--data") + 1] == str(work / "data.txt")
    assert command[command.index("--model") + 1] == str(work / "base")
    assert cli(command[1:]) == 0
    rows = [json.loads(r) for r in open(work / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "telemetry" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in rows if r.get("eval_loss") is not None] == [0, 4, 8, 12]
    # an explicit value replaces the run's, even when it equals the default
    with signal_after_steps(3, signal.SIGINT):
        assert cli(run_args(model, str(work / "data.txt"), "again", "--telemetry-every", "1")) == 130
    assert cli(run_args(model, str(work / "data.txt"), "again", "--telemetry-every", "0",
                        "--resume", "again")) == 0
    rows = [json.loads(r) for r in open(tmp_path / "again" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "telemetry" in r] == [1, 2, 3]


def test_clip_0_still_logs_the_gradient_norm_and_finished_runs_are_not_resumed(tiny, tmp_path, capsys):
    model, data = tiny
    out = str(tmp_path / "r")
    argv = run_args(model, data, out, "--clip", "0")
    argv[argv.index("--steps") + 1] = "2"
    assert cli(argv) == 0
    assert "sample before" not in capsys.readouterr().out   # --sample-tokens 0: no sample lines
    norms = [r["grad_norm"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]
    assert len(norms) == 2 and all(isinstance(g, float) and g > 0 for g in norms)
    fails(capsys, argv + ["--resume", out], "the run finished")


def test_rerunning_a_finished_run_says_so(tiny, tmp_path, capsys):
    out = str(tmp_path / "done")
    argv = run_args(tiny[0], tiny[1], out)
    argv[argv.index("--steps") + 1] = "2"
    assert cli(argv) == 0
    before = sorted(os.listdir(out))
    fails(capsys, argv, "already holds this same run, finished")
    assert sorted(os.listdir(out)) == before


def test_resume_from_another_model(tiny, tmp_path, capsys):
    model, data = tiny
    out = str(tmp_path / "r")
    proc_args = run_args(model, data, out)
    proc_args[proc_args.index("--steps") + 1] = "3"
    proc_args += ["--save-every", "1"]
    # a run stopped after its checkpoint: simulate by keeping a checkpoint copy
    assert cli(proc_args) == 0
    other = tiny_model_dir(tmp_path / "other", seed=5)
    ck = os.path.join(out, "ck")
    from engine.train import save_checkpoint  # write a checkpoint as a run would
    m = engine.load(model).train_last(2)
    opt = engine.AdamW(m)
    run = json.load(open(os.path.join(out, "run.json")))
    save_checkpoint(ck, m, engine.load_tokenizer(model), opt,
                    {"step": 1, "data": {"epoch": 0, "cursor": 4}, "args": run["args"],
                     "base_fingerprint": run["base_fingerprint"], "eval_before": 1.0})
    before = sorted(os.listdir(out))
    fails(capsys, proc_args[:2] + [other] + proc_args[3:] + ["--resume", ck], "trained from a different model")
    assert sorted(os.listdir(out)) == before


def test_failed_final_save_leaves_a_checkpoint_and_resume_finishes(tiny, tmp_path, monkeypatch, capsys):
    """Every step done, then model/ cannot be written (a full disk): the error names model/,
    no half-written directory stays, the last step is checkpointed, and --resume only redoes
    the final part, ending with the weights of a run that never failed."""
    import engine.train as T
    model, data = tiny

    def short(out, *extra):
        a = run_args(model, data, out, *extra)
        a[a.index("--steps") + 1] = "5"
        return a

    straight = str(tmp_path / "straight")
    assert cli(short(straight)) == 0
    out = str(tmp_path / "full")
    real = T.save_model

    def full_disk(m, path, *a, **k):   # only model/ fails; the checkpoint written after it fits
        if os.path.basename(path).startswith("checkpoint"):
            return real(m, path, *a, **k)
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "model.safetensors"), "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "save_model", full_disk)
    assert cli(short(out)) == 2
    err = capsys.readouterr()
    assert os.path.join(out, "model") in err.err and "No space left on device" in err.err
    assert "--resume" in err.out
    assert sorted(os.listdir(out)) == ["checkpoint", "metrics.jsonl", "run.json"]
    monkeypatch.setattr(T, "save_model", real)
    assert cli(short(out) + ["--resume", out]) == 0
    a, b = weights(straight), weights(out)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4, 5, 5]          # the final evaluation's line once


def test_metrics_lines_are_strict_json(tmp_path):
    from engine.train import _log_metric
    p = str(tmp_path / "m.jsonl")
    _log_metric(p, {"step": 1, "loss": float("nan"),
                    "telemetry": {"blocks.0": {"cka_to_pretrained": float("nan"), "drift": float("inf")}}},
                truncate=True)
    rec = json.loads(open(p).read(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert rec == {"step": 1, "loss": None, "telemetry": {"blocks.0": {"cka_to_pretrained": None, "drift": None}}}


def test_examples_without_targets_are_left_out_not_diverged(tiny, tmp_path, capsys):
    """Prompts longer than --seq-len leave no loss token; with batches of one such an example
    alone made a NaN loss that stopped the run as diverged. They are left out, with a warning."""
    model, _ = tiny
    rows = [{"prompt": "p" * (200 if i % 3 == 0 else 5), "completion": " ok"} for i in range(9)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert cli(["finetune", "--model", model, "--data", str(data), "--out", str(out), "--seq-len", "64",
                "--batch-size", "1", "--epochs", "1", "--eval-fraction", "0", "--sample-tokens", "0"]) == 0
    assert "3 of 9 examples have no loss tokens" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert max(steps) == 6                             # one epoch over the 6 with targets


def test_accumulated_micro_batches_equal_one_batch(tiny, tmp_path):
    """--batch-size 2 --grad-accum 2 is the step of --batch-size 4 on the same 4 examples
    (loss, gradient norm, weights), even when the micro-batches hold very different numbers of
    target positions: each weighs by its share of them, not by 1 / grad_accum."""
    model, _ = tiny
    rows = [{"prompt": f"question {i}?", "completion": " " + ("a long answer " * 3 if i % 4 < 2 else "ok")}
            for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {}
    for b, acc in ((4, 1), (2, 2)):
        out = tmp_path / f"b{b}"
        assert cli(["finetune", "--model", model, "--data", str(data), "--out", str(out),
                    "--seq-len", "64", "--batch-size", str(b), "--grad-accum", str(acc),
                    "--steps", "1", "--eval-fraction", "0", "--sample-tokens", "0",
                    "--train-last", "4", "--seed", "3"]) == 0
        step = next(r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r)
        got[b] = (step, weights(str(out)))
    (m4, w4), (m2, w2) = got[4], got[2]
    assert m2["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m2["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    for n in w4:
        np.testing.assert_allclose(w2[n], w4[n], atol=2e-6, err_msg=n)


def test_epochs_count_short_last_batches(tiny, tmp_path):
    """9 examples in batches of 8 are 2 batches an epoch (8 + 1): --epochs 2 is 4 steps."""
    model, _ = tiny
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(9)))
    out = tmp_path / "o"
    assert cli(["finetune", "--model", model, "--data", str(data), "--out", str(out), "--seq-len", "32",
                "--batch-size", "8", "--epochs", "2", "--eval-fraction", "0", "--sample-tokens", "0"]) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 4


def test_epochs_with_grad_accum_draw_each_example_once(tiny, tmp_path, monkeypatch):
    """37 examples in batches of 4 are 10 batches an epoch; --grad-accum 4 makes 3 steps, the
    last one accumulating the 2 batches left, not 4 (which would train 8 examples twice)."""
    from engine import data as D
    model, _ = tiny
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(37)))
    drawn = []
    real_next = D.Batches.next

    def next_(self):
        batch = real_next(self)
        drawn.extend(int(i) for i in batch[2])
        return batch
    monkeypatch.setattr(D.Batches, "next", next_)
    out = tmp_path / "o"
    assert cli(["finetune", "--model", model, "--data", str(data), "--out", str(out), "--seq-len", "32",
                "--batch-size", "4", "--grad-accum", "4", "--epochs", "1", "--eval-fraction", "0",
                "--sample-tokens", "0"]) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 3
    assert sorted(drawn) == list(range(37))


def test_logged_lr_is_the_highest_rate_applied(tiny, tmp_path, monkeypatch):
    """Under FreezeOut the blocks anneal their own rates while the global one only warms up:
    the logged lr is the highest rate an update used at that step, not the global rate."""
    model, data = tiny
    applied = {}
    real_update = engine.AdamW._update

    def update(self, name, p, g, st):
        step = len(applied_steps)
        applied.setdefault(step, []).append(self.lr * self.lr_scale.get(name, 1.0))
        return real_update(self, name, p, g, st)
    applied_steps = []
    real_step = engine.AdamW.step

    def step_(self):
        real_step(self)
        applied_steps.append(1)
    monkeypatch.setattr(engine.AdamW, "_update", update)
    monkeypatch.setattr(engine.AdamW, "step", step_)
    out = tmp_path / "o"
    assert cli(run_args(model, data, str(out), "--steps", "12", "--warmup", "2", "--schedule",
                        "freezeout", "--eval-fraction", "0")) == 0
    logged = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert len(logged) == 12
    assert logged == pytest.approx([max(applied[s]) for s in range(12)], rel=1e-12)
    assert logged[-1] < 0.5 * 1e-3      # annealed, where the global rate stays at --lr 1e-3


def test_logged_tokens_leave_padding_out(tiny, tmp_path):
    """A step's `tokens` (and tokens_per_s) count its examples' input tokens, not the padded
    batch: 4 rows of 3 inputs and 4 of 12 are 60, where the padded batch holds 8 x 12."""
    model, _ = tiny
    data = tmp_path / "d.jsonl"   # byte tokens: "q" + " a" + EOS = 4, 3 of them inputs
    data.write_text("".join(json.dumps({"prompt": "q" * (1 + 9 * (i % 2)), "completion": " a"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "o"
    assert cli(["finetune", "--model", model, "--data", str(data), "--out", str(out), "--seq-len", "32",
                "--batch-size", "8", "--steps", "1", "--eval-fraction", "0", "--sample-tokens", "0"]) == 0
    rec = next(r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r)
    assert rec["tokens"] == 4 * 3 + 4 * 12
    assert rec["tokens_per_s"] > 0


def test_resume_refuses_data_whose_contents_changed(tiny, tmp_path, capsys):
    from conftest import signal_after_steps
    model, data = tiny
    mine = tmp_path / "d.txt"
    mine.write_text(open(data).read())
    out = str(tmp_path / "r")
    argv = run_args(model, str(mine), out)
    with signal_after_steps(2):
        assert cli(argv) == 130
    mine.write_text(open(data).read()[::-1])            # same name, other contents
    fails(capsys, argv + ["--resume", out], "the data changed since the checkpoint")


def test_long_evaluations_show_progress(tiny, tmp_path, capsys):
    import io
    from engine.train import EvalProgress
    from engine.trainer import evaluate
    from engine import data as D
    model_dir, data = tiny
    model, tok = engine.load(model_dir), engine.load_tokenizer(model_dir)
    ex = D.Examples(D.tokenize_file(data, tok), 32)
    calls = []
    loss = evaluate(model, ex, np.arange(10), 4, 0, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and np.isfinite(loss)
    calls.clear()
    evaluate(model, ex, np.arange(10), 4, 0, max_batches=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]
    out = io.StringIO()
    quiet, shown = EvalProgress(stream=out), EvalProgress("eval", stream=out, after=0, every=0)
    quiet(1, 3)                                        # a quick evaluation says nothing
    assert out.getvalue() == ""
    shown(1, 3)
    shown(3, 3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval: batch 1/3 |") and lines[1].startswith("eval: batch 3/3 |")
    fresh = tmp_path / "fresh.txt"
    fresh.write_text(open(data).read()[:3000])
    assert cli(["eval", "--model", model_dir, "--data", str(fresh), "--seq-len", "32"]) == 0
    assert f"tokenizing {fresh}" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["forward", "metrics", "eval"])
def test_a_step_that_fails_keeps_the_steps_before_it(tiny, tmp_path, monkeypatch, capsys, where):
    """Out of memory in step 4's forward or in the held-out evaluation after step 3, or a full
    disk appending step 3's metrics line: the error is one line naming the problem (and the
    file), the steps already done are written to a checkpoint (not lost, as they were without
    --save-every), and --resume ends with the weights of a run that never failed and a line
    for every step (step 3's as far as it got: without its held-out loss in the eval case)."""
    import engine.train as T
    model, data = tiny

    def short(out, *extra):
        a = run_args(model, data, out, "--eval-every", "3", *extra)
        a[a.index("--steps") + 1] = "6"
        return a

    straight = str(tmp_path / "straight")
    assert cli(short(straight)) == 0
    out = str(tmp_path / "failed")
    calls = {"n": 0}
    if where in ("forward", "eval"):
        import engine.trainer as TR
        real = TR._forward

        def failing(model, x, y, idx, cache, grad=True):
            calls["n"] += grad
            if (calls["n"] == 4 and grad) if where == "forward" else (calls["n"] == 3 and not grad):
                raise MemoryError("Unable to allocate 1.91 GiB for an array")
            return real(model, x, y, idx, cache, grad)
        monkeypatch.setattr(TR, "_forward", failing)
    else:
        import builtins
        real = builtins.open

        def failing(path, mode="r", *a, **k):   # the third line appended: step 3's
            if str(path).endswith("metrics.jsonl") and mode == "a":
                calls["n"] += 1
                if calls["n"] == 3:
                    raise OSError(28, "No space left on device")
            return real(path, mode, *a, **k)
        monkeypatch.setattr(T, "open", failing, raising=False)
    assert cli(short(out)) == 2
    printed = capsys.readouterr()
    if where != "metrics":
        assert "out of memory (Unable to allocate 1.91 GiB" in printed.err
    else:
        assert os.path.join(out, "metrics.jsonl") in printed.err and "No space left" in printed.err
    assert "Traceback" not in printed.err
    assert "training stopped after step 3" in printed.out and "--resume" in printed.out
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 3
    if where == "metrics":
        monkeypatch.delattr(T, "open")
    else:
        monkeypatch.setattr(TR, "_forward", real)
    assert cli(short(out) + ["--resume", out]) == 0
    a, b = weights(straight), weights(out)
    assert all(np.array_equal(a[n], b[n]) for n in a)

    def steps(d):
        return [json.loads(line)["step"] for line in open(os.path.join(d, "metrics.jsonl"))]
    assert steps(out) == steps(straight) == [0, 1, 2, 3, 4, 5, 6, 6]


def test_out_of_memory_while_a_schedule_adds_a_block_keeps_the_last_good_checkpoint(
        tiny, tmp_path, monkeypatch, capsys):
    """The optimizer state of a block a schedule unfreezes cannot be allocated: the trainable
    set and the optimizer state are left as they were (not half changed), so the steps done are
    checkpointed (over the --save-every one of step 2) and --resume ends as a run that never
    failed."""
    model, data = tiny

    def args(out, *extra):
        a = run_args(model, data, out, "--schedule", "gradual", "--schedule-every", "3",
                     "--save-every", "2", *extra)
        a[a.index("--steps") + 1] = "5"
        return a
    straight = str(tmp_path / "straight")
    assert cli(args(straight)) == 0
    out = str(tmp_path / "failed")
    real = engine.AdamW._new_state
    grown = {"n": 0}

    def no_memory(self, p):
        if self.model.trainable_blocks() == [1, 2, 3]:   # step 4: block 1 joins
            grown["n"] += 1
            raise MemoryError("Unable to allocate")
        return real(self, p)
    monkeypatch.setattr(engine.AdamW, "_new_state", no_memory)
    assert cli(args(out)) == 2
    assert grown["n"] == 1 and "training stopped after step 3" in capsys.readouterr().out
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 3
    monkeypatch.setattr(engine.AdamW, "_new_state", real)
    assert cli(args(out, "--resume", out)) == 0
    a, b = weights(straight), weights(out)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_a_summary_that_cannot_be_written_leaves_the_run_resumable(tiny, tmp_path, monkeypatch,
                                                                      capsys):
    """model/ is written, then summary.json is not (a full disk): the error says where the
    model is, the checkpoint stays, and --resume finishes the run; a plot that cannot be
    written is a note, not a failed run."""
    import engine.train as T
    model, data = tiny
    a = run_args(model, data, str(tmp_path / "r"))
    a[a.index("--steps") + 1] = "3"
    real = T.write_json

    def full(path, obj):
        if path.endswith("summary.json"):
            raise engine.CheckpointError(f"{path}: cannot write: No space left on device")
        return real(path, obj)
    monkeypatch.setattr(T, "write_json", full)
    assert cli(a + ["--save-every", "2"]) == 2      # with a checkpoint: --resume writes it
    err = capsys.readouterr().err
    assert f"the fine-tuned model is in {tmp_path / 'r' / 'model'}" in err and "--resume" in err
    assert os.path.isdir(tmp_path / "r" / "checkpoint")
    b = run_args(model, data, str(tmp_path / "s"))
    b[b.index("--steps") + 1] = "3"
    assert cli(b) == 2                               # without one, the model is the result
    assert "--resume" not in capsys.readouterr().err
    fails(capsys, b, "this same run, finished (its model is in")
    monkeypatch.setattr(T, "write_json", real)

    def no_room(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T, "_plot", no_room)
    assert cli(a + ["--save-every", "2", "--resume", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "note: no loss.png (No space left on device)" in out and "fine-tuned model:" in out
    assert os.path.exists(tmp_path / "r" / "summary.json")
    assert not os.path.exists(tmp_path / "r" / "checkpoint")


def test_a_metrics_line_cut_off_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    """The disk fills in the middle of a metrics line: the part written is removed, so the
    line written again later (or the next one) does not join a fragment into a line that a
    resume then refuses."""
    import builtins
    import engine.train as T
    p = str(tmp_path / "metrics.jsonl")
    T._log_metric(p, {"step": 0, "eval_loss": 1.0}, truncate=True)
    real = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:7])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "open", lambda path, mode="r", *a, **k: Full(real(path, mode, *a, **k)),
                        raising=False)
    with pytest.raises(engine.CheckpointError, match="metrics.jsonl: cannot write"):
        T._log_metric(p, {"step": 1, "loss": 2.0})
    monkeypatch.delattr(T, "open")
    T._log_metric(p, {"step": 1, "loss": 2.0})
    assert [json.loads(line)["step"] for line in open(p)] == [0, 1]
