"""The engine against transformers + PyTorch autograd on the same random-init models: logits,
loss, and the gradient of every trainable parameter, under several freezing patterns; then
optimizer steps against torch.optim."""
import numpy as np
import pytest
import torch

import engine
from conftest import engine_to_hf_names, hf_grads_as_engine

B, T = 3, 19


def batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T))
    targets = rng.integers(0, vocab, (B, T))
    targets[0, :5] = -100  # a masked prompt
    return tokens, targets


def torch_loss(hf, tokens, targets):
    logits = hf(torch.tensor(tokens)).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.tensor(targets).reshape(-1), ignore_index=-100)


def set_torch_trainable(model, hf):
    """requires_grad on exactly the transformers parameters behind the engine's trainable ones."""
    e2h = engine_to_hf_names(model, hf)
    want = {e2h[n] for n in model.trainable}
    for n, p in hf.named_parameters():
        p.requires_grad_(n in want)
        p.grad = None
    # each frozen/trainable choice below is expressible in transformers' parameter granularity
    for e, h in e2h.items():
        assert (e in model.trainable) == (h in want), (e, h)


def assert_grads_match(model, hf):
    ref = hf_grads_as_engine(model, hf)
    top = max(float(np.abs(ref[n]).max()) for n in model.trainable)
    for n in model.trainable:
        r = ref[n]
        if n.endswith("attn.k.bias") and model.config.positions != "rope":
            # exactly 0 in exact arithmetic (softmax ignores a per-query constant): both sides
            # hold rounding noise only (rotary embeddings turn the bias by the key's position,
            # so there it has a gradient)
            assert np.abs(model.grads[n]).max() <= 1e-5 * top and np.abs(r).max() <= 1e-5 * top
            continue
        scale = max(float(np.abs(r).max()), 1e-3 * top)
        np.testing.assert_allclose(model.grads[n], r, rtol=1e-3, atol=2e-5 * scale, err_msg=n)


def assert_step_matches(model, hf, tokens, targets):
    """One forward + backward on each side: the losses and every trainable gradient agree."""
    loss = model.forward(tokens, targets)
    model.backward()
    tl = torch_loss(hf, tokens, targets)
    tl.backward()
    assert abs(loss - tl.item()) <= 1e-5 * max(1.0, abs(tl.item()))
    assert_grads_match(model, hf)


FREEZES = {
    "all": lambda m: m.unfreeze(),
    "last1": lambda m: m.train_last(1),
    "last2": lambda m: m.train_last(2),
    "last-all": lambda m: m.train_last(m.config.n_layer),
    "mlp-only-in-last2": lambda m: m.train_last(2).freeze("blocks.*.attn.*"),
    "attn-only-in-last2": lambda m: m.train_last(2).freeze("blocks.*.mlp.*", "blocks.*.ln*"),
    "tied-embedding": lambda m: m.freeze().unfreeze("wte.weight"),
    "final-norm-only": lambda m: m.freeze().unfreeze("ln_f.*"),
    "middle-block": lambda m: m.freeze().unfreeze("blocks.1.*"),
    # the forward keeps only what these need: the lowest block's MLP side alone; frozen weights
    # inside the range (their layer inputs not kept); the top block's output projection alone,
    # on the gathered target rows
    "lowest-mlp-only": lambda m: m.train_last(2).freeze(f"blocks.{m.config.n_layer - 2}.attn.*",
                                                        f"blocks.{m.config.n_layer - 2}.ln1.*"),
    "frozen-down-and-o-in-range": lambda m: m.train_last(2).freeze(
        "blocks.*.mlp.down.*", f"blocks.{m.config.n_layer - 1}.attn.o.*"),
    "top-o-only": lambda m: m.freeze().unfreeze(f"blocks.{m.config.n_layer - 1}.attn.o.*"),
}


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama", "llama-tied", "llama3", "mistral",
                                  "phi3", "qwen2", "qwen3", "smollm3"])
