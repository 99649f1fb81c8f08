"""Generation: the KV cache gives the same tokens as re-running the sequence, sampling is seeded,
and top-k / top-p restrict the choice as specified."""
import json

import numpy as np
import pytest

import engine
from engine.generate import pick


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "qwen3", "smollm3"])
def test_cache_matches_full_rerun(hf_dirs, kind):
    model = engine.load(hf_dirs[kind][1])
    prompt = [3, 14, 15, 9, 2, 6]
    for kw in (dict(temperature=0.0), dict(temperature=1.3, seed=5), dict(temperature=0.9, top_p=0.8, seed=1)):
        a = engine.generate(model, prompt, max_new_tokens=15, **kw)
        b = engine.generate(model, prompt, max_new_tokens=15, use_cache=False, **kw)
        assert a == b and len(a) == 15


def test_cached_logits_equal_full_forward(hf_dirs):
    model = engine.load(hf_dirs["llama"][1])
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 11))
    full = model.forward(ids)
    cache = model.new_cache(2, 11)
    step = model.forward_cached(ids[:, :7], cache, 0)
    np.testing.assert_allclose(step, full[:, 6], rtol=1e-5, atol=1e-5)
    for t in range(7, 11):
        step = model.forward_cached(ids[:, t:t + 1], cache, t)
        np.testing.assert_allclose(step, full[:, t], rtol=1e-5, atol=1e-5)


def test_stops_at_stop_token_and_context(hf_dirs):
    model = engine.load(hf_dirs["gpt2"][1])
    prompt = [1, 2, 3]
    greedy = engine.generate(model, prompt, max_new_tokens=10)
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    assert engine.generate(model, prompt, max_new_tokens=10, stop=[stop_at]) == greedy[:first + 1]
    limit = model.config.max_seq_len
    long = engine.generate(model, list(range(limit - 3)), max_new_tokens=10)
    assert len(long) == 3  # the context is full
    with pytest.raises(engine.InputError, match="exceeds the model's context"):
        engine.generate(model, [1] * (limit + 1))


def test_seeded_sampling_is_reproducible(hf_dirs):
    model = engine.load(hf_dirs["gpt2"][1])
    a = engine.generate(model, [5, 6], max_new_tokens=20, temperature=1.0, seed=11)
    b = engine.generate(model, [5, 6], max_new_tokens=20, temperature=1.0, seed=11)
    c = engine.generate(model, [5, 6], max_new_tokens=20, temperature=1.0, seed=12)
    assert a == b and a != c


