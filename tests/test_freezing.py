"""Freezing is structural, not a flag: what runs, what is kept, what is allocated, what changes."""
import numpy as np
import pytest

import engine
from conftest import small_model
from engine import layers


def small(n_layer=6, kind="llama", **kw):
    return small_model(kind, n_layer, **kw)


def data(seed=0, B=2, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 64, (B, T)), rng.integers(0, 64, (B, T))


@pytest.fixture
def spy(monkeypatch):
    """Records which blocks ran forward keeping activations and which ran backward, by
    wrapping Block itself (independent of the model's own bookkeeping)."""
    calls = {"forward_keep": [], "forward_nokeep": [], "backward": []}
    fwd, bwd = layers.Block.forward, layers.Block.backward

    def forward(self, P, x, rope, keep, **kw):
        calls["forward_keep" if keep else "forward_nokeep"].append(self.index)
        return fwd(self, P, x, rope, keep, **kw)

    def backward(self, *a, **k):
        calls["backward"].append(self.index)
        return bwd(self, *a, **k)

    monkeypatch.setattr(layers.Block, "forward", forward)
    monkeypatch.setattr(layers.Block, "backward", backward)
    return calls


@pytest.mark.parametrize("k", [0, 1, 2, 6])
def test_backward_stops_at_lowest_trainable_block(spy, k):
    m = small().train_last(k)
    tokens, targets = data()
    m.forward(tokens, targets)
    m.backward()
    L = 6
    assert spy["forward_keep"] == list(range(L - k, L))
    assert spy["forward_nokeep"] == list(range(0, L - k))
    assert spy["backward"] == list(reversed(range(L - k, L)))
    assert m.last_backward_blocks == spy["backward"]


def test_backward_through_tied_embedding_runs_every_block(spy):
    m = small(kind="gpt2").freeze().unfreeze("wte.weight")
    tokens, targets = data()
    m.forward(tokens, targets)
    m.backward()
    assert spy["backward"] == [5, 4, 3, 2, 1, 0]
    assert set(m.grads) == {"wte.weight"}
    assert np.abs(m.grads["wte.weight"]).sum() > 0


def test_frozen_weights_inside_trainable_range_get_no_weight_gradient(monkeypatch):
    """With attention frozen in the trainable blocks, the only weight-gradient GEMMs are those
    of the trainable MLP weights."""
    m = small().train_last(2).freeze("blocks.*.attn.*")
    seen = []
    real = layers.gemm_tn

    def gemm_tn(a, b, out, **kw):
        seen.append(next(n for n, g in m.grads.items() if g is out))
        return real(a, b, out, **kw)

    monkeypatch.setattr(layers, "gemm_tn", gemm_tn)
    tokens, targets = data()
    m.forward(tokens, targets)
    m.backward()
    want = {f"blocks.{i}.mlp.{p}.weight" for i in (4, 5) for p in ("gate", "up", "down")}
    assert set(seen) == want and len(seen) == len(want)
    assert not any(".attn." in n for n in m.grads)


def test_frozen_parameters_are_bit_identical_after_training():
    m = small(kind="gpt2").train_last(2).freeze("blocks.5.attn.*")
    before = {n: p.copy() for n, p in m.params.items()}
    opt = engine.AdamW(m, lr=1e-2, weight_decay=0.1)
    for s in range(3):
        tokens, targets = data(seed=s)
        m.zero_grad()
        m.forward(tokens, targets)
        m.backward()
        opt.step()
    for n, p in m.params.items():
        if n in m.trainable:
            assert not np.array_equal(p, before[n]), n
        else:
            assert p.tobytes() == before[n].tobytes(), n


