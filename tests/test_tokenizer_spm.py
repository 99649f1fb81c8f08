"""SentencePiece ("llama") GGUF vocabularies: read (engine/tokenizer.py, engine/spm_vocab.py),
saved as a Hugging Face tokenizer, and written back into a GGUF model. The references: the
sentencepiece library on a model it trained itself (tests/spm_fixtures.py), transformers (on
the saved tokenizer.json, and its own GGUF loader where that agrees with llama.cpp), and
llama.cpp's rules as llama-vocab.cpp states them (a space before the text after a special
token; ids 1 / 2 / 0 and BOS by default)."""
import json

import numpy as np
import pytest
import transformers

import engine
import engine.data as D
from engine.io.gguf import read_metadata
from engine.tokenizer import TokenizerError

import spm_fixtures as S
import tokenizer_corpus as C


@pytest.fixture(scope="module")
def sp():
    return S.train()


@pytest.fixture(scope="module")
def spm_file(sp, tmp_path_factory):
    return S.write(tmp_path_factory.mktemp("spm") / "t.gguf", sp)


def _texts() -> list[str]:
    """The corpus, and the first lines of each text on their own (indented lines start with
    spaces)."""
    out = []
    for t in C.ALL:
        out += [t] + t.splitlines()[:30]
    return out


def _edited_json(spm_file, tmp_path, edit):
    """The SentencePiece GGUF tokenizer saved as tokenizer.json, edited, loaded again."""
    engine.load_tokenizer(spm_file).save(tmp_path / "e")
    spec = json.loads((tmp_path / "e" / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / "e" / "tokenizer.json").write_text(json.dumps(spec))
    return engine.load_tokenizer(tmp_path / "e")


def _to_metaspace(spec):
    """The space prefix written by Metaspace (prepend_scheme "first": none after a special
    token), as recent transformers saves Llama-family tokenizers, instead of a normalizer."""
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "first", "split": False}


def _assert_as_sentencepiece(tok, sp):
    """sentencepiece's ids and text over the corpus (more than 20k tokens)."""
    n = 0
    for text in _texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text[:80]
        assert tok.decode(ids) == sp.decode(ids), text[:80]
        n += len(ids)
    assert n > 20_000


def test_ids_and_text_match_sentencepiece(sp, spm_file):
    tok = engine.load_tokenizer(spm_file)
    assert tok.vocab_size == sp.get_piece_size()
    _assert_as_sentencepiece(tok, sp)
    byte_ids = {sp.piece_to_id(f"<0x{b:02X}>") for b in "🎉".encode()}
    assert byte_ids <= set(tok.encode("🎉", add_special_tokens=False))   # byte fallback
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.encode("x") == [sp.bos_id()] + sp.encode("x")   # llama.cpp adds BOS by default


def test_text_after_special_and_user_tokens_is_prefixed_as_llamacpp_does(sp, spm_file):
    """llama.cpp tokenizes each stretch of text after a control or user-defined token as if it
    began the input (is_prev_special); the tokens themselves are matched whole."""
    tok = engine.load_tokenizer(spm_file)
    tool = sp.piece_to_id(S.USER_TOKEN)
    assert tok.encode("a b</s>c d", add_special_tokens=False) == (
        sp.encode("a b") + [sp.eos_id()] + sp.encode("c d"))
    assert tok.encode(f"x{S.USER_TOKEN}  y", add_special_tokens=False) == (
        sp.encode("x") + [tool] + sp.encode("  y"))
    assert tok.encode("", add_special_tokens=False) == []
    assert tok.encode("") == [sp.bos_id()]
    # the prefixed space is part of the token after </s> (llama.cpp decodes " c" too)
    assert tok.decode(tok.encode("a b</s>c"), skip_special_tokens=True) == "a b c"


