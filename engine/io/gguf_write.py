"""Write a Llama (or Mistral), Phi-3, Qwen2, Qwen3, SmolLM3 or GPT-2 model and its tokenizer as
one GGUF file: what llama.cpp (and the tools built on it) run, and what `engine.load` /
`engine.load_tokenizer` read back.

The layout follows llama.cpp's own converter: `<architecture>.*` hyperparameters, `blk.{i}.*`
tensors (llama's and smollm3's q / k rows permuted to its interleaved rotary layout, qwen2's and
qwen3's and phi3's as they are, GPT-2's and phi3's q, k, v in one attn_qkv, phi3's gate and up
in one ffn_up), 1-D tensors (norms, biases) in F32, and the tokenizer as `tokenizer.ggml.*`
(byte-level BPE: tokens, token types, merges, the pre-tokenizer's name; or SentencePiece:
tokens, types, scores; special ids, chat template). Tensors are converted and written one at a
time, so a save needs little memory beyond the model; the file appears under its name only when
whole. The `gguf` package (the `hf` extra) does the writing and the quantization.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..config import FAMILY_FIELDS, every_fourth
from ..errors import CheckpointError, ConfigError, InputError, optional_import
from .gguf import _name_map, gguf_shape, llama3_rope_factors, to_gguf_layout
from .safetensors import atomic_file
from ..spm_vocab import (CONTROL, NORMAL, UNUSED, USER_DEFINED, describe, llamacpp_rstrip,
                         spm_form, spm_vocabulary)

# What save_gguf writes matrices as; llama.cpp's general.file_type code of each. K-quants
# (Q4_K, Q6_K, ...) have no quantizer in the gguf package: write F32 or F16, then run
# llama.cpp's llama-quantize.
GGUF_DTYPES = {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q5_1": 9, "Q5_0": 8, "Q4_1": 3,
               "Q4_0": 2}


def _gguf():
    return optional_import("gguf", "gguf.quants", error=CheckpointError,
                           what="writing GGUF files")


def save_gguf(model, path, tokenizer, dtype: str = "F32", name: str | None = None) -> None:
    """`model` and `tokenizer` as one GGUF file at `path`, matrices as `dtype` (one of
    GGUF_DTYPES; a matrix whose rows do not divide into the type's blocks is written F16, and
    under the 4- and 5-bit types the output projection is Q8_0). Every check runs before the
    file is opened; a failure leaves no file (and an existing one whole)."""
    from . import _check_params
    dtype = check_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InputError("the GGUF path must be a non-empty str or path")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; a GGUF model is one file (name it, e.g. "
                         "model.gguf)")
    cfg = model.config
    _check_architecture(cfg)     # (first: no tokenizer makes an encoder's file possible)
    if tokenizer is None:
        raise InputError("a GGUF file carries its tokenizer (llama.cpp needs it): pass "
                         "tokenizer=engine.load_tokenizer(...) of the model")
    _check_params(model)
    gguf = _gguf()
    writer = gguf.GGUFWriter(None, gguf_arch(cfg))
    meta = tokenizer_metadata(tokenizer, cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id)
    _add_model_keys(gguf, writer, cfg, dtype, _llamacpp_name(name or _stem(path), meta))
    _add_tokenizer_keys(writer, meta)
    plan = _tensor_plan(gguf, cfg, dtype)
    for gname, (enames, shape, qtype, nbytes) in plan.items():
        for e in enames:
            _check_range(gguf, e, model.params[e], qtype)
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)

    with atomic_file(path) as tmp:
        try:
            writer.open_output_file(tmp)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for gname, (enames, shape, qtype, nbytes) in plan.items():
                data = (llama3_rope_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                        if gname == "rope_freqs.weight"
                        else _converted(gguf, cfg, enames, model.params, qtype))
                if data.nbytes != nbytes:   # the header already promised this size
                    raise CheckpointError(f"{gname}: converted to {data.nbytes} bytes, "
                                          f"expected {nbytes}")
                writer.write_tensor_data(data)
        finally:
            writer.close()


def check_dtype(dtype) -> str:
    """The GGUF type name (any case) as GGUF_DTYPES spells it, or an InputError."""
    if not isinstance(dtype, str) or dtype.upper() not in GGUF_DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not supported; choose one of "
                         f"{', '.join(GGUF_DTYPES)} (for K-quants, write F16 and run llama.cpp's "
                         "llama-quantize)")
    return dtype.upper()


def _stem(path: str) -> str:
    base = os.path.basename(path)
    return base[:-5] if base.lower().endswith(".gguf") else base


# What llama.cpp's graph for an architecture lacks, beyond the family's own fields: its
# qwen3 and smollm3 have no biases.
_LLAMACPP_FIELDS = {"qwen3": dict(attn_bias=False, attn_out_bias=False),
                    "smollm3": dict(attn_bias=False, attn_out_bias=False, mlp_bias=False)}


def gguf_arch(cfg) -> str:
    """The llama.cpp architecture a family is written as: its own name, but Mistral is llama
    (as llama.cpp's converter writes it; llama.cpp gives it no sliding window, so the file's
    context length is the window: there full and windowed attention agree)."""
    return "llama" if cfg.model_type == "mistral" else cfg.model_type


def _check_architecture(cfg) -> None:
    causal = [f for f in FAMILY_FIELDS if FAMILY_FIELDS[f].get("causal", True)]
    if cfg.model_type not in causal:
        why = (" (an encoder: save it in the Hugging Face layout, which transformers and "
               "sentence-transformers load)" if cfg.model_type in FAMILY_FIELDS else "")
        raise ConfigError(f"GGUF export covers {', '.join(causal)} models, not "
                          f"{cfg.model_type!r}{why}")
    if cfg.labels is not None:
        raise ConfigError("GGUF export writes language models; this is a sequence classifier "
                          "(labels): save it in the Hugging Face layout, which transformers loads "
                          "as its *ForSequenceClassification")
    want = {**FAMILY_FIELDS[cfg.model_type], **_LLAMACPP_FIELDS.get(cfg.model_type, {})}
    for k, v in want.items():
        if getattr(cfg, k) != v:
            raise ConfigError(f"cannot write a {cfg.model_type} GGUF: it needs {k}={v!r}, this "
                              f"model has {getattr(cfg, k)!r}")
    if _has_llama3_rope(cfg) and gguf_arch(cfg) != "llama":
        raise ConfigError(f"cannot write a {cfg.model_type} GGUF with Llama 3's rope scaling "
                          "(llama.cpp reads its per-frequency factors in llama files)")
    if cfg.no_rope_blocks != ((every_fourth(cfg.n_layer) or None) if cfg.model_type == "smollm3"
                              else None):
        raise ConfigError(f"cannot write a {cfg.model_type} GGUF with no rotary embedding in "
                          f"blocks {cfg.no_rope_blocks}: llama.cpp's smollm3 leaves it out of "
                          "every 4th block (3, 7, ...), its other architectures out of none")
    if cfg.model_type == "phi3" and cfg.head_dim * cfg.n_head != cfg.d_model:
        raise ConfigError("cannot write a phi3 GGUF: llama.cpp's phi3 has heads of d_model / "
                          f"n_head = {cfg.d_model / cfg.n_head:g}, this model {cfg.head_dim}")
    if cfg.model_type == "qwen2" and cfg.head_dim * cfg.n_head != cfg.d_model:
        # (qwen3's key_length is read; qwen2's is not, by llama.cpp nor by transformers)
        raise ConfigError("cannot write a qwen2 GGUF: llama.cpp's qwen2 has heads of d_model / "
                          f"n_head = {cfg.d_model / cfg.n_head:g}, this model {cfg.head_dim}; "
                          "save it in the Hugging Face layout (transformers reads head_dim)")
    if cfg.model_type == "gpt2" and (cfg.n_kv_head != cfg.n_head
                                     or cfg.head_dim * cfg.n_head != cfg.d_model):
        raise ConfigError("cannot write a gpt2 GGUF: llama.cpp's GPT-2 has n_head heads of "
                          "d_model / n_head, without grouped-query attention")


def _add_model_keys(gguf, w, cfg, dtype: str, name: str) -> None:
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(GGUF_DTYPES[dtype])
    if dtype.startswith("Q"):
        w.add_quantization_version(2)
    w.add_vocab_size(cfg.vocab_size)
    # a Mistral's window: the context where the engine and transformers agree, which
    # llama.cpp (no window) then keeps to; phi3 has a key for its window (as llama.cpp's
    # converter writes it: 0 for none), which llama.cpp reads and does not apply
    w.add_context_length(cfg.context_length if cfg.model_type == "mistral" else cfg.max_seq_len)
    if cfg.model_type == "phi3":
        w.add_sliding_window(cfg.sliding_window or 0)
        w.add_rope_scaling_orig_ctx_len(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    if cfg.model_type == "gpt2":
        w.add_layer_norm_eps(float(cfg.norm_eps))
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_head != cfg.d_model:   # llama.cpp's default is d_model / n_head
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))


def _tensor_plan(gguf, cfg, dtype: str) -> dict:
    """GGUF name -> (engine names, shape, GGML type, bytes), in the order they are written."""
    T = gguf.GGMLQuantizationType
    head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    out = {}
    if _has_llama3_rope(cfg):   # llama.cpp's converter writes Llama 3's scaling as this tensor
        half = cfg.head_dim // 2
        out["rope_freqs.weight"] = ((), (half,), T.F32, 4 * half)
    for gname, enames in _name_map(cfg).items():
        shape = gguf_shape(cfg, enames)
        qtype = T[dtype]
        if len(shape) == 1 or gname == "position_embd.weight":
            # as llama.cpp's converter: norms, biases and GPT-2's position table stay F32
            # (llama-quantize never quantizes the position table either)
            qtype = T.F32
        elif gname == head and dtype[:2] in ("Q4", "Q5"):
            # the output projection is where 4- and 5-bit rounding hurts most; llama-quantize
            # keeps it at 6 bits (Q6_K), which has no quantizer here: 8
            qtype = T.Q8_0
        if qtype not in (T.F32, T.F16, T.BF16) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = T.F16          # rows that do not split into whole blocks
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        out[gname] = (enames, shape, qtype, int(np.prod(shape)) // block * size)
    return out


def _has_llama3_rope(cfg) -> bool:
    return bool(cfg.rope_scaling) and cfg.rope_scaling["rope_type"] == "llama3"


_F16_MAX = 65504.0


def _check_range(gguf, ename: str, a: np.ndarray, qtype) -> None:
    """float16 holds values up to 65504, and block types keep their scales in it: a larger
    weight would be written as inf, a file that then loads nowhere."""
    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.BF16):
        return
    big = float(np.abs(a).max(initial=0.0))
    if big > _F16_MAX:
        raise InputError(f"parameter {ename} holds values up to {big:.4g}, beyond float16's "
                         f"{_F16_MAX:g} (GGUF type {qtype.name}): save it as F32 or BF16; "
                         "nothing was saved")


def _converted(gguf, cfg, enames: tuple, params: dict, qtype) -> np.ndarray:
    """One GGUF tensor's bytes from the parameters whose rows it holds (llama's q / k rows
    permuted to llama.cpp's rotary layout)."""
    parts = [to_gguf_layout(cfg, e, params[e], gguf_arch(cfg)) for e in enames]
    a = parts[0] if len(parts) == 1 else np.concatenate(parts)
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(a, dtype="<f4")
    if qtype == T.F16:
        return a.astype("<f2")
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)


