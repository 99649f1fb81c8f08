"""BERT encoders against transformers + PyTorch autograd: hidden states and classifier logits
of padded batches, the loss and every trainable gradient under freezing patterns, files saved
back that transformers loads; and the real all-MiniLM-L6-v2."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from conftest import attention_mask, engine_to_hf_names, hf_grads_as_engine, perturb_norms, saved

LABELS = ["billing", "claim", "fraud"]
# odd sizes: heads of 10, a width and sequence lengths no kernel block divides
CFG = dict(vocab_size=97, hidden_size=50, num_hidden_layers=3, num_attention_heads=5,
           intermediate_size=74, max_position_embeddings=40, type_vocab_size=2,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
B, T = 4, 17
LENGTHS = np.array([17, 9, 1, 13])


def hf_model(kind="classifier", seed=0, **over):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(**copy.deepcopy({**CFG, **over}))
    if kind == "classifier":
        cfg.id2label = dict(enumerate(LABELS))
        cfg.label2id = {n: i for i, n in enumerate(LABELS)}
        cfg.architectures = ["BertForSequenceClassification"]
        m = transformers.BertForSequenceClassification(cfg)
    else:
        cfg.architectures = ["BertModel"]
        m = transformers.BertModel(cfg)
    return perturb_norms(m, "LayerNorm")



def batch(seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (B, T))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = 0                                    # padding on the right
    return tokens, np.array([2, 0, 1, 1])


def mask():
    return attention_mask(LENGTHS, T)


def test_hidden_states_match_bert_model(tmp_path):
    hf = hf_model("encoder")
    m = engine.load(saved(hf, tmp_path))
    assert m.config.labels is None and m.config.encoder
    tokens, _ = batch()
    got = m.forward(tokens, lengths=LENGTHS)
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    for b, n in enumerate(LENGTHS):   # padding positions' outputs are not compared: unused
        np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-4, atol=2e-5)


def test_unpadded_batch_needs_no_lengths(tmp_path):
    hf = hf_model("encoder")
    m = engine.load(saved(hf, tmp_path))
    tokens = np.random.default_rng(1).integers(1, 97, (2, 11))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).last_hidden_state.numpy()
    np.testing.assert_allclose(m.forward(tokens), want, rtol=1e-4, atol=2e-5)


def test_tanh_gelu_bert(tmp_path):
    hf = hf_model("encoder", hidden_act="gelu_new")
    m = engine.load(saved(hf, tmp_path))
    assert m.config.mlp == "gelu"
    tokens, _ = batch(2)
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    np.testing.assert_allclose(m.forward(tokens, lengths=LENGTHS)[0], want[0], rtol=1e-4, atol=2e-5)


def torch_loss(hf, tokens, labels):
    out = hf(torch.tensor(tokens), attention_mask=mask(), labels=torch.tensor(labels))
    return out.loss, out.logits


FREEZES = {
    "all": lambda m: m.unfreeze(),
    "last1": lambda m: m.train_last(1),
    "last2": lambda m: m.train_last(2),
    "head-only": lambda m: m.train_last(0),
    "classifier-only": lambda m: m.freeze().unfreeze("classifier.*"),
    "middle-block": lambda m: m.freeze().unfreeze("blocks.1.*"),
    "embeddings": lambda m: m.freeze().unfreeze("wte.weight", "wtt.weight", "ln_e.*"),
    "mlp-only-in-last2": lambda m: m.train_last(2).freeze("blocks.*.attn.*"),
    "attn-only-in-last2": lambda m: m.train_last(2).freeze("blocks.*.mlp.*", "blocks.*.ln*"),
    "norms-only": lambda m: m.freeze().unfreeze("blocks.*.ln2.*"),
    "frozen-down-and-o-in-range": lambda m: m.train_last(2).freeze("blocks.*.mlp.down.*",
                                                                   "blocks.*.attn.o.*"),
}


@pytest.mark.parametrize("freeze", list(FREEZES))
def test_classifier_loss_and_gradients_match_torch(tmp_path, freeze):
    hf = hf_model()
    m = engine.load(saved(hf, tmp_path))
    assert m.config.labels == LABELS
    FREEZES[freeze](m)
    e2h = engine_to_hf_names(m, hf)
    want = {e2h[n] for n in m.trainable}
    for n, p in hf.named_parameters():
        p.requires_grad_(n in want)
    tokens, labels = batch()
    loss = m.forward(tokens, labels, lengths=LENGTHS)
    m.backward()
    tl, logits = torch_loss(hf, tokens, labels)
    tl.backward()
    assert abs(loss - tl.item()) <= 1e-5 * max(1.0, abs(tl.item()))
    np.testing.assert_allclose(m.forward(tokens, lengths=LENGTHS), logits.detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    ref = hf_grads_as_engine(m, hf)
    top = max(float(np.abs(ref[n]).max()) for n in m.trainable)
    for n in m.trainable:
        scale = max(float(np.abs(ref[n]).max()), 1e-3 * top)
        np.testing.assert_allclose(m.grads[n], ref[n], rtol=1e-3, atol=2e-5 * scale, err_msg=n)


def test_backward_stops_at_the_lowest_trainable_block(tmp_path):
    m = engine.load(saved(hf_model(), tmp_path)).train_last(1)
    tokens, labels = batch()
    m.forward(tokens, labels, lengths=LENGTHS)
    m.backward()
    assert m.last_backward_blocks == [2]
    m.train_last(0)
    m.forward(tokens, labels, lengths=LENGTHS)
    m.backward()
    assert m.last_backward_blocks == []
    assert set(m.trainable) == {"pooler.weight", "pooler.bias", "classifier.weight",
                                "classifier.bias"}


def test_ignored_labels_and_accumulation(tmp_path):
    """-100 drops a sequence from the mean; backward(scale) is (scale * loss).backward()."""
    hf = hf_model()
    m = engine.load(saved(hf, tmp_path)).train_last(2)
    tokens, labels = batch()
    labels = labels.copy()
    labels[1] = -100
    loss = m.forward(tokens, labels, lengths=LENGTHS)
    m.backward(0.5)
    keep = [0, 2, 3]
    out = hf(torch.tensor(tokens[keep]), attention_mask=mask()[keep],
             labels=torch.tensor(labels[keep]))
    (0.5 * out.loss).backward()
    assert abs(loss - out.loss.item()) < 1e-5
    ref = hf_grads_as_engine(m, hf)
    for n in m.trainable:
        np.testing.assert_allclose(m.grads[n], ref[n], rtol=1e-3, atol=1e-6, err_msg=n)


def test_training_steps_match_torch_adamw(tmp_path):
    hf = hf_model()
    m = engine.load(saved(hf, tmp_path)).train_last(1)
    before = {n: m.params[n].copy() for n in m.params}
    e2h = engine_to_hf_names(m, hf)
    want = {e2h[n] for n in m.trainable}
    for n, p in hf.named_parameters():
        p.requires_grad_(n in want)
    opt = engine.AdamW(m, lr=1e-3, weight_decay=0.01)
    topt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=0.01)
    for step in range(3):
        tokens, labels = batch(step)
        m.zero_grad()
        m.forward(tokens, labels, lengths=LENGTHS)
        m.backward()
        opt.step()
        topt.zero_grad()
        torch_loss(hf, tokens, labels)[0].backward()
        topt.step()
    sd = dict(hf.named_parameters())
    for e, h in e2h.items():
        # (atol: 0.3% of the 3e-3 that three steps of lr 1e-3 move a weight; Adam turns a
        # gradient rounding apart into a step apart where the gradient is tiny)
        np.testing.assert_allclose(m.params[e], sd[h].detach().numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=e)
        if e not in m.trainable:
            assert np.array_equal(m.params[e], before[e]), e


def test_saved_classifier_loads_in_transformers(tmp_path):
    m = engine.load(saved(hf_model(), tmp_path)).train_last(1)
    opt = engine.AdamW(m, lr=1e-2)
    tokens, labels = batch()
    m.forward(tokens, labels, lengths=LENGTHS)
    m.backward()
    opt.step()
    out = tmp_path / "out"
    m.save(str(out))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert back.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        logits = back(torch.tensor(tokens), attention_mask=mask()).logits.numpy()
    np.testing.assert_allclose(m.forward(tokens, lengths=LENGTHS), logits, rtol=1e-4, atol=1e-5)
    again = engine.load(str(out))
    assert again.config == m.config
    for n in m.params:
        assert np.array_equal(again.params[n], m.params[n]), n


def test_headless_encoder_saves_as_bert_model(tmp_path):
    m = engine.load(saved(hf_model("encoder"), tmp_path))
    m.save(str(tmp_path / "out"))
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "BertModel"
    tokens, _ = batch()
    with torch.no_grad():
        want = back(torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    np.testing.assert_allclose(m.forward(tokens, lengths=LENGTHS)[0], want[0], rtol=1e-4, atol=2e-5)


def test_labels_given_at_load_keep_the_pooler_and_start_a_new_classifier(tmp_path, capsys):
    hf = hf_model("encoder")
    d = saved(hf, tmp_path)
    m = engine.load(d, labels=["x", "y"])
    assert "classifier start" in capsys.readouterr().err
    np.testing.assert_array_equal(m.params["pooler.weight"],
                                  hf.pooler.dense.weight.detach().numpy())
    assert m.params["classifier.weight"].shape == (2, 50)
    # the same labels as the file's: its classifier is kept; other labels: a new one
    d2 = saved(hf_model(), tmp_path, "cls")
    same = engine.load(d2, labels=LABELS)
    np.testing.assert_array_equal(same.params["classifier.weight"],
                                  engine.load(d2).params["classifier.weight"])
    other = engine.load(d2, labels=["a", "b", "c"])
    assert not np.array_equal(other.params["classifier.weight"], same.params["classifier.weight"])


def test_with_classifier_matches_loading_with_labels(tmp_path):
    d = saved(hf_model("encoder"), tmp_path)
    a = engine.load(d).with_classifier(["x", "y"])
    b = engine.load(d, labels=["x", "y"])
    assert a.config == b.config and set(a.params) == set(b.params)
    for n in a.params:            # the file's pooler kept by both, the same new classifier
        assert np.array_equal(a.params[n], b.params[n]), n


def test_headless_round_trip_keeps_the_pooler(tmp_path):
    hf = hf_model("encoder")
    m = engine.load(saved(hf, tmp_path))
    m.save(str(tmp_path / "out"))
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    tokens, _ = batch()
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=mask()).pooler_output.numpy()
        got = back(torch.tensor(tokens), attention_mask=mask()).pooler_output.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_padding_token_row_gets_no_lookup_gradient(tmp_path):
    """transformers' BERT embedding has padding_idx = pad_token_id: the [PAD] row takes no
    gradient from the lookup, also where [PAD] is attended to (no lengths, or inside a text)."""
    hf = hf_model()
    m = engine.load(saved(hf, tmp_path)).freeze().unfreeze("wte.weight", "blocks.0.*")
    e2h = engine_to_hf_names(m, hf)
    for n, p in hf.named_parameters():
        p.requires_grad_(n in {e2h[x] for x in m.trainable})
    tokens, labels = batch()
    tokens[0, 3] = 0                                     # a [PAD] inside the first text
    m.forward(tokens, labels)                            # no lengths: every [PAD] attended to
    m.backward()
    out = hf(torch.tensor(tokens), labels=torch.tensor(labels))
    out.loss.backward()
    ref = hf_grads_as_engine(m, hf)
    assert not ref["wte.weight"][0].any() and not m.grads["wte.weight"][0].any()
    np.testing.assert_allclose(m.grads["wte.weight"], ref["wte.weight"], rtol=1e-3, atol=1e-7)


def test_original_bert_layernorm_names_load(tmp_path):
    """bert-base-uncased's file names its LayerNorms' weights gamma and beta."""
    from safetensors.numpy import load_file, save_file
    hf = hf_model("encoder")
    d = saved(hf, tmp_path)
    f = os.path.join(d, "model.safetensors")
    t = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
         for k, v in load_file(f).items()}
    save_file(t, f, metadata={"format": "pt"})
    tokens, _ = batch()
    with torch.no_grad():
        want = hf(torch.tensor(tokens), attention_mask=mask()).last_hidden_state.numpy()
    got = engine.load(d).forward(tokens, lengths=LENGTHS)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=2e-5)


def test_a_regression_head_is_replaced_when_labels_are_given(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**copy.deepcopy(CFG), num_labels=1)
    cfg.architectures = ["BertForSequenceClassification"]
    d = str(tmp_path / "reg")
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    with pytest.raises(engine.ConfigError, match="regression"):
        engine.load(d)
    m = engine.load(d, labels=["neg", "pos"])
    assert m.params["classifier.weight"].shape == (2, 50)
    with pytest.raises(engine.InputError, match="list of class names"):
        engine.load(d, labels="pos")


def test_bert_pad_id_defaults_to_zero_as_transformers(tmp_path):
    d = saved(hf_model("encoder"), tmp_path)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    del cfg["pad_token_id"]                     # older files leave it out: BertConfig says 0
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    assert engine.load(d).config.pad_token_id == 0
    cfg["pad_token_id"] = None                  # a null one: no padding row, as transformers
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    assert engine.load(d).config.pad_token_id is None


def test_a_new_bert_without_a_pad_id_saves_and_loads_back(tmp_path):
    cfg = engine.Config.bert(vocab_size=60, n_layer=2, n_head=2, d_model=16, d_ff=24,
                             max_seq_len=32, labels=["a", "b"])
    m = engine.Model(cfg, seed=0)
    m.save(str(tmp_path / "m"))
    back = engine.load(str(tmp_path / "m"))
    assert back.config.pad_token_id is None and back.config.labels == ["a", "b"]
    assert all(np.array_equal(back.params[n], a) for n, a in m.params.items())
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    x = np.random.default_rng(0).integers(0, 60, (2, 9))
    with torch.no_grad():
        want = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(back.forward(x), want, rtol=1e-4, atol=1e-5)


def test_models_pickled_before_encoders_still_run():
    import pickle
    m = engine.Model(engine.Config.llama(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1,
                                         d_model=16, d_ff=24, max_seq_len=16))
    state = m.__getstate__()
    for name in ("ln_e", "pooler", "classifier"):       # what an older Model did not have
        del state[name]
    old = engine.Model.__new__(engine.Model)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    x = np.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(old.forward(x), m.forward(x))
    old.train_last(1)
    old.forward(x, x)
    old.backward()
    assert old.last_backward_blocks == [1]


def test_encoder_misuse_is_refused_clearly(tmp_path):
    enc = engine.load(saved(hf_model("encoder"), tmp_path))
    tokens, labels = batch()
    with pytest.raises(engine.InputError, match="no classifier head"):
        enc.forward(tokens, labels)
    with pytest.raises(engine.InputError, match="does not generate"):
        engine.generate(enc, [1, 2, 3], max_new_tokens=2)
    cls = enc.with_classifier(LABELS)
    with pytest.raises(engine.InputError, match="lengths must be in 1..17"):
        cls.forward(tokens, labels, lengths=[17, 0, 3, 4])
    with pytest.raises(engine.InputError, match="4 integers"):
        cls.forward(tokens, labels, lengths=[17, 3])
    with pytest.raises(engine.InputError, match="outside 0..2"):
        cls.forward(tokens, np.array([0, 1, 2, 3]))
    with pytest.raises(engine.InputError, match="class indices"):
        cls.forward(tokens, tokens)
    with pytest.raises(engine.ConfigError, match="two or more"):   # (a causal LM may have one)
        engine.Model(engine.Config.gpt2(n_layer=1, d_model=32, n_head=2, vocab_size=50)
                     ).with_classifier(["a"])


def test_config_refuses_inconsistent_encoders():
    assert engine.Config.gpt2(labels=["a", "b"]).labels == ["a", "b"]   # a causal classifier
    with pytest.raises(engine.ConfigError, match="distinct"):
        engine.Config.bert(labels=["a", "a"])
    with pytest.raises(engine.ConfigError, match="two or more"):
        engine.Config.bert(labels=["a"])
    with pytest.raises(engine.ConfigError, match="post_norm goes with an encoder"):
        engine.Config.bert(post_norm=False)
    with pytest.raises(engine.ConfigError, match="post_norm goes with an encoder"):
        engine.Config.gpt2(post_norm=True)
    with pytest.raises(engine.ConfigError, match="no LM head to tie"):
        engine.Config.bert(tie_embeddings=True)


# ---- the real all-MiniLM-L6-v2 (conftest's minilm fixture) ----------------------------------
SENTENCES = ["The claim was filed three weeks after the accident.",
             "Water damage in the basement; the policyholder sent photos.",
             "Refund?"]


def _padded(tok, texts):
    ids = [tok.encode(t) for t in texts]
    T = max(map(len, ids))
    tokens = np.zeros((len(ids), T), np.int64)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
    return tokens, np.array([len(r) for r in ids])


def test_minilm_matches_transformers(minilm):
    m = engine.load(minilm)
    tok = engine.load_tokenizer(minilm)
    ref_tok = transformers.AutoTokenizer.from_pretrained(minilm)
    tokens, lengths = _padded(tok, SENTENCES)
    batch_ref = ref_tok(SENTENCES, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(tokens, batch_ref["input_ids"].numpy())
    hf = transformers.AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        want = hf(**batch_ref).last_hidden_state.numpy()
    got = m.forward(tokens, lengths=lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-3, atol=2e-4)
    # the sentence embedding all-MiniLM-L6-v2 is made for: the mean over the real tokens,
    # normalized; one sentence against another as sentence-transformers would rank them
    emb = np.stack([got[b, :n].mean(0) for b, n in enumerate(lengths)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref = np.stack([want[b, :n].mean(0) for b, n in enumerate(lengths)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb @ emb.T, ref @ ref.T, atol=1e-5)


def test_minilm_classifier_trains_its_last_block(minilm, tmp_path):
    m = engine.load(minilm, labels=["claim", "refund"]).train_last(1)
    tok = engine.load_tokenizer(minilm)
    tokens, lengths = _padded(tok, SENTENCES[:2] + ["Please refund my premium."])
    labels = np.array([0, 0, 1])
    opt = engine.AdamW(m, lr=1e-3)
    frozen = m.params["blocks.4.mlp.up.weight"].copy()
    losses = []
    for _ in range(8):
        m.zero_grad()
        losses.append(m.forward(tokens, labels, lengths=lengths))
        m.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert m.last_backward_blocks == [5]
    assert np.array_equal(m.params["blocks.4.mlp.up.weight"], frozen)
    m.save(str(tmp_path / "out"), tokenizer=tok)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = back(torch.tensor(tokens),
                    attention_mask=torch.tensor(np.arange(tokens.shape[1])[None] < lengths[:, None])
                    ).logits.numpy()
    np.testing.assert_allclose(m.forward(tokens, lengths=lengths), want, rtol=1e-4, atol=1e-4)


def test_token_types_of_text_pairs_match_torch(tmp_path):
    """A pair of texts: types 0 then 1 (BERT's segments); logits and the gradients of the type
    table and the embedding norm against autograd."""
    hf = hf_model()
    m = engine.load(saved(hf, tmp_path)).freeze().unfreeze("wtt.weight", "ln_e.*", "blocks.0.*")
    e2h = engine_to_hf_names(m, hf)
    for n, p in hf.named_parameters():
        p.requires_grad_(n in {e2h[x] for x in m.trainable})
    tokens, labels = batch(3)
    types = np.zeros_like(tokens)
    for b, n in enumerate(LENGTHS):
        types[b, n // 2:n] = 1                            # the second half is the pair
    loss = m.forward(tokens, labels, lengths=LENGTHS, types=types)
    m.backward()
    out = hf(torch.tensor(tokens), attention_mask=mask(), token_type_ids=torch.tensor(types),
             labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    np.testing.assert_allclose(m.forward(tokens, lengths=LENGTHS, types=types),
                               out.logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    ref = hf_grads_as_engine(m, hf)
    top = max(float(np.abs(ref[n]).max()) for n in m.trainable)
    for n in m.trainable:   # (k's bias: rounding noise on both sides, as in the test above)
        scale = max(float(np.abs(ref[n]).max()), 1e-3 * top)
        np.testing.assert_allclose(m.grads[n], ref[n], rtol=1e-3, atol=2e-5 * scale, err_msg=n)
    with pytest.raises(engine.InputError, match="types must be in 0..1"):
        m.forward(tokens, lengths=LENGTHS, types=types * 2)


def test_backward_from_the_hidden_states_matches_torch(tmp_path):
    """forward(keep=True) of an encoder without a head, then backward(dhidden=): the gradients
    of an objective computed outside (here sum(h * R) over the real tokens) as autograd's."""
    hf = hf_model("encoder")
    m = engine.load(saved(hf, tmp_path)).train_last(2)
    e2h = engine_to_hf_names(m, hf)
    for n, p in hf.named_parameters():
        p.requires_grad_(n in {e2h[x] for x in m.trainable})
    tokens, _ = batch(4)
    r = np.random.default_rng(5).standard_normal((B, T, 50)).astype(np.float32)
    r *= (np.arange(T)[None] < LENGTHS[:, None])[:, :, None]
    h = m.forward(tokens, lengths=LENGTHS, keep=True)
    m.backward(0.5, dhidden=r)
    th = hf(torch.tensor(tokens), attention_mask=mask()).last_hidden_state
    (0.5 * (th * torch.tensor(r)).sum()).backward()
    np.testing.assert_allclose(h, th.detach().numpy(), rtol=1e-4, atol=2e-5)
    ref = hf_grads_as_engine(m, hf)
    top = max(float(np.abs(ref[n]).max()) for n in m.trainable)
    for n in m.trainable:
        scale = max(float(np.abs(ref[n]).max()), 1e-3 * top)
        np.testing.assert_allclose(m.grads[n], ref[n], rtol=1e-3, atol=2e-5 * scale, err_msg=n)
    assert m.last_backward_blocks == [2, 1]
    m.forward(tokens, lengths=LENGTHS)
    with pytest.raises(engine.InputError, match="keep=True"):
        m.backward(dhidden=r)
    m.forward(tokens, lengths=LENGTHS, keep=True)
    with pytest.raises(engine.InputError, match="dhidden has shape"):
        m.backward(dhidden=r[:, :3])
