"""`tailtune finetune` and `tailtune eval` of an encoder: the real all-MiniLM-L6-v2 trained as a
classifier of the claims' categories, its saved model run by transformers; and the refusals."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from engine.cli import main as cli
from conftest import MINILM

HERE = os.path.dirname(os.path.abspath(__file__))
CLAIMS = os.path.join(HERE, "..", "examples", "claims")
TRAIN = os.path.join(CLAIMS, "category_train.jsonl")
TEST = os.path.join(CLAIMS, "category_test.jsonl")


def test_minilm_learns_the_claims_categories(minilm, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(["finetune", "--model", "minilm", "--data", TRAIN, "--eval-data", TEST,
              "--train-last", "1", "--steps", "12", "--lr", "2e-3", "--batch-size", "16",
              "--seq-len", "96", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["auto", "health", "liability", "property", "travel"]
    # a new head starts near chance (1 in 5); twelve steps of the last block learn the task
    assert summary["base_eval"]["accuracy"] < 0.5
    assert summary["final_eval"]["accuracy"] >= 0.9
    assert summary["final_eval"]["loss"] < 0.5 * summary["base_eval"]["loss"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    # the saved classifier, run by transformers on the held-out texts, agrees with the engine
    texts = [json.loads(x)["text"] for x in open(TEST)][:8]
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    enc = tok(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
    with torch.no_grad():
        want = hf(**enc).logits.numpy()
    model = engine.load(str(out))
    got = model.forward(enc["input_ids"].numpy(), lengths=enc["attention_mask"].sum(1).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the frozen blocks are the pretrained ones, bit for bit
    base = engine.load(MINILM)
    for n in base.params:
        if n.startswith(("blocks.0.", "blocks.4.", "wte.")):
            assert np.array_equal(model.params[n], base.params[n]), n
    capsys.readouterr()
    assert cli(["eval", "--model", str(out), "--data", TEST]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {summary['final_eval']['accuracy']:.3f}" in printed


def _rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize("extra,match", [
    (["--sample-prompt", "Hi"], "--sample-prompt is not available for a classifier or an encoder"),
    (["--resume", "somewhere"], "no checkpoint to resume"),
])
def test_flags_of_causal_runs_are_refused(minilm, tmp_path, capsys, extra, match):
    rc = cli(["finetune", "--model", "minilm", "--data", TRAIN, "--out", str(tmp_path / "o"),
              *extra])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "a", "completion": "b"}], '"text" string and a "label"'),
    ([{"text": "a", "label": ["x"]}], '"label" must be a non-empty string or an integer'),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "one label"),
])
def test_bad_classification_data_is_named(minilm, tmp_path, capsys, rows, match):
    data = _rows(tmp_path / "d.jsonl", rows)
    rc = cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
              "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and ("d.jsonl" in err or "one label" in err)


def test_eval_of_an_encoder_without_head_says_so(minilm, capsys):
    assert cli(["eval", "--model", "minilm", "--data", TEST]) == 2
    assert "without a classifier head" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("float16", 0.05)])
def test_prefix_cache_gives_the_same_weights(minilm, tmp_path, monkeypatch, dtype, tol):
    """Three epochs of 16 texts with the frozen blocks' output cached after the first, in memory
    or on disk: the updates of an uncached run, to float32 rounding (float16: the hidden states
    rounded to 11 bits; Adam turns a gradient's rounding into a step's, so the updates agree to
    ~5%). A second run on disk reads every row the first left, and ends where it did."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    data = _rows(tmp_path / "d.jsonl", [json.loads(x) for x in open(TRAIN)][:16])
    runs, reports = {}, {}
    for cache in ("off", "memory", "disk", "disk-again"):
        out = tmp_path / cache
        assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
                    "--train-last", "1", "--epochs", "3", "--batch-size", "8", "--lr", "1e-3",
                    "--seq-len", "64", "--prefix-cache", cache.split("-")[0], "--prefix-dtype",
                    dtype, "--out", str(out)]) == 0
        runs[cache] = engine.load(str(out))
        reports[cache] = json.loads((out / "summary.json").read_text()).get("prefix_cache")
    assert reports["off"] is None
    for cache, report in reports.items():
        if cache != "off":
            assert report["examples"] == 16 and report["start"] == 5, cache
            assert report["dtype"] == dtype and report["storage"] == cache.split("-")[0]
    assert reports["disk"]["reused"] == 0 and reports["disk-again"]["reused"] == 16
    assert reports["disk-again"]["compute_s_per_example"] is None    # none computed
    (key,) = {f.name.split(".")[0] for f in (tmp_path / "cache" / "prefix").iterdir()}
    base = engine.load(MINILM, labels=runs["off"].config.labels)   # as the runs began
    assert key.startswith(engine.prefix_cache.prefix_hash(base, 5))   # the pretrained prefix
    for n, a in runs["off"].params.items():
        assert np.array_equal(runs["disk"].params[n], runs["disk-again"].params[n]), n
        for cache in ("memory", "disk"):
            b = runs[cache].params[n]
            if not n.startswith(("blocks.5.", "pooler.", "classifier.")):
                assert np.array_equal(a, b), n                      # frozen: bit for bit
            elif not n.endswith("attn.k.bias"):
                # (k's bias is left out: its gradient is rounding noise, softmax ignores a
                # per-query constant, and Adam scales noise up to lr-sized steps either way)
                step = np.linalg.norm(a - base.params[n])
                assert step > 0, n
                assert np.linalg.norm(b - a) <= tol * step, n


