"""Sentence embeddings: the pooling, normalization and in-batch ranking loss against PyTorch
autograd; `tailtune finetune` of the real all-MiniLM-L6-v2 on pairs of texts, its saved model
giving transformers' embeddings."""
import json
import os

import numpy as np
import torch
import transformers

import engine
from engine import sentence as S
from engine.cli import main as cli

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "examples", "claims", "category_train.jsonl")


def test_pool_normalize_and_loss_match_autograd():
    rng = np.random.default_rng(0)
    B, T, C = 6, 7, 12
    h = rng.standard_normal((B, T, C)).astype(np.float32)
    lengths = np.array([7, 3, 1, 5, 6, 2])
    u, n = S.normalize_forward(S.mean_pool_forward(h, lengths))
    loss, dua, dup = S.ranking_loss(u[:3], u[3:])
    th = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    m = torch.tensor((np.arange(T)[None] < lengths[:, None]).astype(np.float64))
    te = (th * m[:, :, None]).sum(1) / torch.tensor(lengths, dtype=torch.float64)[:, None]
    tu = torch.nn.functional.normalize(te, dim=1)
    tl = torch.nn.functional.cross_entropy(S.SCALE * tu[:3] @ tu[3:].T, torch.arange(3))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5
    np.testing.assert_allclose(u, tu.detach().numpy(), atol=1e-6)
    dh = S.mean_pool_backward(S.normalize_backward(np.concatenate([dua, dup]), u, n), lengths, T)
    np.testing.assert_allclose(dh, th.grad.numpy(), rtol=1e-4, atol=1e-6)


def _pairs(path, n):
    rows = [json.loads(x) for x in open(TRAIN)][:n]
    with open(path, "w") as f:
        for r in rows:
            first = r["text"].split(". ")[0]
            f.write(json.dumps({"anchor": "What happened: " + first, "positive": r["text"]}) + "\n")
    return str(path)


def test_minilm_trains_on_pairs_and_saves_a_sentence_encoder(minilm, tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", 24)
    out = tmp_path / "run"
    # held out: the training pairs themselves, whose ranking loss eight steps must lower
    assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-data", data,
                "--train-last", "1", "--steps", "8", "--batch-size", "8", "--lr", "1e-4",
                "--seq-len", "64", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "sentence-embedding" and summary["steps"] == 8
    assert 0 <= summary["final_eval"]["recall_at_1"] <= 1
    assert summary["final_eval"]["loss"] < 0.9 * summary["base_eval"]["loss"]   # 0.744 -> 0.628
    d = out / "model"
    mods = json.loads((d / "modules.json").read_text())
    assert [x["type"].rsplit(".", 1)[1] for x in mods] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((d / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    # transformers' BertModel of the saved directory, pooled as modules.json says, gives the
    # engine's embeddings
    texts = ["Water came through the ceiling.", "My suitcase was lost on the flight to Porto."]
    tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.AutoModel.from_pretrained(d).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hs = hf(**enc).last_hidden_state
    m = enc["attention_mask"][:, :, None].float()
    want = torch.nn.functional.normalize((hs * m).sum(1) / m.sum(1), dim=1).numpy()
    model = engine.load(str(d))
    etok = engine.load_tokenizer(str(d))
    seqs = [np.asarray(etok.encode(t)) for t in texts]
    got, _ = S.embed(model, seqs, np.arange(2), 0)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_eval_of_a_sentence_encoder(minilm, tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl", 12)
    assert cli(["eval", "--model", "minilm", "--data", data]) == 0
    line = capsys.readouterr().out
    assert "ranking loss" in line and "recall@1" in line


def test_a_repeated_positive_is_not_a_negative():
    """Anchors 0 and 1 share a positive text: for anchor 0, copy 1 is not a negative (torch:
    cross-entropy with that logit masked out)."""
    rng = np.random.default_rng(2)
    u = rng.standard_normal((8, 6)).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ua, up = u[:4], u[4:].copy()
    up[1] = up[0]
    same = np.zeros((4, 4), bool)
    same[0, 1] = same[1, 0] = True
    loss, dua, dup = S.ranking_loss(ua, up, same=same | np.eye(4, dtype=bool))
    ta = torch.tensor(ua, dtype=torch.float64, requires_grad=True)
    tp = torch.tensor(up, dtype=torch.float64, requires_grad=True)
    s = S.SCALE * ta @ tp.T
    s = s.masked_fill(torch.tensor(same), float("-inf"))
    tl = torch.nn.functional.cross_entropy(s, torch.arange(4))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5
    np.testing.assert_allclose(dua, ta.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(dup, tp.grad.numpy(), atol=1e-5)


def test_recall_counts_a_repeated_positive(minilm):
    model, tok = engine.load("minilm"), engine.load_tokenizer("minilm")
    ids = lambda texts: [np.asarray(i) for i, _ in tok.encode_pairs(texts)]  # noqa: E731
    anchors = ids(["Water came through the kitchen ceiling.", "The basement flooded in the storm.",
                   "My suitcase was lost at the airport."])
    positives = ids(["damage to a house", "damage to a house", "lost luggage on a trip"])
    r = S.retrieval(model, anchors + positives, 8, 0)
    assert r["recall_at_1"] == 1.0      # either copy of "damage to a house" is a hit


def test_sentence_run_edges(minilm, tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl", 5)
    # one pair a batch has nothing to rank against
    assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
                "--batch-size", "1", "--out", str(tmp_path / "a")]) == 2
    assert "two or more pairs a batch" in capsys.readouterr().err
    # 5 pairs in batches of 4: each epoch's fifth is dropped, no step without a loss; the
    # embeddings alone trainable is a valid run; the saved length is the run's
    out = tmp_path / "b"
    assert cli(["finetune", "--model", "minilm", "--data", data, "--eval-fraction", "0",
                "--batch-size", "4", "--steps", "3", "--seq-len", "48", "--unfreeze", "ln_e.*",
                "--out", str(out)]) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in steps if "loss" in r)
    st = json.loads((out / "model" / "sentence_bert_config.json").read_text())
    assert st["max_seq_length"] == 48


def test_a_head_less_pooler_takes_no_step(minilm):
    """The pooler of an encoder without a head is on no path from its hidden states: even
    trainable, it gets no gradient, and AdamW's weight decay leaves it alone (torch: no .grad)."""
    m = engine.load("minilm").train_last(1).unfreeze("pooler.*")
    before = m.params["pooler.weight"].copy()
    opt = engine.AdamW(m, lr=1e-3, weight_decay=0.1)
    tokens = np.array([[101, 7592, 2088, 102]])
    h = m.forward(tokens, keep=True)
    m.backward(dhidden=np.ones_like(h))
    opt.step()
    assert np.array_equal(m.params["pooler.weight"], before)
    assert not np.array_equal(m.params["blocks.5.mlp.up.weight"],
                              engine.load("minilm").params["blocks.5.mlp.up.weight"])
