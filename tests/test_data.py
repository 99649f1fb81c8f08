"""Training data: chat loss masks, the token cache's key, text windows, encodings, and errors
that name the row."""
import json
import os

import numpy as np
import pytest

import engine
from engine import data as D
from engine.cli import main as cli

# a template with a default system prompt, as SmolLM2's: an opening assistant turn must not
# train on it
TEMPLATE = ("{% if messages[0].role != 'system' %}<sys>be brief</s>{% endif %}"
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tok():
    return engine.ByteTokenizer(chat_template=TEMPLATE)


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def trained_text(t, data):
    ids, mask = np.asarray(data.tokens), np.asarray(data.mask)
    return t.decode([int(i) for i in ids[mask == 1]])


def test_opening_assistant_turn_trains_on_its_content_only(tmp_path):
    t = tok()
    p = write(tmp_path / "a.jsonl", json.dumps({"messages": [
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "bye"}]}) + "\n")
    data = D.tokenize_file(p, t, cache_dir=str(tmp_path / "c"))
    assert t.decode([int(i) for i in data.tokens]) == t.chat_prompt(
        [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "bye"}], add_generation_prompt=False)
    assert trained_text(t, data) == "hello</s>bye</s>"


def test_cache_key_tells_a_text_file_from_jsonl_with_the_same_bytes(tmp_path):
    row = json.dumps({"prompt": "question", "completion": " answer"}) + "\n"
    c = str(tmp_path / "c")
    rows = D.tokenize_file(write(tmp_path / "same.jsonl", row), tok(), cache_dir=c)
    text = D.tokenize_file(write(tmp_path / "same.txt", row), tok(), cache_dir=c)
    assert rows.kind == "examples" and text.kind == "text"
    assert int(np.asarray(text.mask).sum()) == len(text.tokens)   # every token a target


def test_text_windows_keep_the_trailing_tokens(tmp_path):
    """465 tokens in windows of 256: two windows, the second short; every token after the
    first is a target exactly once."""
    t = engine.ByteTokenizer()
    data = D.tokenize_file(write(tmp_path / "t.txt", "x" * (465 - 1)), t, cache_dir=str(tmp_path / "c"))
    assert len(data.tokens) == 465                       # 464 bytes and the end-of-text token
    ex = D.Examples(data, 256)
    assert len(ex) == 2 and len(ex.get(1)[0]) == 465 - 256
    assert int(ex.targets().sum()) == 464
    full = D.Examples(data, 232)                         # 464 = 2 x 232: no short window
    assert len(full) == 2 and int(full.targets().sum()) == 464


def test_byte_order_marks_are_dropped(tmp_path):
    t = engine.ByteTokenizer()
    c = str(tmp_path / "c")
    row = json.dumps({"prompt": "q", "completion": " a"}).encode() + b"\n"
    rows = D.tokenize_file(write(tmp_path / "b.jsonl", b"\xef\xbb\xbf" + row, "wb"), t, cache_dir=c)
    assert rows.n_examples == 1
    text = D.tokenize_file(write(tmp_path / "b.txt", b"\xef\xbb\xbfabc", "wb"), t, cache_dir=c)
    assert t.decode([int(i) for i in text.tokens[:3]]) == "abc"