# ---- the tokenizer as tokenizer.ggml.* ----------------------------------------------------

def _llamacpp_name(name: str, meta: dict) -> str:
    """general.name, from which llama.cpp decides which tokens take the whitespace after them
    (spm_vocab.llamacpp_rstrip: a Phi-3 name, its rule; others, none). A tokenizer that
    follows Phi-3's rule gets a name that says Phi-3; any other that llama.cpp would strip
    otherwise is refused, not written to tokenize differently."""
    from ..tokenizer import TokenizerError
    have, tokens, types = meta["rstrip"], meta["tokens"], meta["types"]
    if have == llamacpp_rstrip(name, tokens, types):
        return name
    if have and have == llamacpp_rstrip("phi3", tokens, types):
        return f"Phi-3 {name}"
    if have:
        shown = ", ".join(repr(tokens[i]) for i in sorted(have)[:5])
        raise TokenizerError(f"added tokens ({shown}) take the whitespace after them (rstrip), "
                             "which a GGUF file cannot say, bar llama.cpp's rule for Phi-3 "
                             "(its control, user-defined and unknown tokens and </s>, not "
                             "<unk>, <s>, <|endoftext|>), which these do not follow; llama.cpp "
                             "would tokenize text around them differently")
    raise TokenizerError(f"the GGUF name {name!r} makes llama.cpp treat the vocabulary as "
                         "Phi-3's (it strips the whitespace after its special tokens, by "
                         "name), which this tokenizer is not: name the file, or pass name=, "
                         "without 'phi3' or 'phi-3'")