def test_without_a_space_prefix(sp, tmp_path):
    """tokenizer.ggml.add_space_prefix = false: the text is taken as it is, so " " + text gives
    what sentencepiece (which always prefixes) gives for text."""
    tok = engine.load_tokenizer(S.write(tmp_path / "p.gguf", sp, add_space_prefix=False))
    for text in C.PROSE + C.SCRIPTS + C.PYTHON[:1]:
        assert tok.encode(" " + text, add_special_tokens=False) == sp.encode(text), text[:80]
    assert tok.encode("x", add_special_tokens=False) != sp.encode("x")
    assert tok.decode(tok.encode(" two  spaces", add_special_tokens=False)) == " two  spaces"


def test_llamacpp_defaults_when_the_file_names_no_ids(sp, tmp_path):
    tok = engine.load_tokenizer(S.write(tmp_path / "d.gguf", sp, ids=False))
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.encode("hi")[0] == 1


def test_saved_tokenizer_is_the_same_in_transformers(sp, spm_file, tmp_path):
    tok = engine.load_tokenizer(spm_file)
    tok.save(tmp_path / "hf")
    again = engine.load_tokenizer(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in _texts()[:200] + ["a b</s>c d", f"x{S.USER_TOKEN}  y", "  lead"]:
        ids = tok.encode(text)
        assert again.encode(text) == ref.encode(text) == ids, text[:80]
        assert ref.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_transformers_gguf_loader_agrees_except_on_leading_spaces(sp, spm_file):
    """transformers builds a GGUF SentencePiece vocabulary with Metaspace, which does not
    prefix a text that already starts with a space; llama.cpp (and sentencepiece, and we) do.
    Everywhere else the ids are the same."""
    import os
    tok = engine.load_tokenizer(spm_file)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_file),
                                                     gguf_file=os.path.basename(spm_file))
    same = 0
    for text in _texts():
        if text[:1].isspace():
            continue
        assert ref.encode(text) == tok.encode(text), text[:80]
        same += 1
    assert same > 150


def test_long_texts_are_encoded_as_one(spm_file):
    """The data pipeline cuts a long text at newlines only where the pieces' ids equal the
    whole's; a tokenizer that prefixes each piece with a space would differ at every cut."""
    tok = engine.load_tokenizer(spm_file)
    text = "\n".join(t for t in _texts() if t.strip())
    assert len(text) > 50_000
    np.testing.assert_array_equal(D.encode_text(tok, text, chunk=2000), tok.encode(text))


def _gguf_without(path, tmp_path, drop=(), **replace):
    """A copy of the GGUF tokenizer file at `path` with keys dropped or replaced."""
    from gguf_fixtures import write_gguf
    meta = {k: v for k, v in {**read_metadata(path), **replace}.items()
            if k not in drop and not k.startswith(("general.", "GGUF."))}
    return write_gguf(tmp_path / "edited.gguf", "llama", meta, {})


def test_bad_files_are_named(spm_file, tmp_path):
    scores = read_metadata(spm_file)["tokenizer.ggml.scores"]
    with pytest.raises(TokenizerError, match="without tokenizer.ggml.scores"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path, drop=("tokenizer.ggml.scores",)))
    bad = scores.copy()
    bad[7] = np.nan
    with pytest.raises(TokenizerError, match="NaN or infinite"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path, **{"tokenizer.ggml.scores": bad}))
    with pytest.raises(TokenizerError, match=r"scores must be an array of numbers of \d+ elements"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path,
                                            **{"tokenizer.ggml.scores": scores[:-1]}))
    with pytest.raises(TokenizerError, match="lacks tokenizer.ggml.tokens"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path, drop=("tokenizer.ggml.tokens",)))
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path,
                                            **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(TokenizerError, match="lacks tokenizer.ggml.merges"):
        engine.load_tokenizer(_gguf_without(spm_file, tmp_path,
                                            **{"tokenizer.ggml.model": "gpt2",
                                               "tokenizer.ggml.pre": "gpt-2"}))


# ---- written back into a GGUF model --------------------------------------------------------

def _model(vocab):
    cfg = engine.Config.llama(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                              d_ff=48, max_seq_len=64)
    return engine.Model(cfg, seed=0)


