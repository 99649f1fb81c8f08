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
