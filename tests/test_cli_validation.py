"""The CLI on bad arguments, bad data and damaged run directories: an error naming the flag or
the file (never a traceback, never a silent rc=0 with a wrong result), and nothing left behind
that a later run trips over."""
import json
import shutil
import signal

import pytest

import engine
import engine.train as T
from engine.cli import main as cli
from conftest import signal_after_steps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2 with the byte tokenizer, a text file, a JSONL file."""
    base = tmp_path_factory.mktemp("cliv")
    model = str(base / "model")
    cfg = engine.Config.gpt2(vocab_size=257, n_layer=2, n_head=2, d_model=16, max_seq_len=64)
    engine.Model(cfg, seed=0).save(model)
    engine.ByteTokenizer().save(model)
    text = base / "train.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    rows = base / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i}+1?", "completion": f" {i + 1}"}) + "\n"
                            for i in range(40)))
    return {"model": model, "txt": str(text), "jsonl": str(rows), "base": base}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ft(files, out, *extra, data=None):
    return ["finetune", "--model", files["model"], "--data", data or files["txt"], "--out", str(out),
            "--seq-len", "16", "--batch-size", "4", "--sample-tokens", "0", *extra]


def fails(capsys, argv, *match):
    code = cli(argv)
    cap = capsys.readouterr()
    assert code == 2, (code, cap.err)
    assert "Traceback" not in cap.err
    for m in match:
        assert m in cap.err, cap.err
    return cap


# ---- arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--clip", "-1"), ("--grad-accum", "0"), ("--eval-batches", "-1"), ("--eval-fraction", "1"),
    ("--eval-fraction", "-0.1"), ("--epochs", "0"), ("--epochs", "nan"), ("--steps", "0"),
    ("--steps", "-3"), ("--warmup", "-1"), ("--weight-decay", "-0.1"), ("--min-lr", "1"),
    ("--eval-every", "-1"), ("--save-every", "-2"), ("--telemetry-every", "-1"), ("--seq-len", "0"),
    ("--seq-len", "-5"), ("--batch-size", "0"), ("--seed", "-1"), ("--lr", "inf"), ("--lr", "nan"),
    ("--train-last", "-1"),
])
def test_finetune_rejects_nonsense_before_touching_out(files, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    cap = fails(capsys, ft(files, out, flag, value), f"error: {flag} ")
    assert not out.exists()  # nothing created, so a corrected rerun just works
    assert "loading" not in cap.out  # rejected before the model is read


@pytest.mark.parametrize("argv,match", [
    (["eval", "--seq-len", "-3"], "--seq-len -3: must be >= 1"),
    (["eval", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["inspect", "--seq-len", "0"], "--seq-len 0: must be >= 1"),
    (["inspect", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["generate", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--temperature", "inf"], "--temperature inf"),
    (["generate", "--top-k", "0"], "--top-k 0: must be >= 1"),
    (["generate", "--seed", "-1"], "--seed -1"),
    (["generate", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
])
def test_other_commands_reject_nonsense(files, capsys, argv, match):
    cmd, *rest = argv
    extra = {"eval": ["--data", files["txt"]], "generate": ["--prompt", "hi"]}.get(cmd, [])
    cap = fails(capsys, [cmd, "--model", files["model"], *extra, *rest], match)
    assert cap.out == ""  # generate used to print the prompt first


def test_generate_prints_the_prompt_only_once_generation_starts(files, capsys):
    fails(capsys, ["generate", "--model", files["model"], "--prompt", "x" * 80], "exceeds")
    assert cli(["generate", "--model", files["model"], "--prompt", "hi", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "hi\n"


def test_train_last_checked_before_tokenizing(files, tmp_path, capsys):
    cap = fails(capsys, ft(files, tmp_path / "o", "--train-last", "7"),
                "--train-last 7: the model has 2 blocks")
    assert "tokenizing" not in cap.out
    assert not (tmp_path / "o").exists()


def test_out_under_a_file(files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    fails(capsys, ft(files, tmp_path / "afile" / "run"), f"{tmp_path / 'afile'} is a file, not a directory")


def test_oserror_becomes_an_error_line(monkeypatch, capsys):
    import engine.cli as C

    def boom(a):
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/x")
    monkeypatch.setattr(C, "_inspect", boom)
    fails(capsys, ["inspect", "--model", "m"],
          "tailtune inspect: error: /nowhere/x: No such file or directory")


# ---- data ---------------------------------------------------------------------------------
def test_no_loss_tokens_is_an_error_not_nan(files, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "p" * 40 + str(i), "completion": " yes"}) + "\n"
                            for i in range(10)))
    out = tmp_path / "o"
    fails(capsys, ft(files, out, data=str(long)),
          f"{long}: no tokens to compute the loss on within --seq-len 16")
    assert not out.exists()
    fails(capsys, ["eval", "--model", files["model"], "--data", str(long), "--seq-len", "16"],
          "no tokens to compute the loss on")
    # some examples without loss tokens: a warning, and a finite loss
    with open(long, "a") as f:
        f.write(json.dumps({"prompt": "short", "completion": " answer"}) + "\n")
    assert cli(["eval", "--model", files["model"], "--data", str(long), "--seq-len", "16"]) == 0
    cap = capsys.readouterr()
    assert "warning:" in cap.err and "10 of 11 examples have no loss tokens" in cap.err
    assert "loss nan" not in cap.out


def test_non_utf8_jsonl_names_file_and_line(files, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    fails(capsys, ft(files, tmp_path / "o", data=str(bad)), f"{bad}:2: not UTF-8")


def test_damaged_data_cache_is_rebuilt(files, cache, capsys):
    argv = ["eval", "--model", files["model"], "--data", files["txt"], "--seq-len", "16"]
    assert cli(argv) == 0
    first = capsys.readouterr().out
    (entry,) = (cache / "data").iterdir()
    with open(entry / "tokens.npy", "r+b") as f:
        f.truncate(200)
    assert cli(argv) == 0
    assert capsys.readouterr().out == first
    assert cli(argv) == 0  # and stays rebuilt
    assert capsys.readouterr().out == first


def test_eval_fraction_zero_says_there_is_no_held_out_set(files, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(ft(files, out, "--steps", "2", "--eval-fraction", "0")) == 0
    text = capsys.readouterr().out
    assert "no held-out set" in text and "nan" not in text
    s = json.load(open(out / "summary.json"))
    assert s["eval_loss_after"] is None and s["perplexity_after"] is None


# ---- divergence, signals, damaged run directories -----------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow that makes the NaN
def test_divergence_stops_without_saving_a_nan_model(files, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ft(files, out, "--steps", "5", "--lr", "1e30")
    cap = fails(capsys, argv, "training diverged", "No model was saved")
    assert "step " in cap.err
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    # the rerun must not promise a --resume that would fail
    cap = fails(capsys, argv, "without a checkpoint", "nothing to resume")
    assert "--resume" not in cap.err
    # the API raises its own error class for it
    args = T.TrainArgs(model=files["model"], data=files["txt"], out=str(tmp_path / "api"),
                       seq_len=16, batch_size=4, sample_tokens=0, steps=5, lr=1e30)
    with pytest.raises(engine.DivergedError, match="training diverged"):
        T.finetune(args, log=lambda *a: None)


def test_non_finite_gradient_stops_the_run_without_clipping_too(files, tmp_path, capsys, monkeypatch):
    """--clip 0 still computes the gradient norm: an inf in it (an overflow in backward) stops
    the run before the update instead of saving a model that cannot be loaded; a non-finite
    loss at the first step is not blamed on the learning rate."""
    import engine.trainer as TR
    monkeypatch.setattr(TR, "grad_norm", lambda model: float("inf"))
    out = tmp_path / "o"
    cap = fails(capsys, ft(files, out, "--steps", "3", "--clip", "0"), "training diverged",
                "gradient norm inf", "No model was saved")
    assert "step 1:" in cap.err and "before any update" in cap.err and "lower --lr" not in cap.err
    assert not (out / "model").exists()


@pytest.fixture(scope="module")
def stopped(files, tmp_path_factory):
    """A run stopped by SIGTERM after its second step: a real checkpoint to damage."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    prev = signal.getsignal(signal.SIGTERM)
    with signal_after_steps(2, signal.SIGTERM):
        code = cli(ft(files, out, "--steps", "6"))
    assert signal.getsignal(signal.SIGTERM) is prev  # the handler is put back
    return out, code