def test_text_that_is_not_utf8_is_named_by_line_and_column(tmp_path):
    p = write(tmp_path / "latin1.txt", "first line\nCaf\xe9 cr\xe8me\n".encode("latin-1"), "wb")
    with pytest.raises(engine.InputError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        D.tokenize_file(p, engine.ByteTokenizer(), cache_dir=str(tmp_path / "c"))


def test_a_row_that_cannot_be_encoded_is_named(tmp_path):
    p = write(tmp_path / "s.jsonl", json.dumps({"prompt": "ok", "completion": " ok"}) + "\n\n"
              + '{"prompt": "cut \\ud83d", "completion": " x"}\n')
    with pytest.raises(engine.InputError, match=r"s.jsonl:3: .*lone surrogate"):
        D.tokenize_file(p, engine.ByteTokenizer(), cache_dir=str(tmp_path / "c"))


def test_eval_says_when_it_truncated(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    cfg = engine.Config.llama(vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=24,
                              max_seq_len=64)
    engine.Model(cfg, seed=0).save(str(tmp_path / "m"))
    engine.ByteTokenizer().save(str(tmp_path / "m"))
    p = write(tmp_path / "e.jsonl", "".join(json.dumps({"prompt": "q" * n, "completion": " answer"}) + "\n"
                                            for n in (5, 30)))
    assert cli(["eval", "--model", str(tmp_path / "m"), "--data", p, "--seq-len", "20"]) == 0
    assert "1 examples are longer than --seq-len 20 and were truncated" in capsys.readouterr().err


def _long_text():
    import argparse
    import inspect
    import textwrap
    return ("".join(inspect.getsource(m) for m in (argparse, textwrap)) * 2
            + "\n\n  trailing \n\n\n日本語 😀\nend")


class _Backend:
    """A `tokenizers.Tokenizer` with tailtune's encode signature."""

    def __init__(self, tk):
        self.tk = tk

    def encode(self, text, add_special_tokens=True):
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids


def test_long_text_in_pieces_gives_the_whole_texts_ids():
    """Byte-level BPE (SmolLM2's), bare and with a BOS + EOS post-processor: pieces cut after a
    lone newline give exactly the ids of one encode call."""
    from tokenizers.processors import TemplateProcessing
    smol = engine.load_tokenizer("smollm2")
    text = _long_text()
    assert np.array_equal(D.encode_text(smol, text, chunk=2000), smol.encode(text))
    tk = type(smol._tk).from_str(smol._tk.to_str())
    tk.post_processor = TemplateProcessing(single="<|im_start|> $A <|im_end|>",
                                           special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)])
    wrapped = _Backend(tk)
    want = wrapped.encode(text)
    assert want[0] == 1 and want[-1] == 2
    assert np.array_equal(D.encode_text(wrapped, text, chunk=2000), want)