def test_logits_match(hf_dirs, kind):
    hf, path = hf_dirs[kind]
    model = engine.load(path)
    tokens, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = model.forward(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["llama", "llama3"])
def test_rotary_frequencies_equal_transformers(hf_dirs, kind):
    """Bit for bit, Llama 3's rescaled ones too (computed in float32 as transformers does)."""
    from engine.layers import rope_frequencies
    hf, path = hf_dirs[kind]
    want = hf.model.rotary_emb.inv_freq.numpy()
    got = rope_frequencies(engine.load(path).config)
    np.testing.assert_array_equal(got, want)
    if kind == "llama3":    # all three bands: kept, smoothed, divided by the factor
        plain = rope_frequencies(engine.Config.from_dict(
            {**engine.load(path).config.to_dict(), "rope_scaling": None}))
        ratio = plain / got
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize("head_dim,theta", [(96, 1e4), (128, 1e6), (128, 5e6), (64, 1e4), (256, 1e7)])
def test_rotary_frequencies_within_an_ulp_of_torch_for_other_constants(head_dim, theta):
    """Phi-3's, Qwen's and SmolLM3's constants: torch's float32 power (Sleef) is not correctly
    rounded everywhere; the engine's is, so the two agree to an ulp, on any machine."""
    from kernels.rope import inverse_frequencies
    want = (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).numpy()
    np.testing.assert_array_max_ulp(inverse_frequencies(head_dim, theta), want, maxulp=1)


def test_llama3_frequencies_equal_transformers_beyond_llama3s_constants():
    """transformers' own llama3 rescaling, bit for bit, over constants other than Llama 3's."""
    import itertools
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from engine.layers import rope_frequencies
    for hd, theta, factor, old, (low, high) in itertools.product(
            (64, 128), (5e5, 1e4, 1e5), (8.0, 32.0, 7.3), (8192, 16384, 4096),
            ((1.0, 4.0), (1.3, 3.7))):
        sc = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": old}
        hc = LlamaConfig(vocab_size=8, num_hidden_layers=1, hidden_size=hd, num_attention_heads=1,
                         head_dim=hd, intermediate_size=8, rope_theta=theta,
                         max_position_embeddings=131072, rope_scaling=dict(sc))
        want = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")[0].numpy()
        cfg = engine.Config.llama(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, d_model=hd,
                                  d_ff=8, rope_theta=theta, rope_scaling=sc)
        np.testing.assert_array_equal(rope_frequencies(cfg), want, err_msg=str(sc))


@pytest.mark.parametrize("freeze", list(FREEZES))
@pytest.mark.parametrize("kind", ["gpt2", "gpt2-untied", "llama", "llama-tied", "llama3", "mistral",
                                  "phi3", "qwen2", "qwen3", "smollm3"])
def test_loss_and_grads_match(hf_dirs, kind, freeze):
    hf, path = hf_dirs[kind]
    model = engine.load(path)
    FREEZES[freeze](model)
    set_torch_trainable(model, hf)
    tokens, targets = batch(model.config.vocab_size, seed=1)
    assert_step_matches(model, hf, tokens, targets)
    for n, p in hf.named_parameters():
        if not p.requires_grad:
            assert p.grad is None


@pytest.mark.parametrize("freeze", [
    lambda m: m.freeze().unfreeze("blocks.1.attn.q_norm.*", "blocks.2.attn.k_norm.*"),
    lambda m: m.train_last(1).freeze("blocks.2.attn.q.*", "blocks.2.attn.k.*"),
    lambda m: m.train_last(2).freeze("blocks.*.attn.q_norm.*", "blocks.*.attn.k_norm.*"),
    lambda m: m.freeze().unfreeze("blocks.1.attn.v.*", "blocks.2.attn.q_norm.*"),
], ids=["norms-only", "norms-above-frozen-projections", "projections-below-frozen-norms",
        "v-only-below-a-q-norm"])