def _mergeable_order(meta) -> np.ndarray:
    """Ids of the normal tokens of two or more characters, best score first: the order in
    which llama.cpp merges (ties would merge leftmost first; sentencepiece's scores have none)."""
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    ids = np.array([i for i, t in enumerate(tokens) if types[i] == 1 and len(t) > 1])
    assert len(np.unique(scores[ids])) == len(ids)
    return ids[np.argsort(-scores[ids], kind="stable")]


@pytest.mark.parametrize("via_hf_dir", [False, True])
def test_gguf_export_round_trip(sp, spm_file, tmp_path, via_hf_dir):
    """The tokenizer read from a GGUF file, or from the tokenizer.json it was saved as, is
    written as the same "llama" vocabulary: tokens, types, special ids and flags equal the
    source's, the scores rank the tokens in the source's order (the scores themselves come
    from merge ranks), and the written file tokenizes as the source does."""
    tok = engine.load_tokenizer(spm_file)
    if via_hf_dir:
        tok.save(tmp_path / "hf")
        tok = engine.load_tokenizer(tmp_path / "hf")
    out = str(tmp_path / "m.gguf")
    _model(sp.get_piece_size() + 8).save(out, tokenizer=tok)
    src, got = read_metadata(spm_file), read_metadata(out)
    n = sp.get_piece_size()
    assert got["tokenizer.ggml.model"] == "llama"
    assert got["tokenizer.ggml.tokens"] == src["tokenizer.ggml.tokens"] + [
        f"[PAD{i}]" for i in range(n, n + 8)]
    np.testing.assert_array_equal(got["tokenizer.ggml.token_type"][:n], src["tokenizer.ggml.token_type"])
    assert (got["tokenizer.ggml.token_type"][n:] == 5).all()
    for k in ("bos_token_id", "eos_token_id", "unknown_token_id"):
        assert got[f"tokenizer.ggml.{k}"] == src[f"tokenizer.ggml.{k}"]
    assert got["tokenizer.ggml.add_space_prefix"] is True
    assert (got["tokenizer.ggml.add_bos_token"], got["tokenizer.ggml.add_eos_token"]) == (True, False)
    np.testing.assert_array_equal(_mergeable_order({**got, "tokenizer.ggml.tokens":
                                                    got["tokenizer.ggml.tokens"][:n]}),
                                  _mergeable_order(src))
    back = engine.load_tokenizer(out)
    for text in _texts()[:120]:
        assert back.encode(text) == [sp.bos_id()] + sp.encode(text), text[:80]


def test_gguf_export_without_space_prefix(sp, tmp_path):
    tok = engine.load_tokenizer(S.write(tmp_path / "p.gguf", sp, add_space_prefix=False))
    out = str(tmp_path / "m.gguf")
    _model(sp.get_piece_size()).save(out, tokenizer=tok)
    assert read_metadata(out)["tokenizer.ggml.add_space_prefix"] is False
    back = engine.load_tokenizer(out)
    assert back.encode(" a b", add_special_tokens=False) == sp.encode("a b")


def test_metaspace_tokenizers_are_refused_for_gguf(sp, spm_file, tmp_path):
    """A tokenizer.json that writes the prefix with Metaspace (prepend_scheme "first": none
    after a special token) would tokenize differently in llama.cpp: refused, nothing written."""
    tok = engine.load_tokenizer(spm_file)
    meta_tok = _edited_json(spm_file, tmp_path, _to_metaspace)
    assert meta_tok.encode("a</s>b") != tok.encode("a</s>b")   # the difference itself
    out = tmp_path / "m.gguf"
    with pytest.raises(TokenizerError, match="SentencePiece-style BPE.*Metaspace"):
        _model(sp.get_piece_size()).save(str(out), tokenizer=meta_tok)
    assert not out.exists()


# ---- training data: a completion continues its prompt -------------------------------------

ROWS = [{"prompt": "Claim: water damage to the roof after the storm.", "completion": " Route A"},
        {"prompt": "Is the quick brown fox lazy?", "completion": " No, the dog is."},
        {"prompt": "机器学习是什么？", "completion": "人工智能的一个分支。"}]


