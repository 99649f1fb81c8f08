"""A causal LM as a sequence classifier (transformers' LlamaForSequenceClassification and
GPT2ForSequenceClassification: a "score" on the last token after the final norm, in place of the
LM head), against transformers + PyTorch autograd: logits of right-padded batches, the loss and
every gradient under freezing, files saved back that transformers loads, a causal LM's
checkpoint loaded with labels (a new classifier), and what it refuses."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import engine
from conftest import attention_mask, compare_classifier_grads, perturb_norms, saved

LABELS = ["auto", "health", "travel"]
B, T = 4, 13
LENGTHS = np.array([13, 6, 1, 9])
PAD = 0


def hf_model(family="llama", kind="classifier", seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=89, hidden_size=48, intermediate_size=70,
                                       num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64,
                                       pad_token_id=PAD, tie_word_embeddings=True,
                                       rms_norm_eps=1e-5)
        classes = (transformers.LlamaForSequenceClassification, transformers.LlamaForCausalLM)
    else:
        cfg = transformers.GPT2Config(vocab_size=89, n_embd=48, n_layer=3, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      pad_token_id=PAD)
        classes = (transformers.GPT2ForSequenceClassification, transformers.GPT2LMHeadModel)
    if kind == "classifier":
        cfg.id2label = dict(enumerate(LABELS))
        cfg.label2id = {n: i for i, n in enumerate(LABELS)}
    m = classes[0 if kind == "classifier" else 1](cfg)
    cfg.architectures = [type(m).__name__]
    return perturb_norms(m, "norm", ".ln_")



def batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 89, (B, T))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = PAD                                   # padding on the right
    return tokens, np.array([2, 0, 1, 1])


def mask():
    return attention_mask(LENGTHS, T)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_match_transformers(tmp_path, family):
    hf = hf_model(family)
    model = engine.load(saved(hf, tmp_path))
    assert model.config.labels == LABELS and not model.config.encoder
    assert "lm_head.weight" not in model.params and model.params["classifier.weight"].shape == (3, 48)
    tokens, _ = batch()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=mask()).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens, lengths=LENGTHS), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,train", [("llama", "last"), ("llama", "all"), ("gpt2", "last")])
def test_loss_and_gradients_match_torch(tmp_path, family, train):
    hf = hf_model(family)
    model = engine.load(saved(hf, tmp_path))
    if train == "all":
        model.set_trainable(list(model.params))
    else:
        model.train_last(1)
        top = ("model.layers.2.", "model.norm.", "score.") if family == "llama" else (
            "transformer.h.2.", "transformer.ln_f.", "score.")
        for n, p in hf.named_parameters():
            p.requires_grad_(n.startswith(top))
    assert "classifier.weight" in model.trainable
    compare_classifier_grads(model, hf, *batch(1), LENGTHS, atol=3e-5)
    if train == "last":
        assert model.last_backward_blocks == [2]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_classifier_loads_in_transformers(tmp_path, family):
    hf = hf_model(family)
    engine.load(saved(hf, tmp_path)).save(str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__] and cfg["id2label"]["2"] == "travel"
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    want = hf.state_dict()
    assert back.state_dict().keys() == want.keys()
    for n, p in back.state_dict().items():
        assert torch.equal(p, want[n]), n
    with pytest.raises(engine.ConfigError, match="sequence classifier"):
        engine.load(str(tmp_path / "out")).save(str(tmp_path / "x.gguf"))


def test_a_causal_lm_loads_as_a_new_classifier(tmp_path, capsys):
    """The LM head is left out and the classifier ("score") starts from N(0, init_std), as
    transformers' LlamaForSequenceClassification.from_pretrained of a causal LM starts it; the
    model then neither generates nor takes an LM's targets."""
    lm = hf_model(kind="lm")
    d = saved(lm, tmp_path)
    model = engine.load(d, labels=LABELS)
    assert "no classifier for these 3 labels" in capsys.readouterr().err
    assert model.params["classifier.weight"].shape == (3, 48)
    assert abs(float(model.params["classifier.weight"].std()) - 0.02) < 0.005
    assert np.array_equal(model.params["blocks.1.mlp.up.weight"],
                          lm.model.layers[1].mlp.up_proj.weight.detach().numpy())
    with pytest.raises(engine.InputError, match="does not generate"):
        engine.generate(model, [1, 2, 3], max_new_tokens=2)
    tokens, _ = batch()
    with pytest.raises(engine.InputError, match="class indices"):
        model.forward(tokens, tokens)
    # with_classifier gives the same model; and back to the (tied) language model
    added = engine.load(d).with_classifier(LABELS)
    assert added.params.keys() == model.params.keys()
    for n, a in model.params.items():
        assert np.array_equal(a, added.params[n]), n
    again = added.with_classifier(None)
    assert again.config.labels is None and again.head == "wte.weight"
    np.testing.assert_allclose(again.forward(tokens), engine.load(d).forward(tokens), rtol=1e-6)
    # and a classifier for other labels gets a new one
    clf = saved(hf_model(), tmp_path, "clf")
    other = engine.load(clf, labels=["x", "y"])
    assert other.params["classifier.weight"].shape == (2, 48)
    assert np.array_equal(other.params["wte.weight"], engine.load(clf).params["wte.weight"])