def test_grad_buffers_and_optimizer_state_only_for_trainable():
    m = small()
    opt = engine.AdamW(m, lr=1e-3)
    assert set(opt.state) == set(m.params) == set(m.grads)
    m.train_last(1)
    trainable = {n for n in m.params if n.startswith("blocks.5.") or n.startswith("ln_f.")}
    assert set(m.grads) == trainable == set(m.trainable)
    assert set(opt.state) == trainable  # dropped on freeze, not at the next step
    per_param = {n: 2 * m.params[n].nbytes for n in trainable}
    assert opt.state_bytes() == sum(per_param.values())
    m.unfreeze("blocks.4.mlp.*")
    assert {n for n in opt.state if n.startswith("blocks.4.")} == {
        "blocks.4.mlp.gate.weight", "blocks.4.mlp.up.weight", "blocks.4.mlp.down.weight"}
    assert not opt.state["blocks.4.mlp.up.weight"]["m"].any()
    sgd = engine.SGD(m, lr=0.1)
    assert all(s == {} for s in sgd.state.values())  # no momentum, no state


@pytest.mark.parametrize("make_opt", [lambda m: engine.AdamW(m, lr=0.1, weight_decay=0.5),
                                      lambda m: engine.SGD(m, lr=0.1, momentum=0.9, weight_decay=0.5)])
def test_a_parameter_unfrozen_after_backward_is_not_stepped(make_opt):
    """As torch.optim skips a parameter whose .grad is None: unfrozen between backward() and
    step(), it keeps its value and gets no step; the next backward gives it a gradient."""
    m = small().train_last(1)
    opt = make_opt(m)
    x = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 8))
    m.forward(x, x)
    m.backward()
    m.unfreeze("blocks.0.mlp.up.weight")
    w0 = m.params["blocks.0.mlp.up.weight"].copy()
    top = m.params["blocks.5.mlp.up.weight"].copy()
    opt.step()
    assert np.array_equal(m.params["blocks.0.mlp.up.weight"], w0)
    assert not np.array_equal(m.params["blocks.5.mlp.up.weight"], top)
    assert opt.state["blocks.0.mlp.up.weight"].get("t", 0) == 0
    assert not opt.state["blocks.0.mlp.up.weight"].get("m", np.zeros(1)).any()
    m.zero_grad()
    m.forward(x, x)
    m.backward()
    opt.step()
    assert not np.array_equal(m.params["blocks.0.mlp.up.weight"], w0)


def test_saved_activations_grow_with_trainable_blocks_not_depth():
    tokens, targets = data()
    sizes = {}
    for depth in (4, 8):
        for k in (1, 2, 3):
            m = small(n_layer=depth).train_last(k)
            m.forward(tokens, targets)
            sizes[depth, k] = m.saved_bytes()
    assert sizes[4, 1] == sizes[8, 1] and sizes[4, 3] == sizes[8, 3]
    per_block = sizes[4, 2] - sizes[4, 1]
    assert per_block > 0 and sizes[4, 3] - sizes[4, 2] == per_block
    m = small(n_layer=8).freeze()
    m.unfreeze("ln_f.*")
    m.forward(tokens, targets)
    assert m.saved_bytes() < per_block  # only the final norm's input and the head's dh


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_memory_follows_trainable_blocks_not_depth(kind):
    """The same as above, measured by tracemalloc (numpy reports its buffers to it) instead of
    the model's own account: what a training forward leaves held, and the peak of forward +
    backward, are the same for 4 and 8 blocks with the same trainable tail."""
    import tracemalloc
    tokens, targets = data(B=4, T=32)
    held, peak = {}, {}
    for depth in (4, 8):
        for k in (1, 2):
            m = small(n_layer=depth, kind=kind).train_last(k)
            m.forward(tokens, targets)
            m.backward()            # the gradient buffers exist from here on
            tracemalloc.start()
            try:
                m.forward(tokens, targets)
                held[depth, k] = tracemalloc.get_traced_memory()[0]
                m.backward()
                peak[depth, k] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    per_block = held[4, 2] - held[4, 1]
    assert per_block > 20_000, held          # a block's saved activations: tens of KB here
    for k in (1, 2):
        assert abs(held[8, k] - held[4, k]) < 0.05 * per_block, held
        assert abs(peak[8, k] - peak[4, k]) < 0.05 * per_block, peak


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_block_keeps_only_what_its_trainable_parts_read(kind):
    """The lowest trainable block training its MLP side alone keeps nothing of its attention
    (its input, ln1's output and statistics, q, k, v, the attention output and its log-sum-exp);
    a frozen weight inside the range keeps no input for a weight gradient (down: the activation,
    d_ff wide). Sizes from the config, counted here."""
    tokens, targets = data()
    B, T = tokens.shape
    m = small(n_layer=4, kind=kind)
    c = m.config
    stats = 1 if c.norm == "rmsnorm" else 2
    attention = 4 * (B * T * (2 * c.d_model + stats + 2 * c.n_head * c.head_dim
                              + 2 * c.n_kv_head * c.head_dim) + B * c.n_head * T)

    def kept(*frozen):
        m.train_last(1)
        if frozen:          # freeze() alone freezes everything
            m.freeze(*frozen)
        m.forward(tokens, targets)
        return m.saved_bytes()
    full = kept()
    assert full - kept("blocks.3.attn.*", "blocks.3.ln1.*") == attention
    assert full - kept("blocks.3.mlp.down.*") == 4 * B * T * c.d_ff