def test_prompt_completion_rows_are_the_joined_texts_ids(sp, spm_file):
    """A completion is tokenized as it continues its prompt: the row's ids are sentencepiece's
    for prompt + completion (a second space prefix before the completion would teach the model
    tokens it never sees at inference), the loss on the completion and the EOS."""
    tok = engine.load_tokenizer(spm_file)
    data = D.from_rows(tok, ROWS, use_template=False)
    for i, row in enumerate(ROWS):
        ids, mask = data.example(i)
        n_prompt = 1 + len(sp.encode(row["prompt"]))
        assert ids.tolist() == [sp.bos_id()] + sp.encode(row["prompt"] + row["completion"]) + [
            sp.eos_id()], row
        assert mask.tolist() == [0] * n_prompt + [1] * (len(ids) - n_prompt)


CHAT = "{% for m in messages %}{% if m.role == 'user' %}<s>[INST] {{ m.content }} [/INST]" \
       "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}"


@pytest.mark.parametrize("metaspace", [False, True])
def test_chat_turns_are_the_rendered_conversations_ids(spm_file, tmp_path, metaspace):
    """Each turn is tokenized as it continues the conversation before it, so the ids of a
    conversation are those of its rendering encoded whole: for llama.cpp's rule (a space
    before the text after a special token) and for Metaspace's "first" scheme (none there)."""
    tok = (_edited_json(spm_file, tmp_path, _to_metaspace) if metaspace
           else engine.load_tokenizer(spm_file))
    tok.chat_template = CHAT
    msgs = [{"role": "user", "content": "Is the roof covered?"},
            {"role": "assistant", "content": "Yes, water damage is."},
            {"role": "user", "content": "And the fox?"},
            {"role": "assistant", "content": "No."}]
    ids, mask = D.from_rows(tok, [{"messages": msgs}]).example(0)
    whole = tok.encode(tok.chat_prompt(msgs, add_generation_prompt=False),
                       add_special_tokens=False)
    assert ids.tolist() == whole
    assert tok.decode(ids[mask == 1]) == "Yes, water damage is.</s> No.</s>"
    rows = D.from_rows(tok, ROWS, use_template=False)
    for i, row in enumerate(ROWS):
        got = rows.example(i)[0].tolist()
        assert got == tok.encode(row["prompt"] + row["completion"]) + [tok.eos_id], row


def test_finetune_a_sentencepiece_gguf_model_and_export_it(sp, spm_file, tmp_path):
    """The workflow on a Llama GGUF with a SentencePiece vocabulary (as Llama 2 / TinyLlama
    files are): fine-tune its last block on prompt / completion rows, then export the run's
    model to GGUF. The run's tokenizer.json gives transformers sentencepiece's ids, and the
    GGUF file holds the tuned weights and a vocabulary that tokenizes as the source does."""
    from engine.cli import main as cli
    src = str(tmp_path / "src.gguf")
    _model(sp.get_piece_size()).save(src, tokenizer=engine.load_tokenizer(spm_file))
    rows = tmp_path / "rows.jsonl"
    rng = np.random.default_rng(0)
    with open(rows, "w") as f:
        for i in range(200):
            row = ROWS[i % len(ROWS)]
            f.write(json.dumps({"prompt": f"{row['prompt']} #{rng.integers(100)}",
                                "completion": row["completion"]}) + "\n")
    out = str(tmp_path / "run")
    assert cli(["finetune", "--model", src, "--data", str(rows), "--out", out,
                "--train-last", "1", "--steps", "12", "--batch-size", "8", "--seq-len", "40",
                "--lr", "3e-3", "--sample-tokens", "0"]) == 0
    s = json.load(open(f"{out}/summary.json"))
    assert s["eval_loss_after"] < s["eval_loss_before"]
    ref = transformers.AutoTokenizer.from_pretrained(f"{out}/model")
    for text in _texts()[:60]:
        assert ref.encode(text) == [sp.bos_id()] + sp.encode(text), text[:80]
    assert cli(["export", "--model", f"{out}/model", "--out", f"{out}/m.gguf"]) == 0
    tuned, exported = engine.load(f"{out}/model"), engine.load(f"{out}/m.gguf")
    for n, a in tuned.params.items():
        np.testing.assert_array_equal(exported.params[n], a, err_msg=n)
    back = engine.load_tokenizer(f"{out}/m.gguf")
    assert back.encode(ROWS[0]["prompt"]) == [sp.bos_id()] + sp.encode(ROWS[0]["prompt"])


