"""Token classifiers (NER) on encoders against transformers + PyTorch autograd: logits, the loss
and every gradient of BERT, RoBERTa and DistilBERT *ForTokenClassification under freezing,
files saved back that transformers loads, other heads replaced; words tokenized as
transformers' is_split_into_words does; entity scores against hand-counted examples; and
`tailtune finetune` / `eval` on the claims entity data with the real all-MiniLM-L6-v2."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from engine.cli import main as cli
from engine.token_tags import chunks, entity_scores
from conftest import attention_mask, hf_grads_as_engine, perturb_norms, saved
from test_model_vs_torch import set_torch_trainable

CLAIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "claims")
TAGS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
B, T = 4, 13
LENGTHS = np.array([13, 5, 1, 9])
COMMON = dict(vocab_size=97, max_position_embeddings=32, pad_token_id=1,
              id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
FAMILIES = {
    "bert": lambda: transformers.BertForTokenClassification(transformers.BertConfig(
        hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=52,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **COMMON)),
    "roberta": lambda: transformers.RobertaForTokenClassification(transformers.RobertaConfig(
        hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=58,
        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        bos_token_id=0, eos_token_id=2, **COMMON)),
    "distilbert": lambda: transformers.DistilBertForTokenClassification(transformers.DistilBertConfig(
        dim=32, n_layers=3, n_heads=4, hidden_dim=50, dropout=0.0, attention_dropout=0.0,
        **COMMON)),
}


def hf_model(family, seed=0):
    torch.manual_seed(seed)
    m = FAMILIES[family]()
    m.config.architectures = [type(m).__name__]
    return perturb_norms(m, "LayerNorm", "layer_norm")


def batch(seed=0):
    """Tokens padded on the right (pad id 1), tags with -100 on the padding, on a word's later
    pieces and on the special tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 97, (B, T))
    targets = rng.integers(0, len(TAGS), (B, T))
    pad = np.arange(T)[None] >= LENGTHS[:, None]
    tokens[pad] = 1
    targets[pad] = -100
    targets[0, [0, 4, 5]] = -100
    targets[3, 0] = -100
    return tokens, targets