def test_long_text_with_a_start_marking_tokenizer_is_encoded_whole():
    """A SentencePiece-style tokenizer (Metaspace: a word's start is part of its token) does not
    split at a newline; the cut check sees it and the text is encoded in one call."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    text = _long_text()
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
    wrapped = _Backend(tk)
    want = wrapped.encode(text)
    cut = next(i + 1 for i in range(2000, len(text))     # the first cut encode_text would make
               if text[i] == "\n" and not text[i - 1].isspace() and not text[i + 1].isspace())
    assert wrapped.encode(text[:cut]) + wrapped.encode(text[cut:]) != want   # pieces would differ
    assert np.array_equal(D.encode_text(wrapped, text, chunk=2000), want)


def test_jsonl_tokenization_memory_stays_near_the_arrays(tmp_path):
    """A JSONL file is read row by row and each example becomes arrays at once: Python-side
    peak memory stays a few bytes per token (lists of ints cost ~60 bytes a token)."""
    import tracemalloc
    rows = [{"prompt": f"claim {i}: " + "water damage to the roof " * 20, "completion": " route A " * 10}
            for i in range(1500)]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = engine.ByteTokenizer()
    tracemalloc.start()
    data = D.tokenize_file(str(f), tok, cache_dir=str(tmp_path / "c"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = len(data.tokens)
    assert n > 700_000
    assert peak / n < 20, f"{peak / n:.1f} bytes of Python memory per token"   # was 32
    assert data.tokens[:len("claim 0")].tolist() == list(b"claim 0")


def test_a_json_array_file_is_named_with_the_way_to_convert_it(tmp_path):
    """A .json export holding one array of rows (pretty-printed or on one line) is not JSONL:
    the error says so and gives a command that converts it, which works."""
    import subprocess
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    for name, text in (("pretty.json", json.dumps(rows, indent=2)), ("line.json", json.dumps(rows))):
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(engine.InputError, match="a JSON array; tailtune reads JSONL") as e:
            list(D.read_rows(str(p)))
    cmd = str(e.value).split("convert it with: ")[1][:-1]
    subprocess.run(cmd, shell=True, check=True, cwd=tmp_path)
    assert [r for _, r in D.read_rows(str(tmp_path / "data.jsonl"))] == rows


def test_an_unwritable_token_cache_keeps_the_tokens_in_memory(tmp_path, monkeypatch):
    """It is only a cache: a read-only home (or a file where the cache directory should be)
    gives the same tokens, with a note, not an error that stops `tailtune eval`."""
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("TAILTUNE_CACHE", str(blocked))
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello cache\n" * 20)
    notes = []
    tok = engine.ByteTokenizer()
    data = D.tokenize_file(str(text), tok, log=notes.append)
    assert np.array_equal(np.asarray(data.tokens), tok.encode(text.read_text()) + [256])
    assert any("kept in memory" in n and "TAILTUNE_CACHE" in n for n in notes)


def test_a_list_on_a_later_line_is_a_bad_row_not_a_json_array_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"prompt": "a", "completion": " b"}\n\n["x"]\n')
    with pytest.raises(engine.InputError, match=r"rows.jsonl:3: expected a JSON object, got list"):
        list(D.read_rows(str(p)))


def test_chatml_turns_train_through_im_end_but_not_the_newline_after_it(tmp_path):
    """SmolLM2's ChatML template writes "<|im_end|>\\n" after each turn; generation stops at
    <|im_end|>, so the newline is context, never a target (transformers' assistant-token mask
    leaves it out too). The ids stay those of the whole rendered conversation."""
    t = engine.load_tokenizer("smollm2")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]
    p = write(tmp_path / "c.jsonl", json.dumps({"messages": msgs}) + "\n")
    data = D.tokenize_file(p, t, cache_dir=str(tmp_path / "c"))
    assert t.decode([int(i) for i in data.tokens]) == t.chat_prompt(msgs, add_generation_prompt=False)
    assert trained_text(t, data) == "4<|im_end|>6, of course.<|im_end|>"
    ids, mask = np.asarray(data.tokens), np.asarray(data.mask)
    ends = np.flatnonzero((ids == t.eos_id) & (mask == 1))
    assert len(ends) == 2 and all(t.decode([int(ids[e + 1])]) == "\n" and mask[e + 1] == 0 for e in ends)


def test_a_stop_token_inside_an_answer_does_not_cut_its_turn(tmp_path):
    """A template that ends turns with a plain newline (no stop token) trains the whole turn,
    even when the answer mentions <|endoftext|>; with ChatML the mask still ends at the
    template's <|im_end|>, past one quoted in the answer."""
    plain = engine.ByteTokenizer(chat_template=(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"))
    answer = "It is <|endoftext|>, written after every document."
    msgs = [{"role": "user", "content": "Which token ends a document?"},
            {"role": "assistant", "content": answer}]
    p = write(tmp_path / "s.jsonl", json.dumps({"messages": msgs}) + "\n")
    assert trained_text(plain, D.tokenize_file(p, plain, cache_dir=str(tmp_path / "c"))) == answer + "\n"
    smol = engine.load_tokenizer("smollm2")
    quoted = [msgs[0], {"role": "assistant", "content": "Type <|im_end|> to stop."}]
    p = write(tmp_path / "q.jsonl", json.dumps({"messages": quoted}) + "\n")
    got = trained_text(smol, D.tokenize_file(p, smol, cache_dir=str(tmp_path / "c")))
    assert got == "Type <|im_end|> to stop.<|im_end|>"


def _tokenizer_adding(tmp_path, single):
    """SmolLM2's tokenizer without its chat template, <|endoftext|> as BOS and EOS, and a
    post-processor `single` (e.g. "$A:0 <|endoftext|>:0": one that appends EOS itself)."""
    from tokenizers import Tokenizer, processors
    d = tmp_path / "tok"
    engine.load_tokenizer("smollm2").save(str(d))
    e = "<|endoftext|>"
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg.update(bos_token=e, eos_token=e)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template*"):
        f.unlink()
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(e, tk.token_to_id(e))])
    tk.save(str(d / "tokenizer.json"))
    t = engine.load_tokenizer(str(d))
    assert not t.chat_template and t.encode("hi")[-1 if "$A:0 " in single else 0] == t.eos_id
    return t


@pytest.mark.parametrize("single", ["$A:0 <|endoftext|>:0", "<|endoftext|>:0 $A:0 <|endoftext|>:0",
                                    "<|endoftext|>:0 $A:0"])
def test_one_eos_whatever_the_tokenizer_adds_itself(tmp_path, single):
    """A text file ends in one EOS, and a prompt/completion row has none between prompt and
    completion, whether or not the tokenizer's post-processor appends one; a BOS it puts first
    stays first."""
    t = _tokenizer_adding(tmp_path, single)
    e = t.eos_id
    bos = [e] if single.startswith("<|endoftext|>") else []
    c = str(tmp_path / "c")
    text = D.tokenize_file(write(tmp_path / "d.txt", "doc one\n"), t, cache_dir=c)
    assert [int(i) for i in text.tokens] == bos + t.encode("doc one\n", add_special_tokens=False) + [e]
    rows = D.tokenize_file(write(tmp_path / "r.jsonl", json.dumps({"prompt": "Q?", "completion": " A"}) + "\n"),
                           t, cache_dir=c)
    p, a = t.encode("Q?", add_special_tokens=False), t.encode(" A", add_special_tokens=False)
    assert [int(i) for i in rows.tokens] == bos + p + a + [e]
    assert [int(m) for m in rows.mask] == [0] * (len(bos) + len(p)) + [1] * (len(a) + 1)


