"""Freezing schedules, telemetry and the prefix cache in encoder runs, on the real
all-MiniLM-L6-v2 (a classifier of the claims' categories, and a sentence encoder): the trainable
set follows the schedule step by step, frozen blocks stay bit-identical while frozen, a cached
run gives an uncached one's weights as the lowest trainable block moves, and telemetry's CKA
and drift agree with transformers' hidden states and the saved weights."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from engine import schedules
from engine.train import TrainArgs, finetune
from conftest import MINILM

HERE = os.path.dirname(os.path.abspath(__file__))
CLAIMS = os.path.join(HERE, "..", "examples", "claims")
ROWS = [json.loads(x) for x in open(os.path.join(CLAIMS, "category_train.jsonl"))]
HEAD = ("pooler.", "classifier.")


def _data(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _expected_blocks(name, steps, k, every):
    if name == "autofreeze":
        # a threshold no change reaches: after the second interval (steps 0-3 at every 2)
        # every block but the top one freezes, from the bottom
        return [list(range(6 - k, 6)) if s < 2 * every else [5] for s in range(steps)]
    s = schedules.make(name, 6, k, every=every, seed=0, total=steps)
    return [sorted(s.blocks(i)) for i in range(steps)]


@pytest.mark.parametrize("task", ["classifier", "sentence"])
@pytest.mark.parametrize("name", [n for n in schedules.NAMES if n != "static"])
def test_schedules_change_an_encoders_trainable_set_as_specified(minilm, tmp_path, name, task):
    rows = ROWS[:16] if task == "classifier" else [
        {"anchor": r["text"].split(". ")[0], "positive": r["text"]} for r in ROWS[:16]]
    out = tmp_path / "run"
    steps, k, every = 8, 2, 2
    summary = finetune(TrainArgs(
        model=minilm, data=_data(tmp_path / "d.jsonl", rows), eval_fraction=0.25, out=str(out),
        train_last=k, steps=steps, batch_size=4, seq_len=40, lr=1e-3, schedule=name,
        schedule_every=every, autofreeze_threshold=10.0, telemetry_every=1), log=lambda m: None)
    recs = [r for r in _lines(out) if "loss" in r]
    want = _expected_blocks(name, steps, k, every)
    assert [r["trainable_blocks"] for r in recs] == want
    # a block frozen at a step kept its weights through it, bit for bit: its drift from the
    # pretrained weights is the same float; one that trained moved
    for prev, rec in zip(recs, recs[1:]):
        for b in range(6):
            layer = f"blocks.{b}"
            if layer not in prev["telemetry"] or "drift" not in prev["telemetry"][layer]:
                continue
            same = rec["telemetry"][layer]["drift"] == prev["telemetry"][layer]["drift"]
            assert same == (b not in rec["trainable_blocks"]), (rec["step"], layer)
    # blocks no step trained, and the embeddings, are the pretrained ones
    ever = {b for r in recs for b in r["trainable_blocks"]}
    base, tuned = engine.load(MINILM), engine.load(str(out / "model"))
    for n, a in base.params.items():
        if n.startswith(HEAD):
            continue
        b = engine.model.block_of(n)
        if b is None or b not in ever:
            assert np.array_equal(tuned.params[n], a), n
    assert summary["schedule"] == name
    assert summary["trainable_params"] == sum(
        a.size for n, a in tuned.params.items()
        if engine.model.block_of(n) in ever or n.startswith(HEAD) and task == "classifier")
    assert (out / "telemetry.png").exists() and (out / "loss.png").exists()   # (test extra: matplotlib)


@pytest.mark.parametrize("name,k,starts,task,store", [
    ("freezeout", 3, [3, 4, 5], "classifier", "memory"),
    ("gradual", 1, [5, 4, 3], "classifier", "memory"),
    ("freezeout", 3, [3, 4, 5], "sentence", "memory"),
    ("freezeout", 3, [3, 4, 5], "classifier", "disk")])
def test_prefix_cache_follows_the_lowest_trainable_block(minilm, tmp_path, monkeypatch, name, k,
                                                         starts, task, store):
    """FreezeOut moves the lowest trainable block up (the new cache's rows are carried up from
    the last one's), gradual unfreezing moves it down (rebuilt from the embeddings): either way
    the weights of an uncached run, to float32 rounding; a sentence run caches its anchors and
    positives alike. On disk, only the file of the pretrained prefix outlives the run (those of
    blocks 4 and 5 hold block 3's trained weights: no later run could use them)."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    rows = ROWS[:16] if task == "classifier" else [
        {"anchor": r["text"].split(". ")[0], "positive": r["text"]} for r in ROWS[:16]]
    data = _data(tmp_path / "d.jsonl", rows)
    runs = {}
    for cache in ("off", store):
        out = tmp_path / cache
        summary = finetune(TrainArgs(
            model=minilm, data=data, eval_fraction=0.0, out=str(out), train_last=k, epochs=4,
            batch_size=8, seq_len=48, lr=1e-3, schedule=name, schedule_every=3,
            prefix_cache=cache), log=lambda m: None)
        runs[cache] = engine.load(str(out / "model"))
    report = summary["prefix_cache"]
    assert report["starts"] == starts and report["storage"] == store
    assert (report["carried"] > 0) == (name == "freezeout")
    assert report["examples"] == (16 if task == "classifier" else 32)   # (anchors + positives)
    base = engine.load(MINILM, labels=runs["off"].config.labels)
    if store == "disk":
        left = {f.name.split("-")[0] for f in (tmp_path / "cache" / "prefix").iterdir()}
        assert left == {engine.prefix_cache.prefix_hash(base, 3)}
    for n, a in runs["off"].params.items():
        b = runs[store].params[n]
        step = np.linalg.norm(a - base.params[n])
        if step == 0 or n.endswith("attn.k.bias"):   # (its gradient is rounding noise: Adam
            assert np.array_equal(a, b) or step > 0, n   # scales it to lr-sized steps)
            continue
        assert np.linalg.norm(b - a) <= 1e-3 * step, n


def _linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return (np.linalg.norm(y.T @ x) ** 2
            / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_encoder_telemetry_agrees_with_transformers(minilm, tmp_path):
    """The last record's CKA of each block's output against the pretrained model's, over the
    real tokens of the first four held-out texts, is what transformers' hidden states of the
    saved classifier and of the pretrained encoder give; drift is the saved weights' distance
    from the pretrained ones."""
    train, held = _data(tmp_path / "t.jsonl", ROWS[:24]), _data(tmp_path / "h.jsonl", ROWS[24:32])
    out = tmp_path / "run"
    finetune(TrainArgs(model=minilm, data=train, eval_data=held, out=str(out), train_last=2,
                       steps=6, batch_size=8, seq_len=64, lr=2e-3, telemetry_every=3),
             log=lambda m: None)
    recs = [r for r in _lines(out) if "telemetry" in r]
    assert [r["step"] for r in recs] == [3, 6]
    tel = recs[-1]["telemetry"]
    texts = [r["text"] for r in ROWS[24:28]]
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    real = enc["attention_mask"].numpy().astype(bool)
    with torch.no_grad():
        ref = transformers.AutoModel.from_pretrained(minilm)(**enc, output_hidden_states=True)
        now = transformers.AutoModel.from_pretrained(out / "model")(**enc, output_hidden_states=True)
    for b in range(6):
        want = _linear_cka(ref.hidden_states[b + 1].numpy()[real].astype(np.float64),
                           now.hidden_states[b + 1].numpy()[real].astype(np.float64))
        np.testing.assert_allclose(tel[f"blocks.{b}"]["cka_to_pretrained"], want, atol=2e-4)
    assert tel["blocks.5"]["cka_to_pretrained"] < 0.999          # it did move
    base, tuned = engine.load(MINILM), engine.load(str(out / "model"))
    for b in (4, 5):
        names = [n for n in base.params if n.startswith(f"blocks.{b}.")]
        d = np.sqrt(sum(np.sum((tuned.params[n].astype(np.float64) - base.params[n]) ** 2) for n in names))
        w0 = np.sqrt(sum(np.sum(base.params[n].astype(np.float64) ** 2) for n in names))
        np.testing.assert_allclose(tel[f"blocks.{b}"]["drift"], d / w0, rtol=1e-4)
    for b in range(4):
        assert "drift" not in tel[f"blocks.{b}"]                  # never trained
    assert {"grad_norm", "update_ratio", "adam_m_norm"} <= set(tel["classifier"])
