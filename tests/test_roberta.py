"""RoBERTa and XLM-RoBERTa encoders against transformers + PyTorch autograd: logits and hidden
states of padded batches (positions counted from the pad id + 1), the loss and every gradient
with the embeddings trainable, files saved back that transformers loads, a masked-LM checkpoint
loaded as a classifier, and `tailtune finetune` of text pairs with a byte-level BPE tokenizer."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from engine.cli import main as cli
from conftest import (attention_mask, hf_grads_as_engine, perturb_norms, saved,
                      transformers_pair_logits)

CLAIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "claims")
LABELS = ["billing", "claim", "fraud"]
# odd sizes: heads of 10, a width and sequence lengths no kernel block divides
CFG = dict(vocab_size=97, hidden_size=50, num_hidden_layers=3, num_attention_heads=5,
           intermediate_size=74, max_position_embeddings=40, type_vocab_size=1,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
           bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
B, T = 4, 17
LENGTHS = np.array([17, 9, 1, 13])
FAMILIES = {"roberta": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification,
                        transformers.RobertaModel, transformers.RobertaForMaskedLM),
            "xlm-roberta": (transformers.XLMRobertaConfig,
                            transformers.XLMRobertaForSequenceClassification,
                            transformers.XLMRobertaModel, transformers.XLMRobertaForMaskedLM)}


def hf_model(family="roberta", kind="classifier", seed=0, **over):
    Cfg, Classifier, Encoder, MaskedLM = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = Cfg(**{**CFG, **over})
    if kind == "classifier":
        cfg.id2label = dict(enumerate(LABELS))
        cfg.label2id = {n: i for i, n in enumerate(LABELS)}
        m = Classifier(cfg)
    else:
        m = (Encoder if kind == "encoder" else MaskedLM)(cfg)
    cfg.architectures = [type(m).__name__]
    with torch.no_grad():   # the pad's position row non-zero
        for n, p in m.named_parameters():
            if "position_embeddings" in n:
                p.normal_(0.0, 0.3)
    return perturb_norms(m, "LayerNorm")



def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG["vocab_size"], (B, T))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = CFG["pad_token_id"]                   # padding on the right
    return tokens, np.array([2, 0, 1, 1])


def mask():
    return attention_mask(LENGTHS, T)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_classifier_logits_and_hidden_states_match_transformers(tmp_path, family):
    hf = hf_model(family)
    model = engine.load(saved(hf, tmp_path))
    c = model.config
    assert (c.model_type, c.position_offset, c.labels, c.type_vocab_size) == (family, 2, LABELS, 1)
    assert c.context_length == 38          # 40 rows, the first two below the offset
    tokens, _ = batch()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=mask()).logits.numpy()
    got = model.forward(tokens, lengths=LENGTHS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    enc = hf_model(family, kind="encoder", seed=1)
    model = engine.load(saved(enc, tmp_path, "enc"))
    assert model.config.labels is None
    with torch.no_grad():
        want = enc(input_ids=torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    got = model.forward(tokens, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):          # padded positions' states are not outputs
        np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-4, atol=1e-4)


def test_a_sequence_as_long_as_the_table_allows(tmp_path):
    """38 tokens use rows 2..39; one more is refused by name, not an index error."""
    model = engine.load(saved(hf_model(), tmp_path))
    hf = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(3).integers(3, 97, (2, 38))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(engine.InputError, match="38"):
        model.forward(np.full((1, 39), 5))


def test_loss_and_every_gradient_match_torch_with_the_embeddings_trainable(tmp_path):
    """The position table's gradient lands on rows 2.. (the offset), as torch's does."""
    hf = hf_model()
    model = engine.load(saved(hf, tmp_path))
    model.set_trainable(list(model.params))
    tokens, labels = batch(1)
    loss = model.forward(tokens, labels, lengths=LENGTHS)
    model.backward()
    hf.train()
    for m in hf.modules():      # dropout is configured off; train mode for the autograd tape
        assert not isinstance(m, torch.nn.Dropout) or m.p == 0.0
    out = hf(input_ids=torch.tensor(tokens), attention_mask=mask(), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    want = hf_grads_as_engine(model, hf)
    for n, g in model.grads.items():
        scale = float(np.abs(want[n]).max()) or 1.0
        np.testing.assert_allclose(g, want[n], rtol=0, atol=2e-5 * max(scale, 1e-2), err_msg=n)
    wpe = model.grads["wpe.weight"]
    assert not wpe[:2].any() and wpe[2:19].any() and not wpe[19:].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_files_load_in_transformers_as_they_were(tmp_path, family):
    hf = hf_model(family)
    src = saved(hf, tmp_path)
    model = engine.load(src)
    model.save(str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["max_position_embeddings"] == 40
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0, 2)
    back = FAMILIES[family][1].from_pretrained(tmp_path / "out").eval()
    want = dict(hf.state_dict())
    for n, p in back.state_dict().items():        # every tensor as it was, the table's first rows too
        assert torch.equal(p, want[n]), n
    # and the headless encoder, as a RobertaModel
    enc = hf_model(family, kind="encoder", seed=2)
    engine.load(saved(enc, tmp_path, "enc")).save(str(tmp_path / "enc-out"))
    back = FAMILIES[family][2].from_pretrained(tmp_path / "enc-out").eval()
    for n, p in back.state_dict().items():
        assert torch.equal(p, enc.state_dict()[n]), n


def test_a_masked_lm_checkpoint_loads_as_a_new_classifier(tmp_path, capsys):
    """roberta-base is a RobertaForMaskedLM: its lm_head is dropped and the head starts anew,
    as transformers' RobertaForSequenceClassification.from_pretrained starts it."""
    mlm = hf_model(kind="mlm")
    model = engine.load(saved(mlm, tmp_path), labels=LABELS)
    assert "no classifier or pooler for these 3 labels" in capsys.readouterr().err
    enc = mlm.roberta
    assert np.array_equal(model.params["blocks.2.mlp.up.weight"],
                          enc.encoder.layer[2].intermediate.dense.weight.detach().numpy())
    assert not any("lm_head" in n for n in model.params)


