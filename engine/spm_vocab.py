"""SentencePiece vocabularies as GGUF stores them (`tokenizer.ggml.model == "llama"`: Llama 1/2,
TinyLlama, Mistral, CodeLlama, ...), both ways; and what llama.cpp does with any GGUF
vocabulary's token types (which tokens it matches whole in the text, which strip the
whitespace after them), shared with the byte-level reader in engine/tokenizer.py.

llama.cpp tokenizes such a vocabulary (llm_tokenizer_spm in llama-vocab.cpp) the way
SentencePiece's BPE does: a space is prefixed to each stretch of text that starts the input or
follows a special token, spaces become "▁", and adjacent symbols are merged, highest-scoring
resulting token first (leftmost among equals), until no adjacent pair forms a token; characters
left without a token become their UTF-8 bytes' <0xXX> tokens.

That is a BPE whose merges are every pair (a, b) with a, b and a + b tokens (of any type:
llama.cpp looks tokens up by text), ranked by the score of a + b, which is how Hugging Face's
converters write a Llama tokenizer.json. So the tokenizer runs in the `tokenizers` library like
the byte-level ones (same speed, same `save`), and the way back (GGUF export) gives each token a score from its merge's rank. The one
difference: where two different tokens of equal score could both be merged, llama.cpp takes the
leftmost pair, we the token of lower id. Llama 2's and Mistral's vocabularies give every token
that merges build its own score; Gemma's user-defined whitespace tokens all score 0.
"""
from __future__ import annotations

import json
import re

import numpy as np

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"   # how SentencePiece writes a space inside tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


# Bound on the work of finding the merges, sum over tokens of len(token) ** 2 (each of a
# token's n - 1 splits is looked up and may become a merge holding n characters): a 32k
# vocabulary comes to ~2e6, Gemma's 262k tokens to ~2e7 (estimated); a file of a few MB whose
# tokens are "a", "aa", "aaa", ... would need terabytes.
MAX_MERGE_WORK = 1 << 26


def _check_work(tokens) -> None:
    work = sum(len(t) ** 2 for t in tokens)
    if work > MAX_MERGE_WORK:
        raise ValueError(f"its tokens are too long for a SentencePiece vocabulary (the sum of "
                         f"their squared lengths is {work}, real ones stay below "
                         f"{MAX_MERGE_WORK})")


def spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a + b tokens, best-scoring a + b first; ties by id, and a
    token's own splits left to right. Every kind of token takes part, as in llama.cpp (its
    merges look tokens up by text: a user-defined token of four "▁" is built from spaces).
    ValueError past MAX_MERGE_WORK."""
    _check_work(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = sorted((-float(scores[i]), i) for t, i in ids.items() if len(t) > 1)
    merges = []
    for _, i in ranked:
        t = tokens[i]
        merges += [(t[:j], t[j:]) for j in range(1, len(t)) if t[:j] in ids and t[j:] in ids]
    return merges


def spm_backend(tk, tokens: list[str], scores: np.ndarray, kinds: list[int], unk: str | None,
                add_space_prefix: bool, rstrip=frozenset()):
    """A tokenizers.Tokenizer that gives llama.cpp's ids for this vocabulary (see the module's
    docstring). Control and unknown tokens become special added tokens, user-defined ones plain
    added tokens: all are matched whole in the text, and the text after them gets its space
    prefix again (the normalizer runs on each stretch between added tokens, as llama.cpp's
    is_prev_special does). rstrip: ids that take the whitespace after them (llama.cpp's
    RSTRIP attribute)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    model = tk.models.BPE(vocab=vocab, merges=spm_merges(tokens, scores), unk_token=unk,
                          fuse_unk=True, byte_fallback=True, dropout=None)
    backend = tk.Tokenizer(model)
    n = tk.normalizers
    escape = n.Replace(" ", SPACE)
    backend.normalizer = n.Sequence([n.Prepend(SPACE), escape]) if add_space_prefix else escape
    d = tk.decoders
    backend.decoder = d.Sequence([d.Replace(SPACE, " "), d.ByteFallback(), d.Fuse(),
                                  *([d.Strip(" ", 1, 0)] if add_space_prefix else [])])
    add_matched_tokens(tk, backend, tokens, kinds, rstrip)
    return backend


def add_matched_tokens(tk, backend, tokens, kinds, rstrip=frozenset()) -> None:
    """The tokens llama.cpp matches whole in the text (with parse_special): control and
    unknown ones as special added tokens, user-defined ones as plain added tokens."""
    def added(i, special):
        return tk.AddedToken(tokens[i], special=special, normalized=False, rstrip=i in rstrip)
    backend.add_special_tokens([added(i, True) for i, k in enumerate(kinds)
                                if k in (CONTROL, UNKNOWN)])
    backend.add_tokens([added(i, False) for i, k in enumerate(kinds) if k == USER_DEFINED])