def _add_tokenizer_keys(w, meta: dict) -> None:
    w.add_tokenizer_model(meta["model"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    if meta["model"] == "llama":
        w.add_token_scores(meta["scores"])
        w.add_add_space_prefix(meta["add_space_prefix"])
    else:
        w.add_tokenizer_pre(meta["pre"])
        w.add_token_merges(meta["merges"])
    for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                       ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id),
                       ("eot", w.add_eot_token_id)):
        if meta.get(key) is not None:
            adder(meta[key])
    w.add_add_bos_token(meta["add_bos"])
    w.add_add_eos_token(meta["add_eos"])
    template = meta.get("chat_template")
    if isinstance(template, str):
        w.add_chat_template(template)
    elif template:   # named templates: the default one under the plain key, as llama.cpp reads
        named = {k: v for k, v in template.items() if k != "default"}
        if "default" in template:
            w.add_chat_template(template["default"])
        for k, v in named.items():
            w.add_string(f"tokenizer.chat_template.{k}", v)
        if named:
            w.add_array("tokenizer.chat_templates", list(named))


# llama.cpp refuses a "gpt2" vocabulary without its merges key, and the gguf package cannot
# write an empty array: a tokenizer without merges has no GGUF form.
_NO_MERGES = ("a GGUF vocabulary needs BPE merges and this tokenizer has none (the byte "
              "tokenizer of models trained from scratch): save the model in the Hugging Face "
              "layout instead (model.save(directory, tokenizer=tok))")