def test_top_k_and_top_p_restrict_choices():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    assert {pick(logits, 1.0, top_k=2, rng=rng) for _ in range(300)} == {0, 1}
    assert {pick(logits, 1.0, top_p=0.79, rng=rng) for _ in range(300)} == {0, 1}
    assert {pick(logits, 1.0, top_p=0.81, rng=rng) for _ in range(300)} == {0, 1, 2}
    assert pick(logits, 0.0) == 0
    draws = [pick(logits, 1.0, rng=rng) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def chat_model_dir(path, n_layer, max_seq_len):
    """A tiny llama with a byte tokenizer that has a chat template, saved to path."""
    cfg = engine.Config.llama(vocab_size=257, n_layer=n_layer, n_head=2, n_kv_head=1, d_model=16,
                              d_ff=24, max_seq_len=max_seq_len)
    engine.Model(cfg, seed=0).save(str(path))
    tok = engine.ByteTokenizer(chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save(str(path))
    return tok


def test_generate_command(tmp_path, capsys):
    from engine.cli import main as cli
    tok = chat_model_dir(tmp_path, n_layer=2, max_seq_len=64)
    model = engine.load(str(tmp_path))
    want = tok.decode(engine.generate(model, tok.encode("hi"), max_new_tokens=5, stop=tok.eos_ids))
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "hi" + want + "\n"
    ids = tok.chat_ids([{"role": "user", "content": "yo"}])
    want = tok.decode(engine.generate(model, ids, max_new_tokens=4, stop=tok.eos_ids))
    assert cli(["generate", "--model", str(tmp_path), "--chat", "--prompt", "yo", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert cli(["generate", "--model", str(tmp_path)]) == 2
    assert "--prompt is required" in capsys.readouterr().err
    engine.ByteTokenizer().save(str(tmp_path))   # the same model without a chat template
    assert cli(["generate", "--model", str(tmp_path), "--chat", "--prompt", "yo"]) == 2
    assert "ships none (a base model, not an instruct one): drop --chat" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300, 1e-8, 1e300])
def test_any_positive_temperature_samples(temperature):
    """logits / a tiny temperature overflow to inf (inf - inf = NaN in the sampler): the max is
    subtracted first, so a tiny temperature picks among the tied best logits, a huge one from
    all of them."""
    logits = np.array([1.0, 3.0, 2.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    got = {pick(logits, temperature, rng=rng) for _ in range(200)}
    assert got == ({0, 1, 2, 3} if temperature > 1 else {1, 3})
    assert pick(logits, temperature, top_k=1, rng=rng) in (1, 3)


def test_generate_command_tiny_temperature(tmp_path, capsys):
    from engine.cli import main as cli
    cfg = engine.Config.llama(vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                              max_seq_len=64)
    engine.Model(cfg, seed=0).save(str(tmp_path))
    engine.ByteTokenizer().save(str(tmp_path))
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hello there", "--max-new-tokens", "4",
                "--temperature", "1e-320", "--seed", "1"]) == 0
    greedy = capsys.readouterr().out
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hello there", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == greedy   # random logits have no ties: the same as greedy


def test_interactive_chat_drops_old_turns_to_fit_the_context(tmp_path, capsys, monkeypatch):
    """An interactive chat longer than the context drops its oldest user + assistant turns (the
    system message stays) with a note; a message too long on its own is not sent, with a note,
    and the chat goes on."""
    import importlib
    import io

    from engine.cli import main as cli
    G = importlib.import_module("engine.generate")   # the package's `generate` is the function
    tok = chat_model_dir(tmp_path, n_layer=1, max_seq_len=128)
    prompts = []

    def reply(model, ids, on_token, max_new_tokens, **kw):   # "ok." every time: known lengths
        prompts.append(tok.decode(ids))
        assert len(ids) + max_new_tokens <= 128
        for t in tok.encode("ok."):
            on_token(t)

    monkeypatch.setattr(G, "generate", reply)
    lines = ["first question here", "second question here", "", "third question here",
             "x" * 150, "fourth question here"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli(["generate", "--model", str(tmp_path), "--chat", "--system", "be brief",
                "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.count("model> ok.") == 4                               # the long line was not sent
    # one byte a token: 52 + 20 fits, 92 + 20 fits, 131 + 20 does not: the first turn goes
    assert prompts == ["<system>be brief<user>first question here<assistant>",
                       "<system>be brief<user>first question here<assistant>ok."
                       "<user>second question here<assistant>",
                       "<system>be brief<user>second question here<assistant>ok."
                       "<user>third question here<assistant>",
                       "<system>be brief<user>third question here<assistant>ok."
                       "<user>fourth question here<assistant>"]
    assert err.count("note: dropped the 1 oldest turn of the conversation") == 2
    assert "note: this message takes 183 tokens" in err and "not sent" in err


def test_interactive_chat_keeps_history_with_a_large_max_new_tokens(tmp_path, capsys, monkeypatch):
    """--max-new-tokens as large as the context: generate() stops at the context anyway, so
    earlier turns stay while a quarter of the context is left for the reply."""
    import importlib
    import io

    from engine.cli import main as cli
    G = importlib.import_module("engine.generate")
    tok = chat_model_dir(tmp_path, n_layer=1, max_seq_len=128)
    prompts = []

    def reply(model, ids, on_token, max_new_tokens, **kw):
        prompts.append(tok.decode(ids))
        for t in tok.encode("ok."):
            on_token(t)

    monkeypatch.setattr(G, "generate", reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    assert cli(["generate", "--model", str(tmp_path), "--chat", "--max-new-tokens", "200"]) == 0
    assert prompts[1] == "<user>first<assistant>ok.<user>second<assistant>"
    assert "dropped" not in capsys.readouterr().err


def test_padded_vocabulary_samples_only_the_tokenizer_ids(tmp_path, capsys):
    """A model vocabulary padded past the tokenizer's (check_vocab allows it): generation keeps
    to the tokenizer's ids when given its size, so every token decodes."""
    from engine.cli import main as cli
    cfg = engine.Config.gpt2(vocab_size=320, n_layer=1, n_head=2, d_model=32, max_seq_len=128)
    model = engine.Model(cfg, seed=0)
    model.save(str(tmp_path))
    tok = engine.ByteTokenizer()
    tok.save(str(tmp_path))
    kw = dict(max_new_tokens=100, temperature=5.0, seed=0)
    assert max(engine.generate(model, [104, 105], **kw)) >= tok.vocab_size   # the padding is reachable
    assert max(engine.generate(model, [104, 105], vocab_size=tok.vocab_size, **kw)) < tok.vocab_size
    with pytest.raises(engine.InputError, match="vocab_size must be"):
        engine.generate(model, [1], vocab_size=321)
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "60",
                "--temperature", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("hi")


def _always(tmp_path, pick: int, eos, vocab=257, ctx=128):
    """A saved Llama whose greedy choice is always `pick`, with config.json's eos ids `eos` and
    no generation_config.json (as many Hugging Face directories have none)."""
    cfg = engine.Config.llama(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                              d_ff=24, max_seq_len=ctx, eos_token_id=eos)
    m = engine.Model(cfg, seed=0)
    for n in ("blocks.0.attn.o.weight", "blocks.0.mlp.down.weight", "lm_head.weight"):
        m.params[n][:] = 0
    m.params["wte.weight"][:] = 1.0
    m.params["lm_head.weight"][pick] = 1.0
    d = tmp_path / "m"
    m.save(str(d))
    engine.ByteTokenizer().save(str(d))
    (d / "generation_config.json").unlink()
    return str(d), m


def test_generate_stops_at_end_tokens_config_json_lists(tmp_path, capsys):
    """config.json's eos_token_id [256, 17] and no generation_config.json: transformers stops
    at 17 (its generation config comes from config.json); `tailtune generate` went on."""
    from engine.cli import main as cli
    d, m = _always(tmp_path, 17, [256, 17])
    assert engine.generate(m, [104, 105], max_new_tokens=5) == [17] * 5
    assert cli(["generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "hi\n"


def test_finetune_samples_a_padded_vocabulary_model_within_the_tokenizers_ids(tmp_path):
    """Greedy picks a padding id (300 of 320; the tokenizer has 257): the before/after sample
    of finetune failed the run with 'token id 300 is outside the tokenizer's vocabulary'."""
    from engine.cli import main as cli
    d, m = _always(tmp_path, 300, 256, vocab=320)
    assert engine.generate(m, [104], max_new_tokens=1) == [300]
    (tmp_path / "t.txt").write_text("hello there, general text " * 40)
    out = tmp_path / "run"
    assert cli(["finetune", "--model", d, "--data", str(tmp_path / "t.txt"), "--out", str(out),
                "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--sample-prompt", "hello",
                "--sample-tokens", "4", "--lr", "0", "--train-last", "1"]) == 0
    assert json.load(open(out / "summary.json"))["status"] == "done"


def test_generate_says_when_the_context_or_greedy_decoding_overrides_a_flag(tmp_path, capsys):
    from engine.cli import main as cli
    d, _ = _always(tmp_path, 65, 256, ctx=8)                   # always "A"
    assert cli(["generate", "--model", d, "--prompt", "hello", "--max-new-tokens", "10"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "helloAAA\n"
    assert "stopped after 3 new tokens: the prompt (5 tokens) and the reply fill the model's " \
           "context of 8" in cap.err
    assert cli(["generate", "--model", d, "--prompt", "hel", "--max-new-tokens", "2",
                "--top-p", "0.9", "--seed", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "helAA\n" and "stopped" not in cap.err
    assert "--temperature 0 (the default) is greedy: --top-k, --top-p and --seed apply only" in cap.err
