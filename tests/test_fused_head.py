"""The fused LM head + cross-entropy works over equal row chunks so that (B, T, V) logits never
exist: any chunking, any order of batch sizes, must give what one chunk gives."""
import numpy as np
import pytest

import engine
import engine.model as model_mod


def _model():
    cfg = engine.Config.llama(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                              d_ff=48, max_seq_len=32)   # untied head: its dW is computed too
    return engine.Model(cfg, seed=3).train_last(1).unfreeze("lm_head.weight")


def _loss_and_grads(m, tokens, targets):
    m.zero_grad()
    loss = m.forward(tokens, targets)
    m.backward()
    return loss, {n: g.copy() for n, g in m.grads.items()}


@pytest.mark.parametrize("rows", [1, 3, 7, 10])
def test_chunked_head_matches_one_chunk(monkeypatch, rows):
    rng = np.random.default_rng(0)
    batches = []
    for B, T in ((3, 16), (1, 9), (4, 16)):   # several chunks, one, several again
        tokens = rng.integers(0, 97, (B, T))
        targets = rng.integers(0, 97, (B, T))
        targets[0, :4] = model_mod.IGNORE            # rows without a loss inside a chunk
        batches.append((tokens, targets))
    whole = _model()
    expected = [_loss_and_grads(whole, *b) for b in batches]

    # with need_dw the head takes all rows when N * V <= 4 * chunk: keep the chunk below that
    monkeypatch.setattr(model_mod, "_LOGIT_CHUNK", rows * 97)
    chunked = _model()
    assert chunked.config.vocab_size * 64 > 4 * model_mod._LOGIT_CHUNK
    for (tokens, targets), (loss, grads) in zip(batches, expected):
        got_loss, got = _loss_and_grads(chunked, tokens, targets)
        assert got_loss == pytest.approx(loss, rel=1e-6)
        assert got.keys() == grads.keys()
        for n in grads:
            np.testing.assert_allclose(got[n], grads[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_no_target_rows_give_nan_and_zero_gradients():
    m = _model()
    m.zero_grad()
    loss = m.forward(np.arange(12).reshape(2, 6), np.full((2, 6), model_mod.IGNORE))
    m.backward()
    assert np.isnan(loss)
    assert all(not g.any() for g in m.grads.values())


def test_masked_rows_cost_no_memory_beyond_a_chunk(monkeypatch):
    """Rows without a target inside the head: besides dh (N, C) and the logits chunk, it may
    hold O(chunk) rows, not copies of all N."""
    import tracemalloc
    m = _model()
    N, C, V = 4096, m.config.d_model, m.config.vocab_size
    monkeypatch.setattr(model_mod, "_LOGIT_CHUNK", 64 * V)          # 64 rows per chunk
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, C), dtype=np.float32)
    targets = rng.integers(0, V, N)
    targets[::7] = model_mod.IGNORE
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loss, dh, dw = m._head_loss(h, targets, True, True, True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert np.isfinite(loss) and dh.shape == (N, C)
    # dh + dW + per-row losses (O(N)) + O(chunk) buffers; a copy of the target rows of h (and
    # of their gradient) would add 2 * 0.86 * N * C * 4 bytes
    assert peak < 4 * N * C + 4 * V * C + 40 * N + 4 * 64 * (V + 2 * C) + (1 << 16)
