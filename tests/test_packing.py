"""A classifier encoder's blocks skip the padding of a right-padded batch (Packing): the loss,
every gradient and the logits at real positions equal those of the same model computing the
padding (Model.pack_padding = False, transformers' way), under freezing patterns, dropout, a
given hidden state, and token labels; and the packed step does less work."""
import numpy as np
import pytest

import engine

TAGS = ["O", "B-X", "I-X"]


def _model(per_token, seed=0):
    cfg = engine.Config.bert(vocab_size=89, n_layer=3, n_head=3, d_model=36, d_ff=52,
                             max_seq_len=32, labels=TAGS if per_token else ["a", "b"],
                             per_token=per_token)
    return engine.Model(cfg, seed=seed)


def _batch(per_token, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([13, 4, 9, 1])
    tokens = rng.integers(1, 89, (4, 13))
    tokens[np.arange(13)[None] >= lengths[:, None]] = 0
    if per_token:
        targets = rng.integers(0, 3, (4, 13))
        targets[np.arange(13)[None] >= lengths[:, None]] = -100
        targets[0, :3] = -100
    else:
        targets = np.array([0, 1, 1, 0])
    return tokens, targets, lengths


def _step(model, tokens, targets, lengths, packed, **kw):
    model.pack_padding = packed
    if model.dropout is not None:
        model.dropout.seek(0, 0, 1)
    model.zero_grad()
    loss = model.forward(tokens, targets, lengths=lengths, **kw)
    model.backward()
    return loss, {n: g.copy() for n, g in model.grads.items()}


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("train", ["all", "last1", "middle", "attention-only"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_packed_equals_padded(per_token, train, dropout):
    model = _model(per_token)
    {"all": model.unfreeze, "last1": lambda: model.train_last(1),
     "middle": lambda: model.freeze().unfreeze("blocks.1.*"),
     "attention-only": lambda: model.freeze().unfreeze("blocks.*.attn.*", "classifier.*")}[train]()
    model.set_dropout(dropout, seed=3)
    tokens, targets, lengths = _batch(per_token)
    loss_p, g_p = _step(model, tokens, targets, lengths, True)
    loss_u, g_u = _step(model, tokens, targets, lengths, False)
    assert abs(loss_p - loss_u) <= 1e-6 * max(1.0, abs(loss_u))
    assert set(g_p) == set(g_u) == set(model.trainable)
    for n in g_u:
        scale = max(float(np.abs(g_u[n]).max()), 1e-6)
        np.testing.assert_allclose(g_p[n], g_u[n], rtol=0, atol=2e-5 * scale, err_msg=n)
    model.pack_padding = True
    packed = model.forward(tokens, lengths=lengths)
    model.pack_padding = False
    padded = model.forward(tokens, lengths=lengths)
    live = (np.arange(13)[None] < lengths[:, None]) if per_token else slice(None)
    np.testing.assert_allclose(packed[live], padded[live], rtol=0, atol=2e-5 * np.abs(padded).max())
    if per_token:          # the padding, which the blocks skipped: logits 0
        assert not packed[~live].any()


def test_packed_from_a_given_hidden_state_and_labels_on_padding():
    """From a prefix's hidden state (a prefix cache) the blocks above pack too; a label on a
    padding position (the API allows it) makes that batch compute the padding instead."""
    model = _model(True).train_last(1)
    tokens, targets, lengths = _batch(True, seed=1)
    h = model.prefix(tokens, 2, lengths=lengths)
    losses = [_step(model, tokens, targets, lengths, packed, hidden=h, start=2)[0]
              for packed in (True, False)]
    assert abs(losses[0] - losses[1]) <= 1e-6
    targets[1, 7] = 2                                   # a label past length 4
    losses = [_step(model, tokens, targets, lengths, packed)[0] for packed in (True, False)]
    assert losses[0] == losses[1]


def test_packed_step_runs_fewer_rows(monkeypatch):
    """The blocks' projections see the real positions only: 27 of the batch's 52 rows."""
    import engine.layers as L
    model = _model(False).unfreeze()
    tokens, targets, lengths = _batch(False)
    seen = []
    real = L.Linear.forward

    def forward(self, P, x):
        seen.append(x.shape[0])
        return real(self, P, x)
    monkeypatch.setattr(L.Linear, "forward", forward)
    model.forward(tokens, targets, lengths=lengths)
    # per block: q, k, v on every real row; o and the MLP on every real row below the top
    # block and on the first positions (4) in it; then the pooler and the classifier
    assert max(seen) == int(lengths.sum()) == 27
    model.pack_padding = False
    seen.clear()
    model.forward(tokens, targets, lengths=lengths)
    assert max(seen) == 52


@pytest.mark.parametrize("per_token", [False, True])
def test_packed_blocks_keep_less_for_backward(per_token):
    """What a packed step keeps for backward is at most the padded step's, even with a single
    padded position (the attention output is kept once, padded, for attention's backward and,
    gathered, for the output projection's weight gradient)."""
    model = _model(per_token).unfreeze()
    tokens, targets, lengths = _batch(per_token)
    for lens in (lengths, np.array([13, 13, 13, 12])):
        sizes = []
        for packed in (True, False):
            model.pack_padding = packed
            model.forward(tokens, targets, lengths=lens)
            sizes.append(model.saved_bytes())
        assert sizes[0] <= sizes[1], (lens, sizes)


def test_packed_with_token_types_one_sequence_and_accumulation():
    """Text pairs (token types), a batch of one padded sequence, and two scaled backwards
    accumulated: packed equals padded."""
    model = _model(False).unfreeze()
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, 89, (3, 11))
    lengths = np.array([11, 7, 5])
    types = (np.arange(11)[None] >= np.array([6, 3, 2])[:, None]).astype(np.int64)
    grads = []
    for packed in (True, False):
        model.pack_padding = packed
        model.zero_grad()
        model.forward(tokens, np.array([0, 1, 0]), lengths=lengths, types=types)
        model.backward(scale=0.3)
        model.forward(tokens[:1, :9], np.array([1]), lengths=np.array([6]))
        model.backward(scale=0.7)
        grads.append({n: g.copy() for n, g in model.grads.items()})
    for n in grads[1]:
        np.testing.assert_allclose(grads[0][n], grads[1][n], rtol=0,
                                   atol=2e-5 * max(float(np.abs(grads[1][n]).max()), 1e-6), err_msg=n)