def test_ctrl_c_ends_after_the_step_and_saves(minilm, tmp_path):
    import signal

    from engine.train import TrainArgs, finetune

    def log(msg):   # Ctrl-C from inside the run, right after step 10 (the progress line)
        if msg.startswith("step 10/"):
            signal.raise_signal(signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)
    data = _rows(tmp_path / "d.jsonl", [json.loads(x) for x in open(TRAIN)][:16])
    args = TrainArgs(model="minilm", data=data, eval_fraction=0.0, out=str(tmp_path / "run"),
                     train_last=1, steps=30, batch_size=4, seq_len=48, lr=1e-3)
    summary = finetune(args, log=log)
    assert summary["status"] == "interrupted" and summary["steps"] == 10
    assert summary["signal"] == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before        # the handler put back
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines) == 10
    m = engine.load(str(tmp_path / "run"))                  # model/ saved, whole
    assert m.config.labels == summary["labels"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the diverging run's overflow
def test_a_run_that_fails_leaves_no_out(minilm, tmp_path, capsys):
    data = _rows(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}])
    out = tmp_path / "o"
    assert cli(["finetune", "--model", "minilm", "--data", data, "--out", str(out)]) == 2
    assert "none is left to train on" in capsys.readouterr().err and not out.exists()
    # a run that diverges after it started writing
    data = _rows(tmp_path / "d2.jsonl", [json.loads(x) for x in open(TRAIN)][:8])
    assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
                "--lr", "1e37", "--clip", "0", "--warmup", "0", "--steps", "4", "--batch-size",
                "4", "--seq-len", "32", "--out", str(out)]) == 2
    assert "not finite" in capsys.readouterr().err and not out.exists()


def test_eval_batches_caps_the_held_out_texts(minilm, tmp_path):
    from engine.train import TrainArgs, finetune
    rows = [json.loads(x) for x in open(TRAIN)]
    per_label = {r["label"]: r for r in rows}          # one text of each label
    data = _rows(tmp_path / "d.jsonl", list(per_label.values()))
    notes = []
    args = TrainArgs(model="minilm", data=data, eval_data=TEST, out=str(tmp_path / "run"),
                     train_last=0, steps=1, batch_size=4, seq_len=32, eval_batches=2)
    summary = finetune(args, log=notes.append)
    assert any("first 8 of 80 rows" in n for n in notes)
    assert summary["final_eval"] is not None


def test_pairs_of_texts_tokenize_and_train(minilm, tmp_path):
    """{"text", "text_pair"} rows: the tokenizer's two-segment template and its longest-first
    cut, as transformers' tokenizer gives them; a short run trains on them."""
    tok = engine.load_tokenizer("minilm")
    ref = transformers.AutoTokenizer.from_pretrained(MINILM)
    a = ["The claim was filed late.", "A tree fell on the garage roof during the storm last night."]
    b = ["Was it filed on time?", "Storm damage to a building"]
    for ml in (None, 12):
        got = tok.encode_pairs(a, b, max_length=ml)
        want = ref(a, b, truncation=ml is not None, max_length=ml)
        assert [g[0] for g in got] == want["input_ids"]
        assert [g[1] for g in got] == want["token_type_ids"]
    rows = [{"text": t, "text_pair": p, "label": lab}
            for t, p, lab in zip(a * 4, b * 4, ["late", "property"] * 4)]
    rows.append({"text": "Only one text here.", "label": "late"})   # a row without a pair
    data = _rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
                "--train-last", "1", "--steps", "6", "--batch-size", "4", "--lr", "2e-3",
                "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["labels"] == ["late", "property"]
    # transformers, with the saved tokenizer, gives the pair its token types and the logits
    saved = transformers.AutoTokenizer.from_pretrained(out / "model")
    enc = saved(a, b, padding=True, return_tensors="pt")
    assert enc["token_type_ids"].numpy().any()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        want = hf(**enc).logits.numpy()
    got = engine.load(str(out)).forward(enc["input_ids"].numpy(),
                                        lengths=enc["attention_mask"].sum(1).numpy(),
                                        types=enc["token_type_ids"].numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(engine.TailtuneError, match="lists of texts"):
        tok.encode_pairs("hello")
    with pytest.raises(engine.TailtuneError, match="at least 5"):
        tok.encode_pairs(a, b, max_length=4)