def test_other_labels_keep_the_dense_layer_and_start_a_new_out_proj(tmp_path, capsys):
    hf = hf_model()
    model = engine.load(saved(hf, tmp_path), labels=["a", "b"])
    assert "no classifier for these 2 labels" in capsys.readouterr().err
    assert np.array_equal(model.params["pooler.weight"],
                          hf.classifier.dense.weight.detach().numpy())
    assert model.params["classifier.weight"].shape == (2, 50)


def test_with_classifier_starts_the_head_as_loading_with_labels_does(tmp_path):
    """A RobertaModel's pooler is not a classifier's dense layer: transformers starts that
    anew, and so do load(labels=) and with_classifier (the same draw); the prefix cache's key
    does not depend on the head."""
    d = saved(hf_model(kind="encoder"), tmp_path)
    loaded, added = engine.load(d, labels=LABELS), engine.load(d).with_classifier(LABELS)
    assert loaded.params.keys() == added.params.keys()
    for n, a in loaded.params.items():
        assert np.array_equal(a, added.params[n]), n
    from engine.prefix_cache import prefix_hash
    assert prefix_hash(loaded, 2) == prefix_hash(engine.load(d), 2)


def test_missing_token_ids_are_robertas_defaults(tmp_path):
    d = saved(hf_model(), tmp_path)
    cfg = json.loads(open(f"{d}/config.json").read())
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        del cfg[k]
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f)
    want = transformers.RobertaConfig.from_pretrained(d)
    model = engine.load(d)
    assert model.config.position_offset == 2
    model.save(str(tmp_path / "out"))
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (back["bos_token_id"], back["eos_token_id"], back["pad_token_id"]) == (
        want.bos_token_id, want.eos_token_id, want.pad_token_id) == (0, 2, 1)


def test_a_config_without_pad_id_is_refused(tmp_path):
    d = saved(hf_model(), tmp_path)
    cfg = json.loads(open(f"{d}/config.json").read())
    cfg["pad_token_id"] = None
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(engine.ConfigError, match="needs pad_token_id"):
        engine.load(d)


