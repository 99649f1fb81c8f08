"""The real SmolLM2-135M-Instruct from its GGUF against transformers loading the same file:
logits on several hundred tokens of real text, and greedy generation on chat prompts."""
import inspect

import numpy as np
import pytest
import torch

import engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(require_smollm2_session):
    return engine.load("smollm2"), engine.load_tokenizer("smollm2")


def real_text(n_tokens, tok):
    """Prose and code from this machine's standard library (json's docs and source)."""
    import json
    text = inspect.getdoc(json) + "\n\n" + inspect.getsource(json.dumps)
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


def test_logits_match_transformers(smol, hf_smollm2):
    model, tok = smol
    ids = np.array([real_text(400, tok)])
    with torch.no_grad():
        want = hf_smollm2(torch.tensor(ids)).logits.numpy()
    got = model.forward(ids)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4 * scale)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    # the loss on the text, both ways
    targets = np.concatenate([ids[:, 1:], [[-100]]], axis=1)
    tl = torch.nn.functional.cross_entropy(torch.tensor(want[0]), torch.tensor(targets[0]), ignore_index=-100)
    assert model.forward(ids, targets, grad=False) == pytest.approx(tl.item(), rel=1e-5)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
]


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_greedy_generation_matches_transformers(smol, hf_smollm2, chat):
    model, tok = smol
    ids = tok.encode(tok.chat_prompt(CHATS[chat]), add_special_tokens=False)
    ours = engine.generate(model, ids, max_new_tokens=24, temperature=0.0, stop=tok.eos_ids)
    with torch.no_grad():
        out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  eos_token_id=list(tok.eos_ids), pad_token_id=tok.eos_ids[0])
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


def test_cache_equals_no_cache_on_smollm2(smol):
    model, tok = smol
    ids = tok.encode(tok.chat_prompt(CHATS[1]), add_special_tokens=False)
    a = engine.generate(model, ids, max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    b = engine.generate(model, ids, max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                        use_cache=False)
    assert a == b