def test_qk_norm_gradients_match(hf_dirs, freeze):
    """Qwen3's per-head q / k norms trained alone, above frozen projections, and frozen between
    trainable projections and the attention."""
    hf, path = hf_dirs["qwen3"]
    model = engine.load(path)
    freeze(model)
    set_torch_trainable(model, hf)
    assert_step_matches(model, hf, *batch(model.config.vocab_size, seed=3))


@pytest.mark.parametrize("kind,freeze", [("gpt2", "tied-embedding"), ("llama", "last2"),
                                         ("llama", "top-o-only")])
def test_two_scaled_backwards_accumulate_like_torch(hf_dirs, kind, freeze):
    """backward(scale=w) is torch's (w * loss).backward(): two batches accumulated with
    weights 0.3 and 0.7 (how the training loop weighs micro-batches by their targets)."""
    hf, path = hf_dirs[kind]
    model = engine.load(path)
    FREEZES[freeze](model)
    set_torch_trainable(model, hf)
    for seed, w in ((1, 0.3), (2, 0.7)):
        tokens, targets = batch(model.config.vocab_size, seed=seed)
        model.forward(tokens, targets)
        model.backward(scale=w)
        (w * torch_loss(hf, tokens, targets)).backward()
    assert_grads_match(model, hf)
    with pytest.raises(engine.InputError, match="scale must be a finite number"):
        model.forward(tokens, targets)
        model.backward(scale=float("nan"))


def test_untied_head_trainable(hf_dirs):
    hf, path = hf_dirs["llama"]
    model = engine.load(path)
    model.freeze().unfreeze("lm_head.weight", "blocks.3.mlp.*")
    set_torch_trainable(model, hf)
    tokens, targets = batch(model.config.vocab_size, seed=2)
    model.forward(tokens, targets)
    model.backward()
    torch_loss(hf, tokens, targets).backward()
    assert_grads_match(model, hf)


@pytest.mark.parametrize("trainable", ["last2+head", "head-only"])
@pytest.mark.parametrize("kind", ["gpt2-untied", "llama-tied"])
def test_mostly_masked_targets_match(hf_dirs, kind, trainable):
    """Chat-style data: only the answers carry a loss (prompts and padding are -100), one row
    none at all. The head then runs on the target rows alone; loss and gradients must not move.
    head-only on the untied model: no input gradient below the head at all."""
    hf, path = hf_dirs[kind]
    model = engine.load(path)
    if trainable == "head-only":
        model.freeze().unfreeze(model_head(kind))
    else:
        model.train_last(2).unfreeze("ln_f.*", model_head(kind))
    set_torch_trainable(model, hf)
    tokens, targets = batch(model.config.vocab_size, seed=4)
    targets[:] = -100
    targets[0, 12:15] = tokens[0, 13:16]       # an answer after a masked prompt
    targets[2, 3:6] = tokens[2, 4:7]           # a short example, then padding
    assert_step_matches(model, hf, tokens, targets)


def model_head(kind):
    return "lm_head.weight" if kind.endswith("untied") else "wte.weight"


def test_gradient_accumulates_over_micro_batches(hf_dirs):
    """Two backward passes without zero_grad sum, as in PyTorch."""
    _, path = hf_dirs["llama"]
    model = engine.load(path).train_last(2)
    tokens, targets = batch(model.config.vocab_size, seed=3)
    model.forward(tokens, targets)
    model.backward()
    once = {n: g.copy() for n, g in model.grads.items()}
    model.forward(tokens, targets)
    model.backward()
    for n, g in model.grads.items():
        np.testing.assert_allclose(g, 2 * once[n], rtol=1e-6, atol=1e-9)
    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())


def _torch_adamw(hf, lr, wd):
    decay = [p for p in hf.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), eps=1e-8)


def pair(kind, seed, boost=True):
    """A fresh transformers model and the engine's load of it."""
    import tempfile
    from conftest import build_hf
    hf = build_hf(kind, seed=seed, boost=boost)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return hf, engine.load(d)


