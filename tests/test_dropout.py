"""Dropout (Model.set_dropout, --dropout) against transformers + PyTorch autograd: the same
models with every dropout call of theirs replaced by the engine's mask (tests/reference.py's
twin of the hash, fed the keys of the engine's forward), in the blocks backward runs through
only; then what must not drop out (evaluation, the frozen prefix, p = 0), and the runs."""
import contextlib
import json

import numpy as np
import pytest
import torch

import engine
import reference as ref
from conftest import compare_classifier_grads, perturb_norms
from engine.dropout import Dropout
from test_model_vs_torch import FREEZES, assert_step_matches, batch, set_torch_trainable


class _Sites:
    """Stands in for torch.nn.functional.dropout (and hooks on layers torch has no dropout
    after): the i-th call applies the i-th site's (p, key) mask, or none (a frozen block's)."""

    def __init__(self, sites):
        self.sites = list(sites)

    def __call__(self, x, p=0.5, training=False, inplace=False):
        site = self.sites.pop(0)
        if site is None:
            return x
        rate, key = site
        C = x.shape[-1]
        keep = ref.dropout_mask(x.numel() // C, C, rate, key).reshape(tuple(x.shape))
        return x * torch.tensor(keep / (1.0 - rate), dtype=x.dtype)

    def hook(self, module, args, out):
        return self(out)


def _sites(model, p, attention, seed, embeddings_first=True, classifier=False, attn_out=True,
           pooler=False):
    """The engine's first training forward's sites in transformers' call order: the
    embeddings, then per block the attention probabilities, its output (not DistilBERT's), the
    MLP's output; RoBERTa's head input, the classifier's."""
    keys = Dropout(p, attention, seed).draw(model.config.n_layer)
    low = model.lowest_trainable_block()
    out = [(p, keys.embeddings) if low == -1 else None] if embeddings_first else []
    for b in range(model.config.n_layer):
        _, _, k_attn, k_out, k_mlp = keys.block(b)
        block = [(attention, k_attn)] + [(p, k_out)] * attn_out + [(p, k_mlp)]
        out += block if b >= low else [None] * len(block)
    if pooler:
        out.append((p, keys.pooler))
    if classifier:
        out.append((p, keys.classifier))
    return out


@contextlib.contextmanager
def _torch_dropout(monkeypatch, hf, sites, hooks=()):
    """transformers' eager attention (its probabilities go through F.dropout) with the sites'
    masks; hooks: the layers whose outputs take a site's mask where the model has no dropout."""
    hf.set_attn_implementation("eager")
    handles = [m.register_forward_hook(sites.hook) for m in hooks]
    monkeypatch.setattr(torch.nn.functional, "dropout", sites)
    try:
        yield
    finally:
        monkeypatch.undo()
        for h in handles:
            h.remove()
    assert not sites.sites, "transformers made fewer dropout calls than the engine has sites"


@pytest.mark.parametrize("freeze", ["last2", "all", "middle-block", "top-o-only"])
def test_gpt2_dropout_matches_transformers(hf_dirs, monkeypatch, freeze):
    """GPT-2's own dropout sites (embeddings, attention probabilities, resid_dropout, the MLP's)
    with the engine's masks in the blocks backward runs through: loss and gradients agree;
    batch() masks a prompt, so the top block runs on the target rows alone."""
    hf, path = hf_dirs["gpt2"]
    model = engine.load(path)
    FREEZES[freeze](model)
    set_torch_trainable(model, hf)
    model.set_dropout(0.3, attention=0.2, seed=7)
    sites = _Sites(_sites(model, 0.3, 0.2, 7))
    with _torch_dropout(monkeypatch, hf, sites):
        assert_step_matches(model, hf, *batch(model.config.vocab_size, seed=1))


@pytest.mark.parametrize("freeze", ["last2", "mlp-only-in-last2"])
def test_llama_dropout_matches_transformers(hf_dirs, monkeypatch, freeze):
    """Llama has attention dropout only; its output projection and MLP take the engine's
    masks through hooks (the sites GPT-2 and BERT have)."""
    hf, path = hf_dirs["llama"]
    model = engine.load(path)
    FREEZES[freeze](model)
    set_torch_trainable(model, hf)
    model.set_dropout(0.25, seed=3)
    sites = _Sites(_sites(model, 0.25, 0.25, 3, embeddings_first=False))
    hooks = [m for layer in hf.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    with _torch_dropout(monkeypatch, hf, sites, hooks):
        assert_step_matches(model, hf, *batch(model.config.vocab_size, seed=2))


@pytest.mark.parametrize("train", ["last1", "all"])
def test_bert_classifier_dropout_matches_transformers(monkeypatch, train):
    """BERT's sites (embeddings after their norm, attention probabilities, both dense outputs
    before their residual norms, the pooled input of the classifier) on padded pairs."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    hf = perturb_norms(BertForSequenceClassification(BertConfig(
        vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=52, max_position_embeddings=32, num_labels=3)), "LayerNorm")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = engine.load(d)
    model.train_last(1) if train == "last1" else model.unfreeze()
    set_torch_trainable(model, hf)
    model.set_dropout(0.2, seed=11)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 97, (4, 13))
    lengths = np.array([13, 4, 9, 1])
    tokens[np.arange(13)[None] >= lengths[:, None]] = 0
    labels = np.array([0, 2, 1, 2])
    sites = _Sites(_sites(model, 0.2, 0.2, 11, classifier=True))
    with _torch_dropout(monkeypatch, hf, sites):
        compare_classifier_grads(model, hf, tokens, labels, lengths)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_roberta_and_distilbert_dropout_match_transformers(monkeypatch, tmp_path, family):
    """Their own sites: RoBERTa's classifier head drops out its input before its dense layer
    too; DistilBERT has no dropout after its attention's output projection."""
    from conftest import saved
    if family == "roberta":
        from test_roberta import LENGTHS, batch as rows_batch, hf_model
        hf = hf_model("roberta")
    else:
        from test_distilbert import LENGTHS, batch as rows_batch, hf_model
        hf = hf_model()
    model = engine.load(saved(hf, tmp_path)).unfreeze()
    set_torch_trainable(model, hf)
    model.set_dropout(0.2, seed=4)
    sites = _Sites(_sites(model, 0.2, 0.2, 4, classifier=True, attn_out=family != "distilbert",
                          pooler=family == "roberta"))
    tokens, labels = rows_batch()
    with _torch_dropout(monkeypatch, hf, sites):
        compare_classifier_grads(model, hf, tokens, labels, LENGTHS)


def test_dropout_is_off_by_default_and_zero_turns_it_off(hf_dirs):
    """No dropout unless asked for; set_dropout(0) gives back the same loss, bit for bit, and
    a rate makes a difference (so the tests above compare something)."""
    _, path = hf_dirs["gpt2"]
    model = engine.load(path).train_last(2)
    assert model.dropout is None
    tokens, targets = batch(model.config.vocab_size, seed=1)
    plain = model.forward(tokens, targets)
    model.set_dropout(0.1)
    dropped = model.forward(tokens, targets)
    assert abs(dropped - plain) > 1e-4
    model.set_dropout(0.0)
    assert model.dropout is None
    assert model.forward(tokens, targets) == plain
    model.set_dropout(0.0, attention=0.3)
    assert model.dropout == Dropout(0.0, 0.3, 0)
    assert model.forward(tokens, targets) != plain


def test_evaluation_generation_and_frozen_prefix_never_drop(hf_dirs):
    """Only forwards that keep what backward needs draw masks: logits, a loss with grad=False
    and generation are the model's own; the frozen prefix (below the lowest trainable block)
    is the same function with dropout on, so a prefix cache of it stays exact."""
    _, path = hf_dirs["gpt2"]
    model = engine.load(path).train_last(2)
    tokens, targets = batch(model.config.vocab_size, seed=2)
    logits = model.forward(tokens)
    loss = model.forward(tokens, targets, grad=False)
    gen = engine.generate(model, [1, 2, 3], max_new_tokens=5)
    prefix = model.prefix(tokens, 2)
    model.set_dropout(0.5, seed=1)
    np.testing.assert_array_equal(model.forward(tokens), logits)
    assert model.forward(tokens, targets, grad=False) == loss
    assert engine.generate(model, [1, 2, 3], max_new_tokens=5) == gen
    np.testing.assert_array_equal(model.prefix(tokens, 2), prefix)
    assert model.dropout.drawn == 0          # none of these drew a mask
    full = model.forward(tokens, targets)
    model.dropout.seek(0, 0, 1)
    cached = model.forward(tokens, targets, hidden=prefix, start=2)
    assert full == cached


def test_masks_change_every_forward_and_repeat_from_the_seed(hf_dirs):
    _, path = hf_dirs["gpt2"]
    model = engine.load(path).train_last(2)
    tokens, targets = batch(model.config.vocab_size, seed=3)
    model.set_dropout(0.2, seed=5)
    first, second = model.forward(tokens, targets), model.forward(tokens, targets)
    assert first != second and model.dropout.drawn == 2
    model.set_dropout(0.2, seed=5)
    assert model.forward(tokens, targets) == first
    model.set_dropout(0.2, seed=6)
    assert model.forward(tokens, targets) != first


def test_set_dropout_rejects_bad_rates(hf_dirs):
    _, path = hf_dirs["gpt2"]
    model = engine.load(path)
    for kw, msg in [(dict(p=1.0), r"dropout p must be a number in \[0, 1\), got 1.0"),
                    (dict(p=-0.1), "dropout p must be"),
                    (dict(p=0.1, attention=2), "dropout attention must be a number"),
                    (dict(p="0.1"), "dropout p must be a number"),
                    (dict(p=0.1, seed=-1), "dropout seed must be an integer >= 0")]:
        with pytest.raises(engine.InputError, match=msg):
            model.set_dropout(**kw)
    assert model.dropout is None


def _run(model, data, out, *extra):
    from engine.cli import main as cli
    from test_finetune import run_args
    argv = run_args(model, data, str(out), *extra)
    argv[argv.index("--steps") + 1] = "8"
    return cli(argv)


def _weights(out):
    return engine.load(str(out / "model")).params


def test_finetune_dropout_is_reproducible_and_resumes_exactly(tmp_path):
    """--dropout: two runs with one seed end with the same weights, and not those of a run
    without it; a run stopped by Ctrl-C after step 3 and resumed draws the masks the straight
    run drew (micro-batches of --grad-accum 2 each their own) and ends with its weights; the
    rates are checked and kept by the checkpoint."""
    from conftest import signal_after_steps
    from test_finetune import text_file, tiny_model_dir
    model, data = tiny_model_dir(tmp_path / "m"), text_file(tmp_path / "d.txt", 20_000)
    flags = ("--dropout", "0.2", "--attention-dropout", "0.1", "--grad-accum", "2")
    assert _run(model, data, tmp_path / "a", *flags) == 0
    assert _run(model, data, tmp_path / "b", *flags) == 0
    assert _run(model, data, tmp_path / "plain", "--grad-accum", "2") == 0
    a, b, plain = (_weights(tmp_path / d) for d in ("a", "b", "plain"))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not all(np.array_equal(a[n], plain[n]) for n in a)
    with signal_after_steps(3):
        assert _run(model, data, tmp_path / "c", *flags) == 130
    state = json.load(open(tmp_path / "c" / "checkpoint" / "trainer_state.json"))
    assert state["step"] == 3 and state["args"]["dropout"] == 0.2
    assert _run(model, data, tmp_path / "c", "--resume", str(tmp_path / "c")) == 0
    c = _weights(tmp_path / "c")
    assert all(np.array_equal(a[n], c[n]) for n in a)



def test_finetune_refuses_bad_rates(tmp_path, capsys):
    from test_finetune import text_file, tiny_model_dir
    model, data = tiny_model_dir(tmp_path / "m"), text_file(tmp_path / "d.txt", 2_000)
    for bad, msg in [(("--dropout", "1"), "--dropout 1.0: must be in [0, 1)"),
                     (("--attention-dropout", "-0.5"), "--attention-dropout -0.5: must be in [0, 1)")]:
        assert _run(model, data, tmp_path / "bad", *bad) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_bert_token_classifier_dropout_matches_transformers(monkeypatch):
    """A token classifier's input (the top block's output at every position) drops out as
    BertForTokenClassification's does; unlabeled positions make the top block and the
    classifier run on the labeled rows alone, which keep their own masks."""
    import tempfile
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(1)
    hf = perturb_norms(BertForTokenClassification(BertConfig(
        vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=52, max_position_embeddings=32, num_labels=4)), "LayerNorm")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = engine.load(d)
    model.train_last(1)
    set_torch_trainable(model, hf)
    model.set_dropout(0.3, seed=2)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 97, (3, 11))
    lengths = np.array([11, 6, 2])
    tags = rng.integers(0, 4, (3, 11))
    tags[np.arange(11)[None] >= lengths[:, None]] = -100
    tags[0, [0, 3, 4]] = -100
    sites = _Sites(_sites(model, 0.3, 0.3, 2, classifier=True))
    with _torch_dropout(monkeypatch, hf, sites):
        loss = model.forward(tokens, tags, lengths=lengths)
        model.backward()
        from conftest import attention_mask, hf_grads_as_engine
        out = hf(input_ids=torch.tensor(tokens), attention_mask=attention_mask(lengths, 11),
                 labels=torch.tensor(tags))
        out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    want = hf_grads_as_engine(model, hf)
    for n, g in model.grads.items():
        if not n.endswith("attn.k.bias"):
            np.testing.assert_allclose(g, want[n], rtol=0, atol=3e-5 * np.abs(want[n]).max(), err_msg=n)