def _tokenizer_dir(tmp_path, typed=False):
    """A byte-level BPE tokenizer as RoBERTa's (<s> a </s></s> b </s>), trained on a few texts;
    typed: a template that numbers the second text 1 (RoBERTa's own gives it 0)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    rows = [json.loads(x) for x in open(os.path.join(CLAIMS, "category_train.jsonl"))][:200]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([r["text"] for r in rows], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = (processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1",
        special_tokens=[("<s>", 0), ("</s>", 2)]) if typed else
        processors.RobertaProcessing(("</s>", 2), ("<s>", 0)))
    # (RobertaTokenizerFast would put RobertaProcessing back in place of a typed template)
    cls = transformers.PreTrainedTokenizerFast if typed else transformers.RobertaTokenizerFast
    fast = cls(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>",
               cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
               model_input_names=["input_ids", "attention_mask"])
    assert any(fast("a", "b")["input_ids"]) and typed == any(
        tk.encode("a", "b").type_ids)
    return rows, fast, tk.get_vocab_size()


@pytest.mark.parametrize("typed", [False, True])
def test_finetune_of_text_pairs(tmp_path, typed):
    """A classifier of (text, text_pair) rows: the pairs tokenized as transformers' RoBERTa
    tokenizer does (no token types: RoBERTa has one), trained, saved, and the saved model and
    tokenizer run by transformers give the engine's logits (the saved tokenizer does not hand
    transformers a template's type ids, which would index past the one-row table)."""
    rows, tok, V = _tokenizer_dir(tmp_path, typed)
    hf = hf_model(vocab_size=V, max_position_embeddings=66, hidden_size=40, num_attention_heads=4)
    d = saved(hf, tmp_path)
    tok.save_pretrained(d)
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for r in rows[:48]:
            first, _, rest = r["text"].partition(". ")
            f.write(json.dumps({"text": first, "text_pair": rest or first,
                                "label": LABELS[len(r["text"]) % 3]}) + "\n")
    out = tmp_path / "run"
    assert cli(["finetune", "--model", d, "--data", str(data), "--eval-fraction", "0.25",
                "--train-last", "1", "--steps", "6", "--batch-size", "8", "--seq-len", "64",
                "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["final_eval"] is not None
    pairs = [json.loads(x) for x in open(data)][:6]
    enc, want = transformers_pair_logits(out / "model", pairs, 64)
    assert "token_type_ids" not in enc
    model = engine.load(str(out))
    mine = engine.tokenizer.load_tokenizer(str(out / "model"))
    from engine.classify import batch as pad_batch, encode
    seqs = encode(mine, [(p["text"], p["text_pair"]) for p in pairs], 64, model.config)
    tokens, lengths, types = pad_batch(seqs, np.arange(len(seqs)), 1)
    assert types is None
    assert tokens.tolist() == enc["input_ids"].tolist()
    np.testing.assert_allclose(model.forward(tokens, lengths=lengths), want, rtol=1e-4, atol=1e-5)


def test_sentence_embeddings_and_inspect(tmp_path, capsys, monkeypatch):
    """A RoBERTa sentence encoder trains on (anchor, positive) pairs, its frozen prefix cached
    on disk, and saves a RobertaModel whose hidden states transformers reproduces; `inspect`
    costs a model whose context (38) is below its default length (256)."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    rows, tok, V = _tokenizer_dir(tmp_path)
    d = saved(hf_model(kind="encoder", vocab_size=V, max_position_embeddings=66,
                       hidden_size=40, num_attention_heads=4), tmp_path)
    tok.save_pretrained(d)
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for r in rows[:40]:
            f.write(json.dumps({"anchor": r["text"].split(". ")[0], "positive": r["text"]}) + "\n")
    out = tmp_path / "run"
    assert cli(["finetune", "--model", d, "--data", str(data), "--train-last", "1", "--steps", "6",
                "--batch-size", "8", "--seq-len", "64", "--prefix-cache", "disk",
                "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prefix_cache"]["storage"] == "disk" and summary["prefix_cache"]["start"] == 2
    back = transformers.AutoModel.from_pretrained(out / "model").eval()
    assert type(back).__name__ == "RobertaModel"
    tokens = np.random.default_rng(4).integers(3, V, (2, 20))
    with torch.no_grad():
        want = back(input_ids=torch.tensor(tokens)).last_hidden_state.numpy()
    np.testing.assert_allclose(engine.load(str(out / "model")).forward(tokens), want,
                               rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert cli(["inspect", "--model", saved(hf_model(), tmp_path, "clf"), "--train-last", "1"]) == 0
    assert "full fine-tuning would be" in capsys.readouterr().out
