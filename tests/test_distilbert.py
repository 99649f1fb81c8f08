"""DistilBERT encoders against transformers + PyTorch autograd: logits and hidden states of padded
batches, the loss and every gradient (the pre_classifier's ReLU in the pooler's place), files
saved back that transformers loads, a masked-LM checkpoint loaded as a classifier, and
`tailtune finetune` of text pairs (no token types: DistilBERT has none) with a WordPiece
tokenizer."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

import engine
from engine.cli import main as cli
from conftest import (attention_mask, compare_classifier_grads, perturb_norms, saved,
                      transformers_pair_logits)

CLAIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "claims")
LABELS = ["billing", "claim", "fraud"]
# odd sizes: heads of 10, a width and sequence lengths no kernel block divides
CFG = dict(vocab_size=97, dim=50, n_layers=3, n_heads=5, hidden_dim=74, max_position_embeddings=40,
           dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0)
B, T = 4, 17
LENGTHS = np.array([17, 9, 1, 13])


def hf_model(kind="classifier", seed=0, **over):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(**{**CFG, **over})
    if kind == "classifier":
        cfg.id2label = dict(enumerate(LABELS))
        cfg.label2id = {n: i for i, n in enumerate(LABELS)}
        m = transformers.DistilBertForSequenceClassification(cfg)
    else:
        m = (transformers.DistilBertModel if kind == "encoder"
             else transformers.DistilBertForMaskedLM)(cfg)
    cfg.architectures = [type(m).__name__]
    return perturb_norms(m, "layer_norm", "LayerNorm")



def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG["vocab_size"], (B, T))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = 0                                    # padding on the right
    return tokens, np.array([2, 0, 1, 1])


def mask():
    return attention_mask(LENGTHS, T)


def test_classifier_logits_and_hidden_states_match_transformers(tmp_path):
    hf = hf_model()
    model = engine.load(saved(hf, tmp_path))
    c = model.config
    assert (c.model_type, c.type_vocab_size, c.pooler_act, c.labels) == ("distilbert", 0, "relu", LABELS)
    tokens, _ = batch()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=mask()).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens, lengths=LENGTHS), want, rtol=1e-4, atol=1e-5)
    enc = hf_model(kind="encoder", seed=1)
    model = engine.load(saved(enc, tmp_path, "enc"))
    with torch.no_grad():
        want = enc(input_ids=torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    got = model.forward(tokens, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):          # padded positions' states are not outputs
        np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("train_last", [None, 1])
def test_loss_and_every_gradient_match_torch(tmp_path, train_last):
    hf = hf_model()
    model = engine.load(saved(hf, tmp_path))
    if train_last is None:
        model.set_trainable(list(model.params))
    else:
        model.train_last(train_last)
        for n, p in hf.named_parameters():
            p.requires_grad_(n.startswith(("pre_classifier", "classifier",
                                           "distilbert.transformer.layer.2.")))
    compare_classifier_grads(model, hf, *batch(1), LENGTHS)


def test_saved_files_load_in_transformers_as_they_were(tmp_path):
    for kind, cls in (("classifier", transformers.DistilBertForSequenceClassification),
                      ("encoder", transformers.DistilBertModel)):
        hf = hf_model(kind)
        engine.load(saved(hf, tmp_path, kind)).save(str(tmp_path / f"{kind}-out"))
        cfg = json.loads((tmp_path / f"{kind}-out" / "config.json").read_text())
        assert cfg["model_type"] == "distilbert" and cfg["architectures"] == [cls.__name__]
        back = cls.from_pretrained(tmp_path / f"{kind}-out").eval()
        want = hf.state_dict()
        # (a DistilBertModel has no pooler, and neither has the engine's model of it)
        assert engine.load(str(tmp_path / f"{kind}-out")).num_params() == sum(
            p.numel() for p in hf.parameters())
        from safetensors import safe_open
        with safe_open(str(tmp_path / f"{kind}-out" / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(want)       # no pooler added to a DistilBertModel
        for n, p in back.state_dict().items():
            assert torch.equal(p, want[n]), n


def test_a_new_distilbert_without_a_pad_id_saves_and_loads_back(tmp_path):
    model = engine.Model(engine.Config.distilbert(vocab_size=61, n_layer=2, n_head=2, d_model=16,
                                                  d_ff=24, max_seq_len=32, pad_token_id=None,
                                                  labels=["a", "b"]))
    model.save(str(tmp_path / "m"))
    back = engine.load(str(tmp_path / "m"))
    assert back.config == model.config
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    tokens = np.random.default_rng(0).integers(0, 61, (2, 9))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(back.forward(tokens), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_with_classifier_for_other_labels_is_loading_with_them(tmp_path, family):
    """A classifier's own dense layer (pre_classifier; RoBERTa's classifier.dense) is kept and
    the classifier starts anew, in both ways of asking for other labels (as transformers'
    ignore_mismatched_sizes does)."""
    if family == "roberta":
        from test_roberta import hf_model as roberta_model
        d = saved(roberta_model(), tmp_path)
    else:
        d = saved(hf_model(), tmp_path)
    loaded, added = engine.load(d, labels=["x", "y"]), engine.load(d).with_classifier(["x", "y"])
    assert loaded.params.keys() == added.params.keys()
    for n, a in loaded.params.items():
        assert np.array_equal(a, added.params[n]), n
    assert np.array_equal(loaded.params["pooler.weight"], engine.load(d).params["pooler.weight"])


def test_a_masked_lm_checkpoint_loads_as_a_new_classifier(tmp_path, capsys):
    mlm = hf_model(kind="mlm")
    d = saved(mlm, tmp_path)
    model = engine.load(d, labels=LABELS)
    assert "no classifier or pooler for these 3 labels" in capsys.readouterr().err
    assert np.array_equal(model.params["blocks.1.attn.q.weight"],
                          mlm.distilbert.transformer.layer[1].attention.q_lin.weight.detach().numpy())
    # a headless load gets no message for the pooler a DistilBertModel lacks
    engine.load(d)
    assert "pooler" not in capsys.readouterr().err
    # with_classifier of it starts the head as loading with labels does
    added = engine.load(d).with_classifier(LABELS)
    for n, a in model.params.items():
        assert np.array_equal(a, added.params[n]), n


def test_other_labels_keep_the_pre_classifier(tmp_path):
    hf = hf_model()
    model = engine.load(saved(hf, tmp_path), labels=["a", "b"])
    assert np.array_equal(model.params["pooler.weight"], hf.pre_classifier.weight.detach().numpy())
    assert model.params["classifier.weight"].shape == (2, 50)


def test_finetune_of_text_pairs(tmp_path, minilm):
    """Pairs tokenized by a WordPiece tokenizer (all-MiniLM's) without token types, as
    transformers' DistilBERT tokenizer gives them; the saved model and tokenizer run by
    transformers give the engine's logits."""
    hf = hf_model(vocab_size=30522, max_position_embeddings=66, dim=40, n_heads=4)
    d = saved(hf, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(minilm, f)):
            shutil.copy(os.path.join(minilm, f), d)
    rows = [json.loads(x) for x in open(os.path.join(CLAIMS, "category_train.jsonl"))][:48]
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for r in rows:
            first, _, rest = r["text"].partition(". ")
            f.write(json.dumps({"text": first, "text_pair": rest or first,
                                "label": LABELS[len(r["text"]) % 3]}) + "\n")
    out = tmp_path / "run"
    assert cli(["finetune", "--model", d, "--data", str(data), "--eval-fraction", "0.25",
                "--train-last", "1", "--steps", "6", "--batch-size", "8", "--seq-len", "64",
                "--out", str(out)]) == 0
    enc, want = transformers_pair_logits(out / "model", [json.loads(x) for x in open(data)][:6], 64)
    assert "token_type_ids" not in enc
    model = engine.load(str(out))
    np.testing.assert_allclose(model.forward(enc["input_ids"].numpy(),
                                             lengths=enc["attention_mask"].sum(1).numpy()),
                               want, rtol=1e-4, atol=1e-5)
