"""engine.Trainer and engine.data.from_*: a fine-tuning run over data in memory, with no files.

The reference for every run here is `tailtune finetune` on the same data written to a file:
the in-memory run must give its weights bit for bit (one loop serves both), and the data
constructors must give the ids and loss masks the file reader gives."""
import json
import os

import numpy as np
import pytest

import engine
from engine import data as D
from engine.cli import main as cli
from test_finetune import text_file, tiny_model_dir, weights

ROWS = [{"prompt": f"Claim {i}: water damage in the {'kitchen' if i % 2 else 'attic'}.",
         "completion": f" Route to team {'A' if i % 3 else 'B'}."} for i in range(24)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("trainer")
    jsonl = base / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tiny_model_dir(base / "model"), str(jsonl), text_file(base / "data.txt", 6000), base


def test_rows_and_text_tokenize_as_the_file_reader_does(setup):
    model_dir, jsonl, txt, _ = setup
    tok = engine.load_tokenizer(model_dir)
    for mem, f in ((D.from_rows(tok, ROWS), D.tokenize_file(jsonl, tok)),
                   (D.from_text(tok, open(txt).read()), D.tokenize_file(txt, tok))):
        assert mem.kind == f.kind
        for a, b in ((mem.tokens, f.tokens), (mem.mask, f.mask), (mem.offsets, f.offsets)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    # the Windows line ends and BOM a text file is read without
    crlf = D.from_text(tok, "\ufeff" + open(txt).read().replace("\n", "\r\n"))
    assert np.array_equal(crlf.tokens, np.asarray(D.tokenize_file(txt, tok).tokens))


def test_in_memory_run_gives_the_cli_runs_weights(setup, tmp_path):
    """Same rows, same settings (held-out split, grad accumulation, warmup, clipping): the
    Trainer over rows in memory ends with the CLI run's weights, bit for bit."""
    model_dir, jsonl, _, _ = setup
    out = str(tmp_path / "cli")
    assert cli(["finetune", "--model", model_dir, "--data", jsonl, "--out", out, "--train-last", "2",
                "--steps", "8", "--batch-size", "3", "--grad-accum", "2", "--seq-len", "48",
                "--lr", "3e-3", "--sample-tokens", "0", "--seed", "5"]) == 0
    tok = engine.load_tokenizer(model_dir)
    model = engine.load(model_dir)
    model.train_last(2)
    ex = D.Examples(D.from_rows(tok, ROWS), 48)
    train_idx, eval_idx = D.split(len(ex), 0.1, 5)
    with engine.Trainer(model, ex, ex, train_idx=train_idx, eval_idx=eval_idx, steps=8,
                        batch_size=3, grad_accum=2, lr=3e-3, seed=5, pad_id=tok.batch_pad_id,
                        log=lambda *a: None) as t:
        recs = list(t)
        held = t.evaluate()
    ref = weights(out)
    for n, w in model.params.items():
        assert np.array_equal(w, ref[n]), n
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["loss"] for r in recs] == [m["loss"] for m in metrics if "loss" in m]
    assert held == pytest.approx(json.load(open(os.path.join(out, "summary.json")))["eval_loss_after"],
                                 rel=1e-6)
    assert [r["step"] for r in recs] == list(range(1, 9))


def test_schedule_cache_and_telemetry_in_memory(setup):
    """A schedule changes the trainable set from the first step, the prefix cache follows it
    (same weights as without one, to float32 rounding) and telemetry lands in the records."""
    model_dir, _, _, _ = setup
    tok = engine.load_tokenizer(model_dir)
    data = D.from_rows(tok, ROWS)
    runs = {}
    for cache in ("off", "memory"):
        model = engine.load(model_dir)
        sched = engine.schedules.make("gradual", model.config.n_layer, 1, every=3)
        with engine.Trainer(model, data, seq_len=48, steps=7, batch_size=4, lr=3e-3,
                            schedule=sched, prefix_cache=cache, telemetry_every=3,
                            log=lambda *a: None) as t:
            recs = list(t)
            if cache == "memory":
                report = t.prefix_cache_report()
        runs[cache] = model.params
        assert [r["trainable_blocks"] for r in recs] == [[3]] * 3 + [[2, 3]] * 3 + [[1, 2, 3]]
        assert [r["step"] for r in recs if "telemetry" in r] == [3, 6, 7]
    assert report["caches"][0]["start_block"] == 3 and len(report["caches"]) == 3
    for n, w in runs["off"].items():
        np.testing.assert_allclose(runs["memory"][n], w, rtol=2e-5, atol=1e-6, err_msg=n)


def test_epochs_draw_every_example_once_per_pass(setup):
    model_dir, _, _, _ = setup
    model = engine.load(model_dir)
    model.train_last(1)
    data = D.from_tokens([np.arange(10) + i for i in range(10)])
    with engine.Trainer(model, data, seq_len=8, epochs=2, batch_size=4, log=lambda *a: None) as t:
        assert t.steps == 6          # 3 batches a pass (4 + 4 + 2)
        assert sum(r["tokens"] for r in t) == 2 * 10 * 8   # inputs of 9 tokens, cut to 8
        with pytest.raises(engine.InputError, match="6 steps are done"):
            t.step()


def test_masks_choose_the_loss_positions(setup):
    """A mask of 0 keeps a token out of the loss: the loss equals the model's on the targets
    the mask leaves, computed directly."""
    model_dir, _, _, _ = setup
    model = engine.load(model_dir)
    model.train_last(1)
    seqs = [np.arange(20) * 7 % 257, np.arange(15) * 3 % 257]
    masks = [np.r_[np.zeros(10), np.ones(10)], np.r_[np.zeros(5), np.ones(10)]]
    data = D.from_tokens(seqs, masks)
    t = engine.Trainer(model, data, seq_len=32, steps=1, batch_size=2, lr=0.0, log=lambda *a: None)
    x = np.zeros((2, 19), np.int64)
    y = np.full((2, 19), -100)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        x[r, :len(s) - 1] = s[:-1]
        y[r, :len(s) - 1] = np.where(m[1:] > 0, s[1:], -100)
    direct = model.forward(x, y, grad=False)
    assert t.evaluate(data) == pytest.approx(direct, rel=1e-6)
    assert t.step()["loss"] == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("make, match", [
    (lambda: D.from_tokens([[1, 2, 3], [4, -1]]), r"sequences\[1\]: token ids must be >= 0"),
    (lambda: D.from_tokens([[1.5, 2.0]]), r"sequences\[0\]: expected a 1-D sequence of integer"),
    (lambda: D.from_tokens(np.arange(5)), "got one 1-D array"),
    (lambda: D.from_tokens([]), "no examples"),
    (lambda: D.from_tokens([[1]]), "too little data"),
    (lambda: D.from_tokens([[1, 2, 3]], [[1, 0]]), r"masks\[0\]: expected 3 values"),
    (lambda: D.from_tokens([[1, 2, 3]], [[1, 0, 2]]), r"masks\[0\]: expected 3 values of 0 or 1"),
    (lambda: D.from_tokens([[1, 2, 3]], []), "0 masks for 1 sequences"),
])
def test_bad_token_data_is_named(make, match):
    with pytest.raises(engine.InputError, match=match):
        make()


def test_bad_rows_are_named(setup):
    tok = engine.load_tokenizer(setup[0])
    for rows, match in (([{"prompt": "a"}], r"rows\[0\]: a row needs 'prompt' and 'completion'"),
                        ([ROWS[0], "text"], r"rows\[1\]: expected a JSON object, got str"),
                        ("just a string", "expected a list of row dicts"),
                        ([], "no examples"),
                        ([{"messages": [{"role": "user", "content": "x"}]}], r"rows\[0\]: no assistant"),
                        ([{"messages": [{"role": "assistant", "content": "x"}]}],
                         r"rows\[0\]: 'messages' rows need a tokenizer with a chat template")):
        with pytest.raises(engine.InputError, match=match):
            D.from_rows(tok, rows)
    with pytest.raises(engine.InputError, match="expected a str"):
        D.from_text(tok, b"bytes")
    for bad in (None, 5):
        with pytest.raises(engine.InputError, match="expected a list of row dicts"):
            D.from_rows(tok, bad)
        with pytest.raises(engine.InputError, match="expected a list of sequences"):
            D.from_tokens(bad)


def test_a_split_held_set_is_left_out_of_training(setup):
    """held = data with eval_idx and no train_idx: training takes the other examples only."""
    model = engine.load(setup[0])
    model.train_last(1)
    data = D.Examples(D.from_tokens([np.arange(12) + i for i in range(6)]), 8)
    with engine.Trainer(model, data, data, eval_idx=[1, 4], steps=1, log=lambda *a: None) as t:
        assert list(t.train_idx) == [0, 2, 3, 5] and list(t.eval_idx) == [1, 4]


def test_bad_trainer_arguments_are_named(setup):
    model = engine.load(setup[0])
    model.train_last(1)
    data = D.from_tokens([np.arange(12)] * 4)
    quiet = {"log": lambda *a: None}
    for kw, match in (({"batch_size": 0}, "batch_size 0: must be an integer >= 1"),
                      ({"lr": float("nan")}, "lr nan: must be a finite number"),
                      ({"min_lr": 1.0}, "min_lr 1.0: must be between 0 and lr"),
                      ({"prefix_cache": "ram"}, "prefix_cache ram: must be off, memory or disk"),
                      ({"steps": 0}, "steps 0: must be an integer >= 1")):
        with pytest.raises(engine.InputError, match=match):
            engine.Trainer(model, data, seq_len=8, **kw, **quiet)
    for kw, match in (({"steps": 2.5}, "steps 2.5: must be an integer >= 1"),
                      ({"grad_accum": 1.5}, "grad_accum 1.5: must be an integer"),
                      ({"batch_size": 2.5}, "batch_size 2.5: must be an integer"),
                      ({"seed": -1}, "seed -1: must be an integer >= 0"),
                      ({"seed": 1.5}, "seed 1.5: must be an integer >= 0"),
                      ({"pad_id": None}, "pad_id None: must be a token id in 0..256"),
                      ({"pad_id": 257}, "pad_id 257: must be a token id in 0..256"),
                      ({"seq_len": 0}, "seq_len 0: must be an integer >= 1"),
                      ({"train_idx": [100]}, r"train_idx: indices must be in 0..3"),
                      ({"train_idx": [-1]}, r"train_idx: indices must be in 0..3"),
                      ({"train_idx": [0.0, 1.0]}, "train_idx: expected a 1-D sequence of integer"),
                      ({"train_idx": []}, "no training examples"),
                      ({"eval_idx": [0]}, "eval_idx picks examples of `held`, and no held set"),
                      ({"prefix_dtype": "bfloat16"}, "prefix_dtype bfloat16: must be float32 or float16"),
                      ({"opt": engine.SGD(engine.load(setup[0]), lr=0.1)}, "opt: an optimizer made over this model"),
                      ({"schedule": engine.schedules.make("gradual", 2, 1)},
                       r"schedule: made for 2 blocks, the model has 4")):
        with pytest.raises(engine.InputError, match=match):
            engine.Trainer(model, data, **{"seq_len": 8, **kw}, **quiet)
    with pytest.raises(engine.InputError, match="expected an engine.Model"):
        engine.Trainer("path/to/model", data, seq_len=8, **quiet)
    with pytest.raises(engine.InputError, match="Examples cut for seq_len 8, and seq_len 4"):
        engine.Trainer(model, D.Examples(data, 8), seq_len=4, **quiet)
    prompt_only = D.from_tokens([np.arange(12)] * 4, [np.r_[np.ones(11), 0]] * 2 + [np.zeros(12)] * 2)
    with pytest.raises(engine.InputError, match="held: no tokens to compute the loss on"):
        engine.Trainer(model, data, prompt_only, train_idx=[0], eval_idx=[2, 3], seq_len=8, **quiet)
    with pytest.raises(engine.InputError, match="data: no tokens to compute the loss on"):
        engine.Trainer(model, prompt_only, train_idx=[2, 3], seq_len=8, **quiet)
    notes = []
    t = engine.Trainer(model, prompt_only, seq_len=8, log=notes.append)
    assert list(t.train_idx) == [0, 1] and "2 of 4 examples have no loss tokens" in notes[0]
    t.close()
    with pytest.raises(engine.InputError, match="this Trainer is closed"):
        t.step()
    with pytest.raises(engine.InputError, match="token data needs seq_len"):
        engine.Trainer(model, data, **quiet)
    with pytest.raises(engine.InputError, match="expected engine.data.Examples or TokenData"):
        engine.Trainer(model, [[1, 2, 3]], seq_len=8, **quiet)
    with pytest.raises(engine.InputError, match="token id 300, outside the model's vocabulary 0..256"):
        engine.Trainer(model, D.from_tokens([np.arange(290, 301)]), seq_len=8, **quiet)
    model.freeze()
    with pytest.raises(engine.InputError, match="nothing is trainable"):
        engine.Trainer(model, data, seq_len=8, **quiet)


def test_chat_rows_render_as_the_file_reader_renders_them(require_smollm2, tmp_path):
    """Messages and prompt/completion rows through SmolLM2's chat template: the ids and the
    loss mask (assistant turns only) of a JSONL file of the same rows."""
    tok = engine.load_tokenizer("smollm2")
    rows = [{"messages": [{"role": "system", "content": "Triage claims."},
                          {"role": "user", "content": "Pipe burst."},
                          {"role": "assistant", "content": "Team A."},
                          {"role": "user", "content": "And hail?"},
                          {"role": "assistant", "content": "Team B."}]},
            {"prompt": "Fire in garage.", "completion": "Team C."}]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mem, ref = D.from_rows(tok, rows), D.tokenize_file(str(f), tok)
    for a, b in ((mem.tokens, ref.tokens), (mem.mask, ref.mask), (mem.offsets, ref.offsets)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert 0 < mem.mask.sum() < len(mem.mask) / 2


def test_a_failed_periodic_checkpoint_logs_each_step_once(setup, tmp_path, monkeypatch, capsys):
    """--save-every's checkpoint failing (a full disk) after its step's metrics line was
    written: the run stops with the step in a checkpoint, and no line is written twice (the
    resumed run would keep the duplicate)."""
    import engine.train as T
    model_dir, jsonl, _, _ = setup
    real, calls = T.save_checkpoint, {"n": 0}

    def first_fails(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise engine.CheckpointError("checkpoint: could not write the checkpoint: No space left")
        return real(*a, **k)
    monkeypatch.setattr(T, "save_checkpoint", first_fails)
    out = str(tmp_path / "run")
    argv = ["finetune", "--model", model_dir, "--data", jsonl, "--out", out, "--train-last", "1",
            "--steps", "6", "--batch-size", "4", "--seq-len", "48", "--sample-tokens", "0",
            "--save-every", "2"]
    assert cli(argv) != 0
    assert "training stopped after step 2" in capsys.readouterr().out
    steps = lambda: [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]  # noqa: E731
    assert steps() == [0, 1, 2]
    assert cli(argv + ["--resume", out]) == 0
    assert steps() == [0, 1, 2, 3, 4, 5, 6, 6]   # the last: the final held-out loss


def test_a_run_continued_from_state_and_a_checkpoint_matches_one_straight_run(setup, tmp_path):
    """The library's resume: state() and a checkpoint after step 3, a new process's model and
    Trainer(state=..., load=...) for the rest: the weights of 6 steps straight, bit for bit,
    under a schedule that changes the trainable set on the way."""
    from engine.train import load_checkpoint, save_checkpoint
    model_dir = setup[0]
    tok = engine.load_tokenizer(model_dir)
    data = D.from_rows(tok, ROWS)

    def trainer(model, **kw):
        sched = engine.schedules.make("gradual", model.config.n_layer, 1, every=2)
        return engine.Trainer(model, data, seq_len=48, steps=6, batch_size=4, lr=3e-3, seed=3,
                              schedule=sched, log=lambda *a: None, **kw)
    straight = engine.load(model_dir)
    with trainer(straight) as t:
        list(t)
    first = engine.load(model_dir)
    with trainer(first) as t:
        for _ in range(3):
            t.step()
        state = t.state()
        save_checkpoint(str(tmp_path / "ck"), first, tok, t.opt, {**state, "base_fingerprint": "x",
                                                                  "args": {}})
    second = engine.load(model_dir)
    with trainer(second, state=json.loads(json.dumps(state)),
                 load=lambda m, o: load_checkpoint(str(tmp_path / "ck"), m, o)) as t:
        assert t.step_no == 3
        recs = list(t)
    assert [r["step"] for r in recs] == [4, 5, 6] and recs[-1]["trainable_blocks"] == [1, 2, 3]
    for n, w in straight.params.items():
        assert np.array_equal(second.params[n], w), n