# ---- llama.cpp's algorithm, written plainly, on random vocabularies -------------------------

def test_random_vocabularies_tokenize_as_llamacpp():
    """Vocabularies of random pieces over a small alphabet (so that merges compete), unique
    scores, byte tokens, a character with no token of its own (byte fallback) and
    user-defined whitespace tokens that merges build (Gemma has such): the ids equal llama.cpp's
    algorithm's (spm_fixtures.llamacpp_tokenize) on random texts."""
    import tokenizers
    from engine.spm_vocab import spm_backend
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", "\u2581", "\u00e9"]   # é has no token: its two bytes stand in
    n_texts = 0
    for _ in range(150):
        pieces = {"a", "b", "\u2581"}
        while len(pieces) < 3 + rng.integers(5, 40):
            pieces.add("".join(rng.choice(alphabet[:3], rng.integers(2, 6))))
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + sorted(pieces)
        kinds = [2, 3, 3] + [6] * 256 + [4 if set(t) == {"\u2581"} and len(t) > 1 else 1
                                         for t in sorted(pieces)]
        scores = np.zeros(len(tokens), np.float32)
        # unique scores (ties merge leftmost first in llama.cpp, by id here: spm_vocab.py)
        scores[259:] = -rng.permutation(len(tokens) - 259).astype(np.float32)
        prefix = bool(rng.integers(2))
        backend = spm_backend(tokenizers, tokens, scores, kinds, "<unk>", prefix)
        for _ in range(20):
            text = "".join(rng.choice(["a", "b", " ", "\u00e9"], rng.integers(0, 16)))
            want = S.llamacpp_tokenize(tokens, scores, text, prefix) if text else []
            assert backend.encode(text, add_special_tokens=False).ids == want, (tokens[259:], text)
            n_texts += 1
    assert n_texts == 3000