def train_both(model, hf, opt, topt, steps, seed):
    """The same steps on the same batches with each library's optimizer."""
    for step in range(steps):
        tokens, targets = batch(model.config.vocab_size, seed=seed + step)
        model.zero_grad()
        model.forward(tokens, targets)
        model.backward()
        opt.step()
        topt.zero_grad()
        torch_loss(hf, tokens, targets).backward()
        topt.step()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "qwen3", "smollm3"])
def test_adamw_steps_match_torch(kind):
    # Default init, not boosted: saturated GELUs give near-zero gradients that Adam's
    # normalization would blow up to lr-sized steps driven by rounding (torch's tanh flushes
    # them to exactly 0, the engine's logistic form keeps ~1e-9)
    hf, model = pair(kind, seed=7, boost=False)
    model.train_last(2)
    set_torch_trainable(model, hf)
    lr, wd = 1e-3, 0.1
    before = {n: p.copy() for n, p in model.params.items()}
    opt = engine.AdamW(model, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    train_both(model, hf, opt, _torch_adamw(hf, lr, wd), steps=5, seed=10)
    e2h = engine_to_hf_names(model, hf)
    ref = hf_names_params(model, hf)
    for n in model.params:
        if n not in model.trainable:
            assert np.array_equal(model.params[n], before[n])
            continue
        if n.endswith("attn.k.bias") and model.config.positions != "rope":
            # Its exact gradient is 0 (softmax ignores a per-query constant), so Adam scales
            # rounding noise to steps of size lr: the two libraries' noise differs.
            continue
        # Adam divides by sqrt(v): where a gradient is near zero, rounding moves that element's
        # step by a fraction of lr. So: the updates agree as tensors, and no element is off by
        # more than a few percent of one step.
        upd, tupd = model.params[n] - before[n], ref[n] - before[n]
        rel = np.linalg.norm(upd - tupd) / np.linalg.norm(tupd)
        assert rel < 1e-3, (n, e2h[n], rel)
        assert np.abs(upd - tupd).max() < 0.05 * lr, (n, e2h[n])


def hf_names_params(model, hf):
    from engine.io import hf_names
    sd = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    return hf_names.to_engine(model.config, lambda n: sd[n], list(sd))


def test_sgd_momentum_matches_torch():
    hf, model = pair("llama-tied", seed=3)
    model.train_last(1)
    set_torch_trainable(model, hf)
    opt = engine.SGD(model, lr=0.05, momentum=0.9, weight_decay=0.01)
    topt = torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                           weight_decay=0.01)
    train_both(model, hf, opt, topt, steps=4, seed=20)
    ref = hf_names_params(model, hf)
    for n in model.params:
        np.testing.assert_allclose(model.params[n], ref[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_clip_grad_norm_matches_torch(hf_dirs):
    hf, path = hf_dirs["gpt2"]
    model = engine.load(path).train_last(2)
    set_torch_trainable(model, hf)
    tokens, targets = batch(model.config.vocab_size, seed=4)
    model.forward(tokens, targets)
    model.backward()
    torch_loss(hf, tokens, targets).backward()
    norm = engine.clip_grad_norm(model, 0.01)
    tnorm = torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 0.01)
    assert abs(norm - tnorm.item()) <= 1e-4 * tnorm.item()
    assert_grads_match(model, hf)


def test_mistral_runs_up_to_its_sliding_window(tmp_path):
    """transformers' Mistral attends to the last sliding_window positions; the engine runs
    full attention, so it runs sequences of up to the window only, where the two agree: at
    T = window the logits equal transformers', a window one shorter changes transformers'
    (so the window is really in force there), and a longer sequence is refused."""
    import copy
    from transformers import MistralConfig, MistralForCausalLM
    from conftest import HF_CONFIGS
    cfg = copy.deepcopy(HF_CONFIGS["mistral"])
    torch.manual_seed(1)
    hf = MistralForCausalLM(MistralConfig(**cfg)).eval()
    short = MistralForCausalLM(MistralConfig(**{**cfg, "sliding_window": T - 1})).eval()
    short.load_state_dict(hf.state_dict())
    tokens, _ = batch(cfg["vocab_size"])
    with torch.no_grad():
        want, windowed = (m(torch.tensor(tokens)).logits.numpy() for m in (hf, short))
    assert np.abs(windowed - want).max() > 1e-3
    hf.save_pretrained(tmp_path)
    model = engine.load(str(tmp_path))
    assert (model.config.sliding_window, model.config.context_length) == (T, T)
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    longer = np.concatenate([tokens, tokens[:, :1]], axis=1)
    with pytest.raises(engine.InputError, match=f"exceeds the model's context of {T} "
                                                r"\(its sliding window\)"):
        model.forward(longer)
    with pytest.raises(engine.InputError, match="exceeds the model's context"):
        engine.generate(model, list(range(T + 1)), max_new_tokens=1)
    assert len(engine.generate(model, [1, 2, 3], max_new_tokens=100)) == T - 3
    shape = (1, T + 5, model.config.n_kv_head, model.config.head_dim)   # a cache made by hand
    cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in model.blocks]
    model.forward_cached(tokens[:1], cache, 0)
    with pytest.raises(engine.InputError, match=f"positions up to {T + 1} exceed the model's "
                                                f"context of {T}"):
        model.forward_cached(tokens[:1, :1], cache, T)