def llamacpp_rstrip(name, tokens: list[str], kinds: list[int]) -> frozenset[int] | None:
    """The ids llama.cpp gives its RSTRIP attribute (the whitespace after the token is part of
    it), which it sets by the file's general.name (llama-vocab.cpp): for a name with "phi-3" or
    "phi3" in it, the control, user-defined and unknown tokens and </s>, but not <unk>, <s>,
    <|endoftext|>; for other names none. None when the name asks for it and one of those four
    tokens is missing (llama.cpp then fails to load the file)."""
    if not isinstance(name, str) or not any(s in name.lower() for s in ("phi-3", "phi3")):
        return frozenset()
    ids = {t: i for i, t in enumerate(tokens)}
    if any(t not in ids for t in ("</s>", "<unk>", "<s>", "<|endoftext|>")):
        return None
    out = {i for i, k in enumerate(kinds) if k in (CONTROL, USER_DEFINED, UNKNOWN)}
    return frozenset((out | {ids["</s>"]}) - {ids["<unk>"], ids["<s>"], ids["<|endoftext|>"]})


def spm_form(spec: dict) -> bool | None:
    """For a tokenizer.json (as a dict): None when it is not a SentencePiece-style BPE that
    llama.cpp's "llama" vocabulary reproduces, else whether it prefixes a space (its
    add_space_prefix). The normalizer must be the one llama.cpp's behaviour amounts to:
    Prepend("▁") + Replace(" ", "▁"), or the Replace alone. (Metaspace with prepend_scheme
    "first" does not prefix the text after a special token, which llama.cpp does.)"""
    model = spec.get("model") or {}
    if (model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("ignore_merges") or spec.get("pre_tokenizer") is not None):
        return None
    norm = spec.get("normalizer") or {}
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if steps == [replace]:
        return False
    if steps == [{"type": "Prepend", "prepend": SPACE}, replace]:
        return True
    return None


def spm_vocabulary(spec: dict, n: int) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and types of ids 0..n-1 for a GGUF "llama" vocabulary, from a
    SentencePiece-style tokenizer.json: a merged token scores minus its first merge's rank, so
    llama.cpp merges in the tokenizer's order; tokens no merge builds score below all of them,
    and the <0xXX> byte tokens, the unknown token and added tokens 0, as SentencePiece has
    them. Ids with no token are left as "" of type UNUSED for the caller to name.
    ValueError (saying why) for a tokenizer llama.cpp would merge otherwise: llama.cpp merges
    every split of a token into two tokens, so the merges must be all of those and each
    token's together (as converters from SentencePiece write them), and an added token must
    match the text as written (llama.cpp does not normalize it)."""
    model = spec["model"]
    for a in spec.get("added_tokens") or []:
        if a.get("normalized"):
            raise ValueError(f"added token {a['content']!r} is matched in the normalized text "
                             "(\"normalized\": true), llama.cpp matches it as written")
    tokens, kinds, scores = [""] * n, [UNUSED] * n, [0.0] * n
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in model.get("merges") or []]
    rank, last, count = {}, {}, {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
        last[a + b] = r
        count[a + b] = count.get(a + b, 0) + 1
    vocab = model["vocab"]
    known = set(vocab) | {a["content"] for a in spec.get("added_tokens") or []}
    _check_work(known)
    if len(set(merges)) != len(merges):
        raise ValueError("its merges list a pair twice")
    for t, r in rank.items():
        splits = sum(1 for j in range(1, len(t)) if t[:j] in known and t[j:] in known)
        if not count[t] == last[t] - r + 1 == splits:
            raise ValueError(f"its merges build {t!r} from {count[t]} of its {splits} splits "
                             f"into two tokens, {'' if count[t] == last[t] - r + 1 else 'not '}"
                             "one after the other; llama.cpp merges every split, best token "
                             "first")
    unbuilt = next((t for t in known if len(t) > 1 and t not in rank and any(
        t[:j] in known and t[j:] in known for j in range(1, len(t)))), None)
    if unbuilt is not None:
        raise ValueError(f"no merge builds {unbuilt!r}, which llama.cpp builds from its splits")
    for t, i in vocab.items():
        tokens[i] = t
        if _BYTE_TOKEN.fullmatch(t):
            kinds[i] = BYTE
        elif t == model.get("unk_token"):
            kinds[i] = UNKNOWN
        else:
            kinds[i] = NORMAL
            scores[i] = -float(rank[t]) if t in rank else -float(len(merges) + i)
    for a in spec.get("added_tokens") or []:
        i, t = a["id"], a["content"]
        # a token merges build keeps its rank's score (Gemma's whitespace tokens), else 0
        tokens[i], scores[i] = t, -float(rank[t]) if t in rank else 0.0
        if kinds[i] not in (BYTE, UNKNOWN):
            kinds[i] = CONTROL if a.get("special") else USER_DEFINED
    return tokens, scores, kinds


def describe(spec: dict) -> str:
    """A short account of a tokenizer.json's model and normalizer, for refusals."""
    model = spec.get("model") or {}
    return json.dumps({"model": model.get("type"), "byte_fallback": model.get("byte_fallback"),
                       "normalizer": spec.get("normalizer"),
                       "pre_tokenizer": spec.get("pre_tokenizer")})[:300]
