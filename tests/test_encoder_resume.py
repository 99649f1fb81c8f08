"""Checkpoints and --resume of encoder runs (the real all-MiniLM-L6-v2): a run stopped by Ctrl-C
or by a failure, then resumed, ends with the weights, metrics and telemetry of the run that was
never stopped, bit for bit, under a freezing schedule; what a resume refuses."""
import json
import os
import signal

import numpy as np
import pytest

import engine
from engine.cli import main as cli
from engine.errors import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [json.loads(x) for x in open(os.path.join(HERE, "..", "examples", "claims",
                                                 "category_train.jsonl"))]


def _data(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _argv(minilm, data, out, *extra):
    return ["finetune", "--model", minilm, "--data", data, "--eval-fraction", "0.25",
            "--steps", "20", "--batch-size", "4", "--seq-len", "40", "--lr", "1e-3",
            "--eval-every", "6", "--out", str(out), *extra]


def _lines(out):
    """metrics.jsonl's lines, the measured seconds aside."""
    return [{k: v for k, v in r.items() if k != "step_s"}
            for r in map(json.loads, open(out / "metrics.jsonl"))]


def _same_run(a, b):
    """Two finished runs: the same weights bit for bit, the same metrics lines (every step's
    record and every evaluation, nothing more) and evaluations."""
    wa, wb = engine.load(str(a / "model")).params, engine.load(str(b / "model")).params
    assert all(np.array_equal(wa[n], wb[n]) for n in wa)
    assert _lines(a) == _lines(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["final_eval"] == sb["final_eval"] and sa["base_eval"] == sb["base_eval"]
    assert sa["trainable_params"] == sb["trainable_params"]
    assert not (b / "checkpoint").exists()          # superseded by model/


@pytest.mark.parametrize("task,extra", [
    # (with dropout: each micro-batch's masks drawn again as the straight run drew them)
    ("classifier", ["--schedule", "autofreeze", "--schedule-every", "3", "--train-last", "3",
                    "--autofreeze-threshold", "10", "--telemetry-every", "4", "--dropout", "0.1"]),
    ("sentence", ["--schedule", "lisa", "--schedule-every", "4", "--train-last", "2"]),
    # the rows computed before the stop are read back from the disk cache by the resumed run
    ("classifier", ["--train-last", "2", "--prefix-cache", "disk"]),
])
def test_ctrl_c_then_resume_gives_the_uninterrupted_run(minilm, tmp_path, monkeypatch, task, extra):
    rows = ROWS[:24] if task == "classifier" else [
        {"anchor": r["text"].split(". ")[0], "positive": r["text"]} for r in ROWS[:24]]
    data = _data(tmp_path / "d.jsonl", rows)
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache-straight"))
    assert cli(_argv(minilm, data, straight, *extra)) == 0
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache-parted"))   # its own disk cache

    import engine.encoder_train as et
    real = et._Order.take
    calls = {"n": 0}

    def take(self, size, min_batch):     # Ctrl-C during step 9 (a batch a step)
        calls["n"] += 1
        if calls["n"] == 9:
            signal.raise_signal(signal.SIGINT)
        return real(self, size, min_batch)
    monkeypatch.setattr(et._Order, "take", take)
    assert cli(_argv(minilm, data, parted, *extra)) == 130
    monkeypatch.setattr(et._Order, "take", real)
    summary = json.loads((parted / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 9
    assert (parted / "checkpoint").is_dir() and (parted / "model").is_dir()
    # only the run's own command and --resume: its arguments come from the checkpoint
    assert cli(["finetune", "--model", minilm, "--data", data, "--out", str(parted),
                "--resume", str(parted)]) == 0
    _same_run(straight, parted)
    if "disk" in extra:
        first, resumed = (json.loads((d / "summary.json").read_text())["prefix_cache"]
                          for d in (straight, parted))
        # the 9 steps before the stop drew 36 texts: every one of the 18 training texts
        assert first["reused"] == 0 and resumed["reused"] == 18


@pytest.mark.parametrize("where", ["batch", "forward"])
def test_a_failed_step_leaves_a_checkpoint_to_resume(minilm, tmp_path, monkeypatch, capsys, where):
    """A step that fails after 7 were done (drawing its batch, or in its forward, after the
    batch order has moved on) checkpoints those 7, with the batch order and AutoFreeze's norms
    as they were after step 7; --save-every's earlier checkpoint is replaced; the resumed run is
    the straight one."""
    data = _data(tmp_path / "d.jsonl", ROWS[:24])
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    extra = ["--train-last", "3", "--save-every", "5", "--schedule", "autofreeze",
             "--schedule-every", "2", "--autofreeze-threshold", "10"]
    assert cli(_argv(minilm, data, straight, *extra)) == 0

    import engine.classify as C
    import engine.encoder_train as et
    cls, name = (et._Order, "take") if where == "batch" else (C.ClassifierTask, "step")
    real = getattr(cls, name)
    calls = {"n": 0}

    def failing(self, *a):
        calls["n"] += 1
        if calls["n"] == 8:
            raise OSError(28, "No space left on device")
        return real(self, *a)
    monkeypatch.setattr(cls, name, failing)
    assert cli(_argv(minilm, data, failed, *extra)) == 2
    err, out = capsys.readouterr()[::-1]
    assert "No space left on device" in err
    assert "the steps done are in a checkpoint: continue with" in out
    state = json.loads((failed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["task"] == "classification"
    monkeypatch.setattr(cls, name, real)
    assert cli(_argv(minilm, data, failed, *extra, "--resume", str(failed))) == 0
    _same_run(straight, failed)


def test_a_second_ctrl_c_in_the_final_save_keeps_the_steps(minilm, tmp_path, monkeypatch):
    """All steps done, then Ctrl-C twice while the final evaluation runs: nothing saved as the
    model, but a checkpoint of the last step, from which --resume writes what the straight run
    wrote."""
    data = _data(tmp_path / "d.jsonl", ROWS[:24])
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert cli(_argv(minilm, data, straight, "--train-last", "1")) == 0
    import engine.classify as C
    real = C.ClassifierTask.evaluate
    calls = {"n": 0}

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == 5:     # before, steps 6, 12 and 18, then the final one
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(C.ClassifierTask, "evaluate", evaluate)
    assert cli(_argv(minilm, data, cut, "--train-last", "1")) == 130
    monkeypatch.setattr(C.ClassifierTask, "evaluate", real)
    assert json.loads((cut / "checkpoint" / "trainer_state.json").read_text())["step"] == 20
    assert not (cut / "model").exists()
    assert cli(_argv(minilm, data, cut, "--train-last", "1", "--resume", str(cut))) == 0
    _same_run(straight, cut)


def test_a_failure_inside_an_evaluation_is_evaluated_again(minilm, tmp_path, monkeypatch):
    """The --eval-every evaluation after step 10 fails (the steps are whole, so a checkpoint of
    step 10 is written): the resumed run evaluates step 10 first, and its metrics lines are the
    straight run's."""
    data = _data(tmp_path / "d.jsonl", ROWS[:24])
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    extra = ["--train-last", "1", "--eval-every", "5"]
    assert cli(_argv(minilm, data, straight, *extra)) == 0
    import engine.classify as C
    real = C.ClassifierTask.evaluate
    calls = {"n": 0}

    def evaluate(self):
        calls["n"] += 1
        if calls["n"] == 3:     # before training, after step 5, after step 10
            raise MemoryError
        return real(self)
    monkeypatch.setattr(C.ClassifierTask, "evaluate", evaluate)
    assert cli(_argv(minilm, data, failed, *extra)) == 2
    monkeypatch.setattr(C.ClassifierTask, "evaluate", real)
    assert json.loads((failed / "checkpoint" / "trainer_state.json").read_text())["step"] == 10
    assert cli(_argv(minilm, data, failed, *extra, "--resume", str(failed))) == 0
    _same_run(straight, failed)


def test_what_a_resume_refuses(minilm, tmp_path, monkeypatch, capsys):
    data = _data(tmp_path / "d.jsonl", ROWS[:24])
    out = tmp_path / "run"
    assert cli(_argv(minilm, data, out, "--train-last", "1", "--steps", "4")) == 0
    capsys.readouterr()
    # a finished run has nothing to resume
    assert cli(_argv(minilm, data, out, "--resume", str(out))) == 2
    assert "the run finished" in capsys.readouterr().err
    # one that failed after step 4: its own training arguments only, and its own data
    from engine.train import TrainArgs, finetune
    import engine.encoder_train as et
    real = et._Order.take

    def take(self, size, min_batch):
        if self.at >= 16:               # the fifth batch of 4
            raise ZeroDivisionError
        return real(self, size, min_batch)
    monkeypatch.setattr(et._Order, "take", take)
    args = TrainArgs(model=minilm, data=data, out=str(tmp_path / "b"), eval_fraction=0.25,
                     steps=8, batch_size=4, seq_len=40, train_last=1)
    with pytest.raises(ZeroDivisionError):
        finetune(args, log=lambda m: None)
    monkeypatch.setattr(et._Order, "take", real)
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert cli(["finetune", "--model", minilm, "--data", data, "--out", str(tmp_path / "b"),
                "--lr", "5e-4", "--resume", str(tmp_path / "b")]) == 2
    assert "--lr 0.0005 (the run has 0.0001)" in capsys.readouterr().err
    # into a new directory, failing before any step (a checkpoint that cannot be read): the
    # directory it made goes, so that it can be used again
    import engine.train as T

    def unreadable(*a):
        raise CheckpointError("optimizer.safetensors: damaged")
    monkeypatch.setattr(T, "load_checkpoint", unreadable)
    assert cli(["finetune", "--model", minilm, "--data", data, "--out", str(tmp_path / "c"),
                "--resume", str(tmp_path / "b")]) == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "c").exists()
    monkeypatch.undo()
    # into the directory of another run
    assert cli(["finetune", "--model", minilm, "--data", data, "--out", str(out),
                "--resume", str(tmp_path / "b")]) == 2
    assert "run.json belongs to another run" in capsys.readouterr().err
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more", "label": "auto"}) + "\n")
    with pytest.raises(CheckpointError, match="the data changed since the checkpoint"):
        finetune(args, resume=str(tmp_path / "b"), log=lambda m: None)


def test_a_run_recorded_before_newer_flags_resumes(minilm, tmp_path, monkeypatch):
    """A run stopped by a version without some of today's training flags (its run.json and
    checkpoint lack them) resumes: a missing flag is its default, what that run ran with."""
    data = _data(tmp_path / "d.jsonl", ROWS[:24])
    out = tmp_path / "old"
    import engine.encoder_train as et
    real = et._Order.take
    calls = {"n": 0}

    def take(self, size, min_batch):     # Ctrl-C during step 3
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return real(self, size, min_batch)
    monkeypatch.setattr(et._Order, "take", take)
    assert cli(_argv(minilm, data, out, "--train-last", "1")) == 130
    monkeypatch.setattr(et._Order, "take", real)
    for path in (out / "run.json", out / "checkpoint" / "trainer_state.json"):
        rec = json.loads(path.read_text())
        for k in ("dropout", "attention_dropout"):
            del rec["args"][k]
        path.write_text(json.dumps(rec))
    assert cli(["finetune", "--model", minilm, "--data", data, "--out", str(out),
                "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