def tokenizer_metadata(tok, vocab_size: int, model_eos=None, model_bos=None) -> dict:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary (one token per model id:
    ids the tokenizer lacks become unused "[PAD{id}]" entries, as in llama.cpp's converter;
    their types, the merges and the pre-tokenizer's llama.cpp name), or a SentencePiece-style
    one as its "llama" vocabulary (tokens, types, scores, add_space_prefix:
    engine/spm_vocab.py); then the special ids and whether BOS / EOS are added. A tokenizer
    llama.cpp would split or join differently is refused (TokenizerError) rather than written
    to give other ids. Without an eos token of its own, the first id generation stops at
    (tok.eos_ids), else the model config's `model_eos`, is the end of text, and without a bos
    token of its own the model config's `model_bos` is the bos (as llama.cpp's converter falls
    back to config.json: Qwen2.5's tokenizer names no bos token, its config.json does)."""
    from ..tokenizer import ByteTokenizer, TokenizerError
    if tok.vocab_size > vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens, the model only "
                             f"{vocab_size} embedding rows")
    if isinstance(tok, ByteTokenizer):
        raise TokenizerError(_NO_MERGES)
    eos = _end_of_text(tok, model_eos)
    if eos is None:   # no key for "none": llama.cpp would take its default, id 11
        raise TokenizerError(f"{tok.source}: neither the tokenizer nor the model config names "
                             "an end-of-text token (eos) of this vocabulary; without one "
                             "llama.cpp takes id 11 for it and stops generating there: add "
                             "\"eos_token\" to tokenizer_config.json (or set "
                             "tok.special_tokens['eos_token'])")
    spec = json.loads(tok.backend.to_str())
    for a in spec.get("added_tokens") or []:
        if a.get("lstrip") or a.get("single_word"):
            # llama.cpp sets such attributes only for models it recognises by name (the
            # whitespace after a token, for Phi-3: _llamacpp_name)
            raise TokenizerError(f"{tok.source}: added token {a['content']!r} strips spaces "
                                 "before it or matches whole words only, which a GGUF "
                                 "vocabulary cannot say; llama.cpp would tokenize text around "
                                 "it differently")
    prefix = spm_form(spec)
    if prefix is None:
        tokens, types, merges, pre = _bpe_vocabulary(tok, spec)
        if not merges:
            raise TokenizerError(f"{tok.source}: {_NO_MERGES}")
        vocab = {"model": "gpt2", "merges": merges, "pre": pre}
    else:
        try:
            tokens, scores, types = spm_vocabulary(spec, tok.vocab_size)
        except ValueError as e:
            raise TokenizerError(f"{tok.source}: as a GGUF SentencePiece ('llama') vocabulary "
                                 f"it would tokenize otherwise in llama.cpp: {e}") from None
        scores += [0.0] * (vocab_size - len(scores))
        vocab = {"model": "llama", "scores": scores, "add_space_prefix": prefix}
    add_bos, add_eos = _added_specials(tok)
    tokens += [""] * (vocab_size - len(tokens))
    types += [UNUSED] * (vocab_size - len(types))
    src = tok.gguf_token_types if tok.gguf_token_types is not None else ()
    for i in range(vocab_size):
        # ids without a token, and rows a GGUF file (ours or llama.cpp's converter) padded the
        # vocabulary with, read back as plain tokens: unused "[PAD{id}]" entries again
        if types[i] == UNUSED or types[i] == NORMAL and tokens[i] == f"[PAD{i}]":
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
        elif i < len(src) and src[i] == UNUSED and types[i] == NORMAL:
            types[i] = UNUSED   # unused in the GGUF source (read back as a plain token)
    # end of turn as the source said it (GGUF eot / eom, a generation config's eos list); the
    # document end tokens that eos_ids also lists are llama.cpp's to find (it does, by text)
    extra = [i for i in tok._extra_eos_ids() if i != eos]
    rstrip = frozenset(a["id"] for a in spec.get("added_tokens") or [] if a.get("rstrip"))
    return {**vocab, "tokens": tokens, "types": types, "rstrip": rstrip,
            "bos": tok.bos_id if tok.bos_id is not None else _id_in(model_bos, tok.vocab_size),
            "eos": eos, "unk": tok.unk_id, "pad": tok.pad_id,
            "eot": extra[0] if extra else None, "add_bos": add_bos, "add_eos": add_eos,
            "chat_template": tok.chat_template}


