"""Training data: chat loss masks, the token cache's key, text windows, encodings, and errors
that name the row."""
import json

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