def test_sigterm_checkpoints_like_ctrl_c(stopped):
    out, code = stopped
    assert code == 128 + signal.SIGTERM
    state = json.load(open(out / "checkpoint" / "trainer_state.json"))
    assert state["step"] == 2


def damage(state=None, metrics=None, run=None, opt=None):
    def f(d):
        if opt:   # opt: {name: array} -> {name: array}, on the optimizer tensors
            from engine.io.safetensors import SafetensorsFile, write
            p = str(d / "checkpoint" / "optimizer.safetensors")
            st = SafetensorsFile(p)
            write(p, opt({k: st.float32(k) for k in st.keys()}))
        if state:
            p = d / "checkpoint" / "trainer_state.json"
            p.write_text(state(p.read_text()))
        if metrics:
            p = d / "metrics.jsonl"
            p.write_text(metrics(p.read_text()))
        if run:
            (d / "run.json").write_text(run)
    return f


def edit(fn):
    def g(text):
        s = json.loads(text)
        fn(s)
        return json.dumps(s)
    return g


@pytest.mark.parametrize("how,file,match", [
    (damage(state=lambda t: t[:len(t) // 2]), "trainer_state.json", "cannot read the trainer state"),
    (damage(state=edit(lambda s: s.pop("opt_t"))), "trainer_state.json", "'opt_t' is missing"),
    (damage(state=edit(lambda s: s.pop("args"))), "trainer_state.json", "'args' is missing"),
    (damage(state=edit(lambda s: s["args"].update(bogus=1))), "trainer_state.json", "bogus"),
    (damage(state=edit(lambda s: s["args"].update(steps=-4))), "trainer_state.json", "--steps -4"),
    (damage(state=edit(lambda s: s.update(step="abc"))), "trainer_state.json",
     "'step' is missing or not an integer"),
    (damage(state=edit(lambda s: s["opt_counts"]["ln_f.weight"].update(t=True))), "trainer_state.json",
     "'opt_counts' is not what tailtune writes"),
    (damage(state=edit(lambda s: s.update(trainable=[]))), "trainer_state.json", "'trainable'"),
    (damage(state=edit(lambda s: s.update(data_hashes={}))), "trainer_state.json", "'data_hashes'"),
    (damage(state=edit(lambda s: s.update(data_keys={"train": 1}))), "trainer_state.json", "'data_keys'"),
    (damage(state=edit(lambda s: s.update(data_keys={"train": "x", "eval": "x"}))), "checkpoint",
     "tokenize into other examples than when the checkpoint was written"),
    (damage(state=edit(lambda s: s["data"].update(epoch=-1))), "trainer_state.json", "integers >= 0"),
    (damage(state=edit(lambda s: s.update(eval_before="low"))), "trainer_state.json", "'eval_before'"),
    (damage(state=edit(lambda s: s.update(step=99))), "checkpoint", "at step 99, past the run's 6 steps"),
    (damage(opt=lambda t: {k.replace(":", "_"): a for k, a in t.items()}), "checkpoint",
     "is not named parameter:entry"),
    (damage(opt=lambda t: {k: a for k, a in t.items() if not k.endswith(":v")}), "checkpoint", "lacks v"),
    (damage(metrics=lambda t: '{"step": 1}\nnot json\n' + t), "metrics.jsonl:2", "not a metrics record"),
    (damage(run="{garbled"), "run.json", "not a run description"),
])
def test_resume_from_a_damaged_run_names_the_file(stopped, files, tmp_path, capsys, how, file, match):
    out = tmp_path / "copy"
    shutil.copytree(stopped[0], out)
    how(out)
    fails(capsys, ft(files, out, "--steps", "6", "--resume", str(out)), file, match)


def test_resume_drops_a_metrics_line_cut_off_by_a_crash(stopped, files, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(stopped[0], out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert cli(ft(files, out, "--steps", "6", "--resume", str(out))) == 0
    steps = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 7))


def test_resume_of_a_checkpoint_older_than_its_records(stopped, files, tmp_path, capsys):
    """A checkpoint written before tailtune recorded the trained set, the trainable set and the
    data's hash: the run resumes, warns that the data is not checked, and counts as trained
    what the checkpoint holds optimizer state for."""
    out = tmp_path / "copy"
    shutil.copytree(stopped[0], out)
    old = edit(lambda s: [s.pop(k) for k in ("trained", "trainable", "data_hashes", "data_keys",
                                             "opt_counts")])
    damage(state=old)(out)
    assert cli(ft(files, out, "--steps", "6", "--resume", str(out))) == 0
    err = capsys.readouterr().err
    assert "the data is not checked" in err and "may tokenize it differently" in err
    m = engine.load(files["model"]).train_last(2)
    assert json.load(open(out / "summary.json"))["trainable_params"] == m.num_params(trainable_only=True)


def test_resume_accepts_flags_equal_to_the_runs_defaults(stopped, files, tmp_path):
    """The run left --train-last at its default (2): giving --train-last 2 now is the same."""
    out = tmp_path / "copy"
    shutil.copytree(stopped[0], out)
    assert cli(ft(files, out, "--steps", "6", "--train-last", "2", "--resume", str(out))) == 0