def _end_of_text(tok, model_eos) -> int | None:
    if tok.eos_ids:
        return tok.eos_ids[0]
    ids = model_eos if isinstance(model_eos, list) else [model_eos]
    return next((i for i in ids if _id_in(i, tok.vocab_size) is not None), None)


def _id_in(i, n: int) -> int | None:
    """i when it is a token id below n, else None (config ids may lie past the vocabulary)."""
    return i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n else None


# What GGUF export writes, for refusals.
_KINDS = ("GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' vocabulary) and "
          "SentencePiece-style BPE ones (its 'llama' vocabulary: byte fallback, a normalizer "
          "that prefixes a space and writes spaces as \u2581, no pre-tokenizer)")


def _bpe_vocabulary(tok, spec: dict) -> tuple[list, list, list, str]:
    from ..tokenizer import TokenizerError
    model = spec.get("model") or {}
    where = f"{tok.source}: "
    if (model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout")
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or (spec.get("decoder") or {}).get("type") != "ByteLevel"):
        raise TokenizerError(f"{where}{_KINDS}; this one is {describe(spec)}")
    pre = _pre_name(tok, spec)
    n = tok.vocab_size
    tokens, types = [""] * n, [UNUSED] * n
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, NORMAL
    for a in spec.get("added_tokens") or []:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, pre