def test_text_line_ends_are_read_as_in_python_text_mode(tmp_path):
    """Windows (CRLF) and old Mac (CR) line ends become "\\n", as open(path).read() gives them:
    the same tokens as the LF file."""
    t = engine.load_tokenizer("smollm2")
    c = str(tmp_path / "c")
    lf = D.tokenize_file(write(tmp_path / "lf.txt", b"line one\nline two\n", "wb"), t, cache_dir=c)
    for name, raw in (("crlf", b"line one\r\nline two\r\n"), ("cr", b"line one\rline two\r")):
        other = D.tokenize_file(write(tmp_path / f"{name}.txt", raw, "wb"), t, cache_dir=c)
        assert np.array_equal(other.tokens, lf.tokens), name


def test_a_file_that_changes_while_it_is_tokenized_is_not_cached_under_the_old_key(tmp_path):
    """The cache key hashes the bytes before tokenizing; a file rewritten meanwhile (still being
    written by another program) is refused, and nothing is stored under the old bytes' key: the
    old content, tokenized later, gets its own tokens."""
    t = engine.load_tokenizer("smollm2")
    p = tmp_path / "race.jsonl"
    a = json.dumps({"prompt": "colour?", "completion": "red"}) + "\n"
    b = json.dumps({"prompt": "colour?", "completion": "blue and green"}) + "\n"
    p.write_text(a)

    def log(msg):   # runs between the hash and the tokenizer's read
        if msg.startswith("tokenizing"):
            p.write_text(b)
    c = str(tmp_path / "c")
    with pytest.raises(engine.InputError, match="changed while it was being tokenized"):
        D.tokenize_file(str(p), t, cache_dir=c, log=log)
    p.write_text(a)
    assert trained_text(t, D.tokenize_file(str(p), t, cache_dir=c)).startswith("red")


def test_a_token_cache_write_cut_short_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while the cache is written: the tokens are kept in memory with a note, and
    the half-written temporary file is removed (each failed run used to leave one, filling the
    disk further)."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello cache\n" * 20)
    real = np.save

    def full_disk(path, a, *args, **kw):
        if "mask" in str(path):
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
            raise OSError(28, "No space left on device")
        return real(path, a, *args, **kw)
    monkeypatch.setattr(D.np, "save", full_disk)
    notes = []
    tok = engine.ByteTokenizer()
    data = D.tokenize_file(str(text), tok, log=notes.append)
    assert np.array_equal(np.asarray(data.tokens), tok.encode(text.read_text()) + [256])
    assert any("No space left on device" in n for n in notes)
    left = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert not any(".tmp" in f for f in left), left


def test_eval_stride_scores_each_token_with_a_sliding_windows_context(tmp_path, capsys):
    """`eval --stride S`: windows of T start every S tokens and each scores only what the one
    before did not, so a target j > T is predicted from the tokens since S * ceil((j - T) / S)
    (transformers' sliding-window perplexity). The reference runs the model once per target
    on exactly that context."""
    from engine.trainer import evaluate
    cfg = engine.Config.llama(vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, d_model=16,
                              d_ff=24, max_seq_len=32)
    m = engine.Model(cfg, seed=1)
    m.save(str(tmp_path / "m"))
    tok = engine.ByteTokenizer()
    tok.save(str(tmp_path / "m"))
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog; " * 3)
    data = D.tokenize_file(str(tmp_path / "t.txt"), tok, cache_dir=str(tmp_path / "c"))
    ids, T = np.asarray(data.tokens), 16
    for S in (1, 5, 16):
        ex = D.Examples(data, T, stride=S)
        assert ex.targets().sum() == len(ids) - 1           # every target once
        got = evaluate(m, ex, np.arange(len(ex)), 3, 0)
        want = []
        for j in range(1, len(ids)):
            a = 0 if j <= T else S * -(-(j - T) // S)
            z = m.forward(ids[None, a:j])[0, -1].astype(np.float64)
            want.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[j]])
        assert got == pytest.approx(np.mean(want), rel=1e-5), S
    assert cli(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                "--seq-len", "16", "--stride", "5", "--batch-size", "3"]) == 0
    ex = D.Examples(data, T, stride=5)
    assert f"loss {evaluate(m, ex, np.arange(len(ex)), 3, 0):.4f}" in capsys.readouterr().out
    assert cli(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"),
                "--seq-len", "16", "--stride", "17"]) == 2
    assert "--stride 17: must be in 1..--seq-len 16" in capsys.readouterr().err
