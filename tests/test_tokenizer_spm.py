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


def test_ids_and_text_match_sentencepiece(sp, spm_file):
    tok = engine.load_tokenizer(spm_file)
    assert tok.vocab_size == sp.get_piece_size()
    n = 0
    for text in _texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text[:80]
        assert tok.decode(ids) == sp.decode(ids), text[:80]
        n += len(ids)
    assert n > 20_000
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
    import gguf
    meta = read_metadata(path)
    out = tmp_path / "edited.gguf"
    w = gguf.GGUFWriter(str(out), arch="llama")
    for k, v in {**meta, **replace}.items():
        if k in drop or k.startswith("general.") or k.startswith("GGUF."):
            continue
        if isinstance(v, np.ndarray):
            sub = gguf.GGUFValueType.FLOAT32 if v.dtype.kind == "f" else gguf.GGUFValueType.INT32
            w.add_key_value(k, v.tolist(), gguf.GGUFValueType.ARRAY, sub_type=sub)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        else:
            w.add_uint32(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


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
    tok.save(tmp_path / "hf")
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": "first", "split": False}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec))
    meta_tok = engine.load_tokenizer(tmp_path / "hf")
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
    tok = engine.load_tokenizer(spm_file)
    if metaspace:
        tok.save(tmp_path / "hf")
        spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
        spec["normalizer"] = None
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                                 "prepend_scheme": "first", "split": False}
        (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(spec))
        tok = engine.load_tokenizer(tmp_path / "hf")
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