def test_finetune_smollm2_as_a_claims_classifier(require_smollm2, tmp_path, capsys):
    """`tailtune finetune` of the real SmolLM2 GGUF on labeled rows makes a classifier (a new
    head on the last token, the last 2 blocks and the final norm trainable) that learns the
    claims' categories; the saved LlamaForSequenceClassification and its tokenizer, run by
    transformers on right-padded held-out texts, give the engine's logits; `tailtune eval`
    scores it."""
    from engine.cli import main as cli
    from conftest import SMOLLM2
    claims = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "claims")
    train, test = (os.path.join(claims, f"category_{s}.jsonl") for s in ("train", "test"))
    out = tmp_path / "run"
    assert cli(["finetune", "--model", SMOLLM2, "--data", train, "--eval-data", test,
                "--eval-batches", "2", "--train-last", "2", "--steps", "24", "--lr", "1e-3",
                "--batch-size", "16", "--seq-len", "96", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification"
    # a new head starts near chance (1 in 5, 0.375 here); 24 steps learn (0.78 when written)
    assert summary["base_eval"]["accuracy"] < 0.5 and summary["final_eval"]["accuracy"] >= 0.7
    assert summary["final_eval"]["loss"] < 0.6 * summary["base_eval"]["loss"]
    texts = [json.loads(x)["text"] for x in open(test)][:6]
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert tok.pad_token is not None and tok.padding_side == "right"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    enc = tok(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
    assert enc["attention_mask"].min() == 0                      # padded: the last token varies
    with torch.no_grad():
        want = hf(**enc).logits.numpy()
    model = engine.load(str(out))
    got = model.forward(enc["input_ids"].numpy(), lengths=enc["attention_mask"].sum(1).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    capsys.readouterr()
    assert cli(["eval", "--model", str(out), "--data", test]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["qwen2", "smollm3", "mistral", "phi3", "qwen3", "llama3"])
def test_every_causal_family_as_a_classifier(tmp_path, kind):
    """Each family's *ForSequenceClassification (Phi-3's fused projections, Qwen3's head norms,
    SmolLM3's blocks without rotary, Llama 3's rope scaling, Mistral's window): the engine's
    logits of a right-padded batch are transformers', and its saved files transformers' own."""
    import copy
    from conftest import HF_CONFIGS
    name = {"qwen2": "Qwen2", "smollm3": "SmolLM3", "mistral": "Mistral", "phi3": "Phi3",
            "qwen3": "Qwen3", "llama3": "Llama"}[kind]
    cfg = getattr(transformers, name + "Config")(**copy.deepcopy(HF_CONFIGS[kind]))
    cfg.pad_token_id, cfg.id2label = PAD, dict(enumerate(LABELS))
    cfg.label2id = {n: i for i, n in enumerate(LABELS)}
    torch.manual_seed(0)
    hf = getattr(transformers, name + "ForSequenceClassification")(cfg).eval()
    cfg.architectures = [type(hf).__name__]
    model = engine.load(saved(hf, tmp_path))
    tokens = np.random.default_rng(2).integers(1, cfg.vocab_size, (B, T))
    for b, n in enumerate(LENGTHS):
        tokens[b, n:] = PAD
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(tokens), attention_mask=mask()).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens, lengths=LENGTHS), want, rtol=1e-4, atol=1e-5)
    model.save(str(tmp_path / "out"))
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(back) is type(hf)
    for n, p in back.state_dict().items():
        assert torch.equal(p, hf.state_dict()[n]), n


def test_the_pad_rule_and_routing_of_a_pad_less_tokenizer(tmp_path, capsys):
    """A byte-level tokenizer without a pad token (as GPT-2's, Llama 3's): the run pads with
    its end-of-text token, saves it as the pad token and the model's pad id; a text that ends
    in that token is read where transformers reads it (the last token that is not the pad id),
    so the saved classifier gives the engine's logits on every text. Preference rows carrying
    a "label" stay a language model's data; `eval` of a language model on labeled rows, and
    sentence pairs for a causal LM, are refused with the reason."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from engine.cli import main as cli
    claims = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "claims")
    rows = [json.loads(x) for x in open(os.path.join(claims, "category_train.jsonl"))][:40]
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([r["text"] for r in rows], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, eos_token_id=0)).eval()
    d = saved(lm, tmp_path)
    fast.save_pretrained(d)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:   # every other text ends in the end-of-text token
        for i, r in enumerate(rows):
            f.write(json.dumps({"text": r["text"][:80] + ("<|end|>" if i % 2 else ""),
                                "label": LABELS[i % 3]}) + "\n")
    out = tmp_path / "run"
    assert cli(["finetune", "--model", d, "--data", str(data), "--eval-fraction", "0",
                "--train-last", "1", "--steps", "3", "--batch-size", "8", "--seq-len", "64",
                "--out", str(out)]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["pad_token_id"] == 0
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert tok.pad_token == "<|end|>"
    texts = [json.loads(x)["text"] for x in open(data)][:6]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["input_ids"][1, enc["attention_mask"][1].sum() - 1] == 0).item()   # ends in it
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        want = back(**enc).logits.numpy()
    got = engine.load(str(out)).forward(enc["input_ids"].numpy(),
                                        lengths=enc["attention_mask"].sum(1).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # routing
    from engine.classify import is_classifier_run
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    assert not is_classifier_run(d, str(kto)) and is_classifier_run(d, str(data))
    assert is_classifier_run(str(out / "model"), str(kto))        # a classifier stays one
    capsys.readouterr()
    assert cli(["eval", "--model", d, "--data", str(data)]) == 2
    assert "is a language model, not a classifier" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": r["text"][:20], "positive": r["text"]}) + "\n"
                             for r in rows[:8]))
    assert cli(["finetune", "--model", d, "--data", str(pairs), "--out", str(tmp_path / "p")]) == 2
    assert "sentence embeddings" in capsys.readouterr().err