def test_whitespace_tokens_are_built_from_spaces(sp, tmp_path):
    """A user-defined token of spaces (as Gemma's vocabulary has: "▁▁▁▁" ...) is built by
    merges from the text's spaces, as llama.cpp builds it."""
    import gguf
    tokens, scores, types = S.vocabulary(sp)
    n = next(n for n in range(4, 64) if "\u2581" * n not in tokens)   # a run it lacks
    tokens, scores, types = tokens + ["\u2581" * n], scores + [0.0], types + [4]
    w = gguf.GGUFWriter(str(tmp_path / "w.gguf"), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = engine.load_tokenizer(tmp_path / "w.gguf")
    texts = [f"a{' ' * n}b", " " * (n - 1) + "a", f"x{' ' * 2 * n}y",
             "def f():\n" + " " * n + "return 1", "a" + " " * n, "\n" + " " * n + "x"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == S.llamacpp_tokenize(
            tokens, scores, text), text
    assert any(len(tokens) - 1 in tok.encode(t) for t in texts)   # built, somewhere


def test_a_vocabulary_too_long_to_merge_is_refused_quickly(tmp_path):
    """Tokens "a", "aa", ... (a file of ~2 MB) would make 2 million merges of up to 2000
    characters: refused before any is built."""
    import gguf
    import time
    tokens = ["<unk>", "<s>", "</s>"] + ["a" * k for k in range(1, 2001)]
    w = gguf.GGUFWriter(str(tmp_path / "long.gguf"), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = time.perf_counter()
    with pytest.raises(TokenizerError, match="too long for a SentencePiece vocabulary"):
        engine.load_tokenizer(tmp_path / "long.gguf")
    assert time.perf_counter() - t < 30   # not a timing test: minutes and GBs without the bound


def test_special_ids_as_llamacpp_reads_them(sp, tmp_path):
    """An id past the vocabulary falls back to llama.cpp's default (bos 1); an id of a normal
    token marks it without making it a token matched in the text; a non-integer is refused."""
    a_id = sp.piece_to_id("\u2581a")
    tok = engine.load_tokenizer(_gguf_without(S.write(tmp_path / "s.gguf", sp), tmp_path, **{
        "tokenizer.ggml.bos_token_id": 5000, "tokenizer.ggml.unknown_token_id": a_id}))
    assert tok.bos_id == 1 and tok.encode("x")[0] == 1
    assert tok.unk_id == a_id
    assert tok.encode(" a ab", add_special_tokens=False) == sp.encode(" a ab")
    with pytest.raises(TokenizerError, match="eos_token_id must be a token id"):
        engine.load_tokenizer(_gguf_without(S.write(tmp_path / "t.gguf", sp), tmp_path,
                                            **{"tokenizer.ggml.eos_token_id": "2"}))


def test_tokenizers_llamacpp_would_merge_otherwise_are_refused(sp, spm_file, tmp_path):
    """llama.cpp merges every split of a token into two tokens, and matches added tokens in
    the text as written: a tokenizer.json whose merges leave a split out, or whose added
    token is matched in the normalized text, is refused for GGUF, nothing written."""
    def drop_a_split(spec):
        merges = spec["model"]["merges"]
        joined = ["".join(m) for m in merges]
        t = next(t for t in joined if joined.count(t) > 1)
        merges.pop(joined.index(t))

    def normalized(spec):
        spec["added_tokens"][-1]["normalized"] = True

    out = tmp_path / "m.gguf"
    for edit, match in ((drop_a_split, "from 1 of its 2 splits|of its \\d+ splits"),
                        (normalized, "normalized text")):
        tok = _edited_json(spm_file, tmp_path, edit)
        with pytest.raises(TokenizerError, match=match):
            _model(sp.get_piece_size()).save(str(out), tokenizer=tok)
        assert not out.exists()


def test_unused_tokens_stay_unused_in_the_export(sp, spm_file, tmp_path):
    """llama.cpp decodes an unused token (type 5) to nothing: a GGUF source's unused tokens
    are written unused again."""
    types = read_metadata(spm_file)["tokenizer.ggml.token_type"].copy()
    unused = [sp.piece_to_id(p) for p in ("\u2581the", "\u2581a")]
    types[unused] = 5
    src = _gguf_without(spm_file, tmp_path, **{"tokenizer.ggml.token_type": types})
    out = str(tmp_path / "m.gguf")
    _model(sp.get_piece_size()).save(out, tokenizer=engine.load_tokenizer(src))
    np.testing.assert_array_equal(read_metadata(out)["tokenizer.ggml.token_type"], types)


def test_a_reply_is_printed_after_its_prompt(spm_file, tmp_path):
    """SentencePiece's decoder drops a text's first space; a reply decoded after its prompt
    keeps its own ("Yes" + " no" prints "Yes no", not "Yesno")."""
    tok = engine.load_tokenizer(spm_file)
    prompt, reply = tok.encode("Yes"), tok.encode_continuation(" no, the fox", "Yes")
    assert tok.decode(reply) == "no, the fox"
    assert tok.decode_continuation(reply, prompt) == " no, the fox"
    assert tok.decode_continuation(reply, []) == "no, the fox"
    for t in (engine.ByteTokenizer(), engine.load_tokenizer("smollm2")):
        ids = t.encode(" no, the fox", add_special_tokens=False)
        assert t.decode_continuation(ids, t.encode("Yes")) == " no, the fox"


def test_continuations_of_other_tokenizers(tmp_path):
    """The joined encoding decides wherever no token spans the join: a byte-level BPE that
    prefixes a space (add_prefix_space) gives "yes" after "Question:", not " yes"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import tokenizer_corpus as C
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(C.PROSE * 5, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = engine.load_tokenizer(tmp_path)
    for prev, text in (("Question:", "yes"), ("Is the fox lazy?", " No."), ("a", " b c")):
        whole = tok.encode(prev + text, add_special_tokens=False)
        assert tok.encode(prev, add_special_tokens=False) + tok.encode_continuation(
            text, prev) == whole, (prev, text)
    with pytest.raises(engine.InputError, match="expects a str"):
        tok.encode_continuation("a", 5)


# ---- real vocabularies ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
def test_real_mistral_vocabularies(tmp_path, name):
    """Mistral 7B's vocabulary (Llama 2's kind) and its v3 one with 750 control tokens, written
    as llama.cpp's converter writes them: sentencepiece's ids and text, control tokens in the
    text matched whole ([INST] ... [/INST], as llama.cpp does), and the GGUF export tokenizes
    the same."""
    sp = S.mistral_vocabulary(name)
    tok = engine.load_tokenizer(S.write(tmp_path / "m.gguf", sp))
    assert tok.vocab_size == sp.get_piece_size() >= 32000
    _assert_as_sentencepiece(tok, sp)
    chat = "[INST] Is the roof covered? [/INST] Yes.</s>"
    inst = sp.piece_to_id("[INST]")
    if inst != sp.unk_id():   # v3: [INST] and [/INST] are control tokens; the text between
        # is tokenized as if it began the input, spaces and all (llama.cpp)
        assert tok.encode(chat, add_special_tokens=False) == (
            [inst] + sp.encode(" Is the roof covered? ") + [sp.piece_to_id("[/INST]")]
            + sp.encode(" Yes.") + [sp.eos_id()])
    out = str(tmp_path / "e.gguf")
    _model(sp.get_piece_size()).save(out, tokenizer=tok)
    back = engine.load_tokenizer(out)
    for text in _texts()[::7] + [chat]:
        assert back.encode(text) == tok.encode(text), text[:80]


# ---- Phi-3: llama.cpp strips the whitespace after its special tokens, by the model's name ----

PHI3_TOKENS = ("<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>")


def test_phi3_named_files_strip_the_whitespace_after_special_tokens(sp, tmp_path):
    """llama.cpp gives a file whose general.name says Phi-3 its RSTRIP rule (llama-vocab.cpp):
    the whitespace after a control token but <s>, <unk>, <|endoftext|> is part of it. Read so,
    saved as a tokenizer.json transformers agrees with, and written back (with a name that
    says Phi-3) to the same ids; a file named so that lacks the rule's tokens is refused."""
    tok = engine.load_tokenizer(S.write(tmp_path / "p.gguf", sp, name="Phi-3 mini",
                                        control=PHI3_TOKENS))
    user, end, assistant, eot = (tok.token_to_id(t) for t in ("<|user|>", "<|end|>",
                                                               "<|assistant|>", "<|endoftext|>"))
    chat = "<|user|>\n Is the roof covered?<|end|>\n<|assistant|>\nYes."
    assert tok.encode(chat, add_special_tokens=False) == (
        [user] + sp.encode("Is the roof covered?") + [end, assistant] + sp.encode("Yes."))
    assert tok.encode("<|endoftext|> x</s>  y", add_special_tokens=False) == (
        [eot] + sp.encode(" x") + [sp.eos_id()] + sp.encode("y"))
    plain = engine.load_tokenizer(S.write(tmp_path / "q.gguf", sp, control=PHI3_TOKENS))
    assert plain.encode(chat, add_special_tokens=False)[1:3] != sp.encode("Is")[:2]   # kept
    tok.save(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ref.encode(chat) == tok.encode(chat)
    model = _model(tok.vocab_size)
    for name, want in (("claims.gguf", "Phi-3 claims"), ("phi3-claims.gguf", "phi3-claims")):
        model.save(str(tmp_path / name), tokenizer=engine.load_tokenizer(tmp_path / "hf"))
        assert read_metadata(tmp_path / name)["general.name"] == want
        back = engine.load_tokenizer(tmp_path / name)
        assert back.encode(chat) == tok.encode(chat)
    with pytest.raises(TokenizerError, match="makes llama.cpp treat the vocabulary as Phi-3"):
        model.save(str(tmp_path / "phi3-plain.gguf"), tokenizer=plain)
    with pytest.raises(TokenizerError, match="lacks one of </s>, <unk>, <s>, <\\|endoftext"):
        engine.load_tokenizer(S.write(tmp_path / "r.gguf", sp, name="phi3"))