@pytest.mark.parametrize("train", ["last1", "all", "classifier-only"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_loss_and_gradients_match_transformers(tmp_path, family, train):
    hf = hf_model(family).eval()
    model = engine.load(saved(hf, tmp_path))
    assert model.config.per_token and model.config.labels == TAGS and model.pooler is None
    tokens, targets = batch()
    mask = attention_mask(LENGTHS, T)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=mask).logits.numpy()
    got = model.forward(tokens, lengths=LENGTHS)
    live = ~(np.arange(T)[None] >= LENGTHS[:, None])
    np.testing.assert_allclose(got[live], want[live], rtol=0, atol=2e-5 * np.abs(want).max())
    {"last1": lambda: model.train_last(1), "all": model.unfreeze,
     "classifier-only": lambda: model.freeze().unfreeze("classifier.*")}[train]()
    set_torch_trainable(model, hf)
    loss = model.forward(tokens, targets, lengths=LENGTHS)
    model.backward()
    out = hf(input_ids=torch.tensor(tokens), attention_mask=mask, labels=torch.tensor(targets))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    ref = hf_grads_as_engine(model, hf)
    assert set(model.grads) == set(model.trainable)
    for n, g in model.grads.items():
        if n.endswith("attn.k.bias"):   # 0 in exact arithmetic: rounding noise on both sides
            continue
        scale = max(float(np.abs(ref[n]).max()), 1e-3)
        np.testing.assert_allclose(g, ref[n], rtol=0, atol=3e-5 * scale, err_msg=n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_token_classifiers_load_in_transformers(tmp_path, family):
    """An engine token classifier (trained a step) saves as the family's
    *ForTokenClassification with its tags, and loads back as one."""
    model = engine.load(saved(hf_model(family), tmp_path)).train_last(1)
    tokens, targets = batch(1)
    opt = engine.AdamW(model, lr=1e-2)
    model.forward(tokens, targets, lengths=LENGTHS)
    model.backward()
    opt.step()
    model.save(str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForTokenClassification")
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out").eval()
    assert [back.config.id2label[i] for i in range(len(TAGS))] == TAGS
    with torch.no_grad():
        want = back(input_ids=torch.tensor(tokens), attention_mask=attention_mask(LENGTHS, T)).logits.numpy()
    got = model.forward(tokens, lengths=LENGTHS)
    live = np.arange(T)[None] < LENGTHS[:, None]
    np.testing.assert_allclose(got[live], want[live], rtol=0, atol=2e-5 * np.abs(want).max())
    again = engine.load(str(tmp_path / "out"))
    assert again.config.per_token and again.config.labels == TAGS
    assert all(np.array_equal(again.params[n], model.params[n]) for n in model.params)


def test_other_heads_are_replaced_and_the_pooler_left_out(tmp_path, capsys):
    """A sequence classifier (BERT: pooler + classifier) and a token classifier of other tags
    load as a token classifier of these tags: the encoder kept, the pooler left out, the
    classifier new; the same tags keep the file's classifier."""
    torch.manual_seed(0)
    seq = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=52, max_position_embeddings=32, num_labels=3))
    seq.config.architectures = ["BertForSequenceClassification"]
    path = saved(seq, tmp_path, "seq")
    m = engine.load(path, labels=TAGS, per_token=True)
    assert m.config.per_token and m.pooler is None and "pooler.weight" not in m.params
    assert m.params["classifier.weight"].shape == (len(TAGS), 36)
    assert "classifier starts from random weights" in capsys.readouterr().err
    np.testing.assert_array_equal(m.params["blocks.1.mlp.up.weight"],
                                  seq.bert.encoder.layer[1].intermediate.dense.weight.detach().numpy())
    tagged = saved(hf_model("bert"), tmp_path, "tok")
    same = engine.load(tagged, labels=TAGS, per_token=True)
    np.testing.assert_array_equal(same.params["classifier.weight"],
                                  engine.load(tagged).params["classifier.weight"])
    other = engine.load(tagged, labels=["O", "B-X"], per_token=True)
    assert other.params["classifier.weight"].shape == (2, 36)
    as_sequence = engine.load(tagged, labels=["a", "b"])
    assert not as_sequence.config.per_token and as_sequence.pooler is not None
    heads = m.with_classifier(["x", "y"])            # back to a sequence classifier: a pooler
    assert not heads.config.per_token and "pooler.weight" in heads.params
    with pytest.raises(engine.InputError, match="per_token must be True or False"):
        engine.load(tagged, per_token=True)
    with pytest.raises(engine.InputError, match="token classifier is an encoder's"):
        engine.load(_causal_dir(tmp_path), labels=TAGS, per_token=True)


def _causal_dir(tmp_path):
    cfg = engine.Config.gpt2(vocab_size=61, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    engine.Model(cfg).save(str(tmp_path / "gpt2"))
    return str(tmp_path / "gpt2")


def test_targets_are_checked():
    model = engine.Model(engine.Config.bert(vocab_size=50, n_layer=1, n_head=2, d_model=16,
                                            d_ff=24, max_seq_len=16, labels=TAGS, per_token=True))
    tokens = np.ones((2, 5), np.int64)
    for bad, msg in [(np.zeros(2, np.int64), r"of the tokens' shape \(2, 5\)"),
                     (np.full((2, 5), 5), "targets hold class 5"),
                     (np.full((2, 5), -1), "targets hold class -1"),
                     (np.zeros((2, 5)), "got float64")]:
        with pytest.raises(engine.InputError, match=msg):
            model.forward(tokens, bad)
    assert np.isnan(model.forward(tokens, np.full((2, 5), -100)))
    with pytest.raises(engine.ConfigError, match="per_token"):
        engine.Config.llama(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                            labels=TAGS, per_token=True)


@pytest.mark.parametrize("which", ["minilm", "roberta"])
def test_words_encode_as_transformers_splits_them(minilm, tmp_path, which):
    """Tokenizer.encode_words: ids and each id's word as transformers' fast tokenizer gives
    them with is_split_into_words (RoBERTa's with add_prefix_space=True), cut or not."""
    words = [["Claim", "at", "São", "Paulo", "!", "neighbour's", "$", "12", ",", "400"], ["x"],
             ["unbelievably", "long", "words", "again", "and", "again"]]
    if which == "minilm":
        d = minilm
        ref = transformers.AutoTokenizer.from_pretrained(d)
    else:
        from test_roberta import _tokenizer_dir
        _, fast, _ = _tokenizer_dir(tmp_path)
        fast.save_pretrained(tmp_path / "rt")
        d = str(tmp_path / "rt")
        ref = transformers.AutoTokenizer.from_pretrained(d, add_prefix_space=True)
    tok = engine.load_tokenizer(d)
    for max_length in (None, 7):
        got = tok.encode_words(words, max_length=max_length)
        enc = ref(words, is_split_into_words=True, truncation=max_length is not None,
                  max_length=max_length)
        for i, (ids, word_ids) in enumerate(got):
            assert ids == enc["input_ids"][i] and word_ids == enc.word_ids(i), (max_length, i)
    for bad in (lambda: tok.encode_words([["a", "\ud800"]]), lambda: tok.encode_pairs(["a \ud800"])):
        with pytest.raises(engine.InputError, match="lone surrogate"):
            bad()


def test_each_word_is_labeled_at_its_first_piece(minilm):
    """align(): a word's tag at its first piece, -100 at its other pieces, at the special
    tokens and at everything of the words cut away (counted)."""
    from engine.token_tags import align
    tok = engine.load_tokenizer(minilm)
    words = [["wet", "unbelievably", "Kyoto", "floors"], ["a", "b", "c", "d", "e", "f"]]
    tags = [["B-X", "O", "B-Y", "I-Y"], ["O"] * 6]
    index = {"O": 0, "B-X": 1, "B-Y": 2, "I-Y": 3}
    seqs, targets, lost = align(tok, words, tags, 8, index)
    for (ids, _), t, ws, ts in zip(seqs, targets, words, tags):
        expected, prev = [], None
        for w in tok.encode_words([ws], max_length=8)[0][1]:
            expected.append(-100 if w is None or w == prev else index[ts[w]])
            prev = w
        assert t.tolist() == expected and len(ids) == len(t)
    # "wet", then "unbelievably" in 5 pieces: "Kyoto" and "floors" cut away (the second
    # row's six words all fit)
    assert targets[0].tolist() == [-100, 1, 0, -100, -100, -100, -100, -100]
    assert lost == 2 + 0


def test_entities_are_counted_as_seqeval_counts_them():
    """Chunks of IOB2, IOB1 and prefix-less tags, and micro scores, against hand counts."""
    assert chunks(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert chunks(["I-PER", "I-PER", "B-PER", "I-LOC"]) == {("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4)}
    assert chunks(["PER", "PER", "O", "LOC", "PER"]) == {("PER", 0, 2), ("LOC", 3, 4), ("PER", 4, 5)}
    assert chunks(["O", "O"]) == set()
    # IOBES and IOE, by seqeval's get_entities rules (its source compared on 20,000 random
    # sequences when this was written; the counts below are by hand)
    assert chunks(["S-PER", "B-PER", "E-PER", "E-LOC", "I-LOC"]) == {
        ("PER", 0, 1), ("PER", 1, 3), ("LOC", 3, 4), ("LOC", 4, 5)}
    assert chunks(["I-PER", "E-PER", "I-PER", "O", "E-LOC"]) == {
        ("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)}
    assert entity_scores([["S-PER", "B-PER", "E-PER"]], [["I-PER", "B-PER", "E-PER"]])["f1"] == 1.0
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "B-PER"]]
    # gold 3 entities, predicted 4; right: LOC (row 0), LOC (row 1)
    s = entity_scores(gold, pred)
    assert s["precision"] == 2 / 4 and s["recall"] == 2 / 3
    assert s["f1"] == pytest.approx(2 * 2 / 7)
    assert s["per_type"] == {"LOC": 1.0, "PER": 0.0}


def _ner_rows(n, which="train"):
    return [json.loads(x) for x in open(os.path.join(CLAIMS, f"ner_{which}.jsonl"))][:n]


def test_finetune_and_eval_of_the_claims_entities(minilm, tmp_path, capsys):
    """all-MiniLM-L6-v2, the last 2 blocks and a new token classifier on the claims entity
    data: entity F1 from near 0 to above 0.8; `eval` gives the summary's figures; the saved
    model in transformers' token-classification pipeline finds the entities of a new text."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _ner_rows(160)) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps(r) for r in _ner_rows(40, "test")) + "\n")
    out = tmp_path / "run"
    assert cli(["finetune", "--model", minilm, "--data", str(data), "--eval-data", str(held),
                "--train-last", "2", "--steps", "40", "--batch-size", "16", "--lr", "1e-3",
                "--seq-len", "96", "--grad-accum", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "token classification"
    assert summary["base_eval"]["f1"] < 0.1 and summary["final_eval"]["f1"] > 0.8, summary
    capsys.readouterr()
    assert cli(["eval", "--model", str(out), "--data", str(held), "--seq-len", "96"]) == 0
    printed = capsys.readouterr().out
    assert f"entity F1 {summary['final_eval']['f1']:.3f}" in printed
    pipe = transformers.pipeline("token-classification", model=str(out / "model"),
                                 aggregation_strategy="simple")
    found = {(e["entity_group"], e["word"]) for e in pipe(
        "A storm hit our home near Denver. The damage comes to $4,200. This happened 9 days ago.")}
    assert ("PLACE", "denver") in found and ("DELAY", "9 days") in found, found


def test_a_base_model_with_a_head_the_engine_does_not_train(tmp_path):
    """A multi-label BERT classifier as the base of a token classifier: its head is replaced."""
    from engine.token_tags import choose_tags
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=97, hidden_size=36, num_hidden_layers=1, num_attention_heads=3,
        intermediate_size=52, max_position_embeddings=32, num_labels=3,
        problem_type="multi_label_classification"))
    hf.config.architectures = ["BertForSequenceClassification"]
    path = saved(hf, tmp_path)
    assert choose_tags(path, ["O", "B-X", "O"]) == ["B-X", "O"]
    assert engine.load(path, labels=["B-X", "O"], per_token=True).config.per_token


def test_bad_rows_and_runs_are_refused(minilm, tmp_path, capsys):
    for rows, msg in [([{"tokens": ["a", "b"], "tags": ["O"]}], "2 words and 1 tags"),
                      ([{"tokens": "a b", "tags": ["O", "O"]}], '"tokens" must be a list of strings'),
                      ([{"tokens": ["a"], "tags": [""]}], '"tags" must be a list of non-empty'),
                      ([{"tokens": [], "tags": []}], "a row without words"),
                      ([{"tokens": ["a", "b"], "tags": [0, 3]}], '"tags" holds integers; tags are names'),
                      ([{"tokens": ["a", "\ud800"], "tags": ["O", "B-X"]}] * 4,
                       "not valid Unicode \\(lone surrogate"),
                      ([{"tokens": ["a"], "tags": ["O"]}] * 4, "one tag \\('O'\\)")]:
        data = tmp_path / "bad.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        assert cli(["finetune", "--model", minilm, "--data", str(data), "--eval-fraction", "0",
                    "--out", str(tmp_path / "never")]) == 2
        import re
        assert re.search(msg, capsys.readouterr().err), msg
        assert not (tmp_path / "never").exists()
    data = tmp_path / "ok.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _ner_rows(8)) + "\n")
    assert cli(["finetune", "--model", _causal_dir(tmp_path), "--data", str(data),
                "--out", str(tmp_path / "never")]) == 2
    assert "token classifier is an encoder's" in capsys.readouterr().err
    assert cli(["eval", "--model", minilm, "--data", str(data)]) == 2
    assert "not a token classifier" in capsys.readouterr().err