# The llama.cpp pre-tokenizer names whose splits tailtune knows (tokenizer._PRE_SPLITS), one
# per distinct split, tried in this order when the tokenizer was not read from a GGUF file.
# Each is a name llama.cpp's llama-vocab.cpp accepts (it refuses a name it does not know).
_PRE_CANDIDATES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def _pre_name(tok, spec: dict) -> str:
    """The llama.cpp name of the tokenizer's split: the one its GGUF source gave, if the split
    is still that one, else the known split equal to it. The name also sets whether a word
    that is a whole vocabulary entry skips the merges (Llama 3's ignore_merges): that must
    agree too."""
    from ..tokenizer import _LLAMA3_GROUP, TokenizerError, _pre_tokenizer, _tokenizers
    tk = _tokenizers()
    have = _comparable(spec.get("pre_tokenizer"))
    norm = spec.get("normalizer")
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    for name in ((tok.gguf_pre,) if tok.gguf_pre else ()) + _PRE_CANDIDATES:
        want = _comparable(json.loads(_pre_tokenizer(tk, name, "").__getstate__()))
        # Qwen2's tokenizer.json NFC-normalizes; llama.cpp does not (they differ on text not in NFC)
        if (have == want and (name in _LLAMA3_GROUP) == ignore_merges
                and (norm is None or name == "qwen2" and norm.get("type") == "NFC")):
            return name
    where = f"{tok.source}: "
    raise TokenizerError(f"{where}its pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]}"
                         f"{' with a normalizer' if norm else ''} (ignore_merges "
                         f"{str(ignore_merges).lower()}) is not one of the splits llama.cpp "
                         f"names that tailtune knows ({', '.join(_PRE_CANDIDATES)}); a GGUF file "
                         "with another name would tokenize differently")


def _comparable(pre) -> object:
    """A pre-tokenizer's JSON without what does not change ids (ByteLevel's trim_offsets)."""
    if isinstance(pre, dict):
        return {k: _comparable(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_comparable(v) for v in pre]
    return pre


def _added_specials(tok) -> tuple[bool, bool]:
    """Whether encode adds BOS / EOS around a text, found by encoding one: the post-processor's
    JSON has several forms. Anything else it adds has no GGUF key: refused."""
    from ..tokenizer import TokenizerError
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    add_bos = tok.bos_id is not None and full[:1] == [tok.bos_id] and plain[:1] != [tok.bos_id]
    body = full[1:] if add_bos else full
    add_eos = (tok.eos_id is not None and body[-1:] == [tok.eos_id] and body[:-1] == plain)
    if (body[:-1] if add_eos else body) != plain:
        raise TokenizerError(f"the tokenizer adds {full} around the ids {plain} of 'a'; GGUF "
                             "can only say 'add BOS' and 'add EOS'")
    return add_bos, add_eos
