"""A real SentencePiece BPE model (trained here by the `sentencepiece` library, as Llama's
tokenizer.model was) and the GGUF "llama" vocabulary llama.cpp's converter would write from it.
The library is the reference for tests/test_tokenizer_spm.py: independent of engine/spm_vocab.py
and of the tokenizers library that runs our tokenizer."""
from __future__ import annotations

import gguf
import sentencepiece

import tokenizer_corpus as C

USER_TOKEN = "<tool>"


def mistral_vocabulary(name: str) -> sentencepiece.SentencePieceProcessor:
    """A real SentencePiece model: Mistral's, as the mistral-common package ships it
    (tokenizer.model.v1 is Mistral 7B's, Llama 2's kind: 32000 pieces, byte fallback; the v3
    one adds 750 control tokens such as [INST]). Fails, not skips, when it is missing."""
    import importlib.util
    import os
    import pytest
    spec = importlib.util.find_spec("mistral_common")   # not imported: it needs other packages
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", name)
    if not path or not os.path.isfile(path):
        pytest.fail("Mistral's vocabularies are not installed: run `pip install --no-deps "
                    "mistral-common` (the README's test command does)")
    return sentencepiece.SentencePieceProcessor(model_file=path)


def train(add_dummy_prefix: bool = True) -> sentencepiece.SentencePieceProcessor:
    """Llama's settings: BPE, byte fallback, digits split, no normalization, spaces kept."""
    import io
    text = "\n".join(C.PYTHON + C.PROSE * 3 + C.SCRIPTS * 3 + C.EMOJI)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, model_type="bpe",
        vocab_size=1200, byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, split_digits=True, user_defined_symbols=[USER_TOKEN],
        allow_whitespace_only_pieces=True, max_sentence_length=100_000, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def vocabulary(sp) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types, as convert_hf_to_gguf.py's
    _create_vocab_sentencepiece makes them."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]

    def kind(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 4 if tokens[i] == USER_TOKEN else 1
    return tokens, scores, [kind(i) for i in range(n)]


def write(path, sp, *, scores=True, ids=True, add_space_prefix=None, name=None, control=(),
          **extra) -> str:
    """The vocabulary as a GGUF file's tokenizer.ggml.* keys (no tensors). `ids=False` leaves
    out the bos / eos / unknown ids (llama.cpp then takes 1 / 2 / 0); `control`: more control
    tokens, added at the end (as Phi-3's <|user|> ...); `name`: general.name."""
    tokens, score, types = vocabulary(sp)
    tokens, score, types = tokens + list(control), score + [0.0] * len(control), types + [3] * len(control)
    w = gguf.GGUFWriter(str(path), arch="llama")
    if name is not None:
        w.add_name(name)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores(score)
    w.add_token_types(types)
    if ids:
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    for k, v in extra.items():
        w.add_string(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llamacpp_tokenize(tokens, scores, text: str, add_space_prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenization (llm_tokenizer_spm in llama-vocab.cpp) of a text
    with no special tokens in it, written plainly: spaces as "▁" (one prefixed), then merge the
    adjacent pair whose join is the best-scoring token, leftmost among equals, until none
    joins into a token; a symbol that is no token becomes its bytes' <0xXX> tokens. Any type
    of token can be merged into: llama.cpp looks them up by text."""
    ids = {t: i for i, t in enumerate(tokens)}   # a repeated token: its last id, as llama.cpp
    syms = list((" " + text if add_space_prefix else text).replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = ids.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out