def test_nothing_kept_without_targets_or_with_grad_false():
    m = small()
    tokens, targets = data()
    m.forward(tokens)
    assert m.saved_bytes() == 0
    m.forward(tokens, targets, grad=False)
    assert m.saved_bytes() == 0
    with pytest.raises(engine.InputError):
        m.backward()


def test_grad_false_loss_equals_training_loss():
    m = small().train_last(2)
    tokens, targets = data()
    assert m.forward(tokens, targets, grad=False) == pytest.approx(m.forward(tokens, targets), rel=1e-6)


def test_a_batch_without_targets_adds_nothing_and_its_step_moves_nothing(spy):
    """Every target -100: the loss is NaN (no mean), backward adds nothing and runs no block,
    and an optimizer step after it alone leaves every weight as it was (Adam's moments and
    weight decay moved all of them before); accumulated with a real batch, the sum is that
    batch's gradient."""
    m = small().train_last(2)
    opt = engine.AdamW(m, lr=1e-2, weight_decay=0.1)
    x, y = data()
    m.forward(x, y)
    m.backward()
    opt.step()                                  # moments now nonzero
    before = {n: p.copy() for n, p in m.params.items()}
    m.zero_grad()
    spy["backward"].clear()
    assert np.isnan(m.forward(x, np.full_like(y, -100)))
    m.backward()
    assert spy["backward"] == []
    opt.step()
    assert all(np.array_equal(before[n], m.params[n]) for n in m.params)
    m.zero_grad()
    m.forward(x, np.full_like(y, -100))
    m.backward(scale=0.5)
    m.forward(x, y)
    m.backward()
    got = {n: g.copy() for n, g in m.grads.items()}
    m.zero_grad()
    m.forward(x, y)
    m.backward()
    assert all(np.array_equal(got[n], m.grads[n]) for n in got)


@pytest.mark.parametrize("trainable,kept", [
    (("blocks.0.attn.v.*",), set()),                        # q and k lead nowhere
    (("blocks.0.attn.q_norm.*",), {"q_pre", "stq"}),
    (("blocks.0.attn.k.*",), {"k_pre", "stk"}),
    (("blocks.0.ln1.*",), {"q_pre", "stq", "k_pre", "stk"}),  # through both to the norm
])
def test_qk_norms_keep_their_inputs_only_where_backward_reads_them(trainable, kept):
    """A Qwen3 block keeps q / k before their norms (and the norms' statistics) only on the
    side whose backward leads to a trainable parameter; the step still runs."""
    m = small(n_layer=3, kind="qwen3")
    m.freeze().unfreeze(*trainable)
    keep = m.blocks[0].backward_plan(set(m.trainable), False)["keep"]
    assert keep & {"q_pre", "stq", "k_pre", "stk"} == kept
    tokens, targets = data()
    m.forward(tokens, targets)
    m.backward()
    assert set(m.grads) == set(m.trainable)