def test_phi3_config_as_transformers_reads_it(tmp_path, hf_dirs):
    """Phi3Config's default norm epsilon (1e-5) when config.json has none; a rotary over part
    of the heads (partial_rotary_factor, also inside rope_scaling, which replaces
    rope_parameters) and rope scaling other than longrope (which Phi3Config refuses) are
    refused, not run otherwise."""
    import json
    import shutil
    from transformers import Phi3ForCausalLM
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["phi3"][1], src)
    cfg = json.loads((src / "config.json").read_text())

    def write(**changes):
        (src / "config.json").write_text(json.dumps({**cfg, **changes}))

    write()
    cfg.pop("rms_norm_eps")
    write()
    model = engine.load(str(src))
    hf = Phi3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert model.config.norm_eps == hf.config.rms_norm_eps == 1e-5
    tokens, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for changes, match in (
            (dict(rope_parameters={**cfg["rope_parameters"], "partial_rotary_factor": 0.5}),
             "partial_rotary_factor=0.5"),
            (dict(rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.75,
                                "rope_theta": 800.0}), "partial_rotary_factor=0.75"),
            (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "longrope only")):
        write(**changes)
        with pytest.raises(engine.ConfigError, match=match):
            engine.load(str(src))


def test_mistral_config_as_transformers_reads_it(tmp_path):
    """MistralConfig's defaults (8 key / value heads when the key is absent) and shapes its
    LlamaConfig refuses (width no multiple of the heads, head_dim given): loaded and saved back
    to the same logits."""
    import json
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(2)
    hf = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=40, intermediate_size=36,
                                          num_hidden_layers=2, num_attention_heads=16,
                                          num_key_value_heads=8, head_dim=6,
                                          max_position_embeddings=32, sliding_window=24)).eval()
    hf.save_pretrained(tmp_path / "src")
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    del cfg["num_key_value_heads"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    model = engine.load(str(tmp_path / "src"))
    assert (model.config.n_kv_head, model.config.head_dim) == (8, 6)
    model.save(str(tmp_path / "out"))
    again = MistralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 50, (2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
        got = again(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(model.forward(tokens), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    llama = engine.Model(engine.Config.llama(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16,
                                             d_ff=16, max_seq_len=32, sliding_window=8))
    with pytest.raises(engine.ConfigError, match="model_type='mistral'"):
        llama.save(str(tmp_path / "llama"))
