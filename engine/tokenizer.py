"""Tokenizers and chat templates.

Two kinds:
- `ByteTokenizer`: no dependencies; ids 0..255 are the UTF-8 bytes of the text, 256 is an
  optional end-of-text token. For models trained from scratch.
- `BPETokenizer`: BPE from a Hugging Face `tokenizer.json`, GPT-2 style `vocab.json` +
  `merges.txt`, or the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE, or a
  SentencePiece vocabulary run as the equivalent BPE: engine/spm_vocab.py). The BPE itself
  runs in the maintained `tokenizers` library (the `tailtune[hf]` extra), so ids match
  `transformers` by construction instead of by a re-implementation we would have to keep in step.

`load_tokenizer(path)` picks the right one. Chat templates come from model files, which are
untrusted: they are rendered in a bounded sandbox (engine/chat_template.py). The files
themselves are read only if they are regular files inside the model directory.
"""
from __future__ import annotations

import functools
import heapq
import json
import os
import shutil
import stat

import numpy as np

from .errors import CheckpointError, InputError, is_int, optional_import
from .spm_vocab import (CONTROL, NORMAL, UNKNOWN, USER_DEFINED, add_matched_tokens,
                        llamacpp_rstrip, spm_backend)


class TokenizerError(CheckpointError):
    """Tokenizer files that are missing, corrupt, unsupported, or that do not fit the model.
    A kind of CheckpointError: the tokenizer is part of the model's files."""


class ChatTemplateError(TokenizerError):
    """A chat template that is missing, invalid, unsafe, or that rejected the messages."""


# How much of the text before a continuation is encoded with it (characters), and how many
# ids before a reply are decoded with it: far more than one token spans.
_CONTEXT_CHARS = 4096
_CONTEXT_IDS = 8

# Named special tokens, in the order transformers lists them (its SPECIAL_TOKENS_ATTRIBUTES);
# chat templates see each one that is set as a variable (`bos_token`, `eos_token`, ...).
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")

# Special tokens that end a turn or a document in common vocabularies. A chat model stops on
# these as well as on its configured EOS: SmolLM2's EOS is <|im_end|>, but a base-model habit
# of writing <|endoftext|> must also stop generation.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",
              "<|end|>", "<end_of_turn>", "</s>", "<|return|>")

# Files that make a directory a Hugging Face tokenizer, in the order they are tried.
_HF_FILES = ("tokenizer.json", "vocab.json + merges.txt")


# --------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path, model_vocab_size: int | None = None):
    """A tokenizer from `path`: a Hugging Face directory (tokenizer.json, or vocab.json +
    merges.txt; tokenizer_config.json for special tokens and the chat template), a `.gguf`
    file, a directory written by `tok.save`, or a packaged model's short name ("smollm2"), as
    `engine.load` takes them.

    The ids must fit the model: against `model_vocab_size` when given, else against the
    `vocab_size` of a `config.json` next to the tokenizer files (or the GGUF's own metadata)."""
    from .io.gguf import is_gguf
    path = _resolve(os.fspath(path))
    if os.path.isdir(path):
        tok = _load_dir(path)
        model_vocab_size = model_vocab_size or _dir_vocab_size(path)
    elif is_gguf(path, TokenizerError):
        tok = BPETokenizer.from_gguf(path)
        model_vocab_size = model_vocab_size or tok._model_vocab_size
    elif os.path.basename(path) == "tokenizer.json":
        return load_tokenizer(os.path.dirname(path) or ".", model_vocab_size)
    else:
        raise TokenizerError(f"{path}: not a tokenizer: expected a directory holding "
                             f"{' or '.join(_HF_FILES)}, or a .gguf file")
    if model_vocab_size:
        tok.check_vocab(model_vocab_size)
    return tok


def _resolve(path: str) -> str:
    """A file or model directory as given, a finished run's model/, or a packaged model."""
    from .io.resolve import resolve_model_path
    try:
        return resolve_model_path(path)
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None


def _load_dir(d: str):
    cfg = _read_hf_config(d)
    if cfg.get("tailtune_tokenizer") == "byte":
        return ByteTokenizer(eos=ByteTokenizer.EOS_TOKEN in _named_specials(cfg).values(),
                             chat_template=cfg.get("chat_template"))
    tj = os.path.join(d, "tokenizer.json")
    vocab, merges = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    if os.path.lexists(tj):
        return BPETokenizer.from_tokenizer_json(tj, cfg, root=d)
    if os.path.lexists(vocab) and os.path.lexists(merges):
        for p in (vocab, merges):
            _check_file(p, _stat(_model_path(p, d), p), _MAX_TOKENIZER_FILE)
        return BPETokenizer.from_vocab_merges(vocab, merges, cfg)
    if os.path.isfile(os.path.join(d, "tokenizer.model")):
        raise TokenizerError(f"{d}: holds only a SentencePiece tokenizer.model, which tailtune "
                             "does not read; save the tokenizer with transformers "
                             "(save_pretrained) to get a tokenizer.json")
    # (a directory holding only a .gguf never gets here: resolve_model_path gives its file)
    raise TokenizerError(f"{d}: no tokenizer files (looked for {', '.join(_HF_FILES)})")


# Model files are untrusted, and so is where they point: a FIFO never ends a read, /dev/zero never
# ends at all, and a chat_template.jinja linked to ~/.netrc would become the template that
# `tok.save` then publishes beside the fine-tuned model. So only regular files inside the model
# directory are read, each up to a size no real one comes near.
_MAX_TEMPLATE_FILE = 1 << 20      # a chat template .jinja (real ones: a few KB)
_MAX_JSON_FILE = 64 << 20         # tokenizer_config.json and the other small JSON files
_MAX_TOKENIZER_FILE = 256 << 20   # tokenizer.json, vocab.json, merges.txt (real ones: < 40 MB)
_MAX_EXTRA_TEMPLATES = 64         # files in additional_chat_templates/ (real models: a few)


def _model_path(path: str, root: str | None) -> str:
    """`path` with its links followed, refused if that leaves the model directory `root`."""
    real = os.path.realpath(path)
    if root is not None and not _inside(real, root):
        raise TokenizerError(f"{path}: links to {real}, outside the model directory {root}; "
                             "a model's files must be inside it (copy the file in if you trust it)")
    return real


def _inside(real: str, root: str) -> bool:
    """Whether `real` is in the model directory `root`, or a file of the Hugging Face cache:
    a snapshot (.../models--org--name/snapshots/<rev>/) links each file to ../../blobs/<hash>,
    and `huggingface-cli download --local-dir` has linked large files there too."""
    blobs = os.path.dirname(real)
    if (os.path.basename(blobs) == "blobs"
            and os.path.basename(os.path.dirname(blobs)).startswith("models--")):
        return True
    root = os.path.realpath(root)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # another drive (Windows)
        return False


def _stat(real: str, path: str) -> os.stat_result:
    try:
        return os.stat(real)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None


def _check_file(path: str, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise TokenizerError(f"{path}: {kind}, not a regular file; a model's files must be "
                             "regular files")
    if st.st_size > limit:
        raise TokenizerError(f"{path}: {st.st_size} bytes, more than the {limit} a file of this "
                             "kind may have (none real comes near)")


def _read_bytes(path: str, root: str | None, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, inside `root` when given."""
    real = _model_path(path, root)
    try:
        # O_NONBLOCK: a FIFO put in the file's place since any earlier check opens without
        # waiting for a writer, and the fstat below refuses it
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_file(path, st, limit)
            data = f.read(st.st_size + 1)  # (read(limit) would allocate the limit up front)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > st.st_size:
        raise TokenizerError(f"{path}: grew while being read")
    return data


def _read_text(path: str, root: str | None = None, limit: int = _MAX_TEMPLATE_FILE) -> str:
    try:
        return _read_bytes(path, root, limit).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_json(path: str, what: str, root: str | None = None, limit: int = _MAX_JSON_FILE):
    text = _read_text(path, root, limit)
    try:
        return json.loads(text)
    except RecursionError:
        raise TokenizerError(f"{path}: cannot read {what}: JSON nested too deeply") from None
    except ValueError as e:  # bad JSON, or a number of more digits than int() takes
        raise TokenizerError(f"{path}: cannot read {what}: {e}") from None


def _read_hf_config(d: str) -> dict:
    """tokenizer_config.json over special_tokens_map.json, with the chat template files that
    transformers (v4.43+) writes beside them; they win over a template inside the config."""
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(d, name)
        if os.path.lexists(p):
            data = _read_json(p, name, d)
            if not isinstance(data, dict):
                raise TokenizerError(f"{p}: expected a JSON object")
            cfg.update(data)
    templates = _template_dict(cfg.get("chat_template"))
    jinja = os.path.join(d, "chat_template.jinja")
    if os.path.lexists(jinja):
        templates["default"] = _read_text(jinja, d)
    extra = os.path.join(d, "additional_chat_templates")
    if os.path.isdir(extra):
        names = sorted(f for f in os.listdir(extra) if f.endswith(".jinja"))
        if len(names) > _MAX_EXTRA_TEMPLATES:
            raise TokenizerError(f"{extra}: {len(names)} templates, more than the "
                                 f"{_MAX_EXTRA_TEMPLATES} a model may ship")
        for f in names:
            templates[f[:-len(".jinja")]] = _read_text(os.path.join(extra, f), d)
    cfg["chat_template"] = _template_value(templates)
    gen = os.path.join(d, "generation_config.json")
    if os.path.lexists(gen):
        cfg["_generation_eos_ids"] = _generation_eos_ids(
            gen, _read_json(gen, "generation_config.json", d))
    return cfg


def _generation_eos_ids(path: str, gen) -> list[int]:
    """eos_token_id of a generation_config.json (an id or a list of ids): stop tokens, so a
    negative or non-integer one is refused here rather than never matching in generation."""
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(is_int(i) and i >= 0 for i in ids):
        raise TokenizerError(f"{path}: eos_token_id must be a token id or a list of token ids, "
                             f"got {_clip(repr(eos))}")
    return [int(i) for i in ids]


def _clip(text: str, n: int = 200) -> str:
    """`text`, cut to about `n` characters for an error message."""
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def _template_dict(value) -> dict:
    """A chat template as stored in a config (a string, or a list of {name, template}) -> dict."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"chat_template must be a string or a list of {{name, template}}, "
                         f"got {type(value).__name__}")


def _template_value(templates: dict):
    if not templates:
        return None
    if set(templates) == {"default"}:
        return templates["default"]
    return templates


def _dir_vocab_size(d: str) -> int | None:
    p = os.path.join(d, "config.json")
    if not os.path.isfile(p):
        return None
    cfg = _read_json(p, "config.json", d)
    if not isinstance(cfg, dict):
        return None
    text = cfg.get("text_config")
    v = cfg.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)
    return v if is_int(v) and v > 0 else None


def _token_str(v) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with `content`."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _named_specials(cfg: dict) -> dict[str, str]:
    return {n: s for n in SPECIAL_NAMES if (s := _token_str(cfg.get(n))) is not None}


# --------------------------------------------------------------------------------------------
# The shared interface


class _Tokenizer:
    """What every tokenizer offers; subclasses supply encode / decode / save and the token maps."""

    chat_template = None     # str, {name: str}, or None
    special_tokens: dict     # {"bos_token": "<s>", ...} for the names that are set

    def encode_continuation(self, text: str, previous: str) -> list[int]:
        """Ids of `text` as it tokenizes after `previous` (a completion after its prompt, a
        chat turn after the turns before it), without BOS: the ids the two texts encoded
        joined give after those of `previous`, where they begin with those (no token spans
        the join). Where one does (`"Answer: "` + `"yes"`: `" yes"`), `text` is encoded on its
        own, with no space prefixed to it by a tokenizer that prefixes a text's start
        (SentencePiece's) unless the joined encoding would prefix one there too.
        (`previous` counts by its last _CONTEXT_CHARS characters: a token reaches no further.)"""
        _check_text(text)
        _check_text(previous)
        if not text:
            return []
        if previous:
            tail = previous[-_CONTEXT_CHARS:]
            head = self.encode(tail, add_special_tokens=False)
            both = self.encode(tail + text, add_special_tokens=False)
            if both[:len(head)] == head:
                return both[len(head):]
        return self._encode_apart(text, previous)

    def _encode_apart(self, text: str, previous: str) -> list[int]:
        """encode_continuation where a token spans the join."""
        return self.encode(text, add_special_tokens=False)

    def decode_continuation(self, ids, previous_ids) -> str:
        """Text of `ids` as it reads after `previous_ids` (a reply after its prompt): a
        decoder that drops a text's first space (SentencePiece's) must not drop the reply's."""
        ids = _check_ids(ids, self.vocab_size)
        context = _check_ids(previous_ids, self.vocab_size)[-_CONTEXT_IDS:]
        if not context:
            return self.decode(ids)
        head, both = self.decode(context), self.decode(context + ids)
        return both[len(head):] if both.startswith(head) else self.decode(ids)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def batch_pad_id(self) -> int:
        """The id that fills padding in a batch: pad, else eos, else 0 (padding carries no loss,
        so any id in the vocabulary will do)."""
        return self.pad_id if self.pad_id is not None else (self.eos_id or 0)

    @property
    def unk_id(self) -> int | None:
        return self._named_id("unk_token")

    _named_ids: dict = {}   # name -> id where the source gives ids (GGUF), not only texts

    def _named_id(self, name: str) -> int | None:
        if name in self._named_ids:
            return self._named_ids[name]
        tok = self.special_tokens.get(name)
        return None if tok is None else self.token_to_id(tok)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a turn or a document, EOS first: stop tokens for generation."""
        ids = [self.eos_id, *self._extra_eos_ids()]
        ids += [self.token_to_id(t) for t in END_TOKENS if self._is_special_token(t)]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def _extra_eos_ids(self) -> list[int]:
        return []

    def _is_special_token(self, token: str) -> bool:
        i = self.token_to_id(token)
        return i is not None and i in self.special_ids

    @property
    def special_ids(self) -> frozenset[int]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash that changes whenever encoding, special tokens or the chat template would:
        the key of tokenized-data caches."""
        import hashlib
        backend = getattr(self, "backend", None)
        body = backend.to_str() if backend is not None else repr(sorted(vars(self).items()))
        extra = json.dumps([type(self).__name__, self.chat_template, self.special_tokens],
                           sort_keys=True, default=str)
        return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()[:32]

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse a tokenizer whose ids would index past the model's embedding table. A model
        vocabulary larger than the tokenizer's is fine (many are padded to a round size)."""
        if self.vocab_size <= model_vocab_size:
            return
        count, first = self._ids_past(model_vocab_size)
        named = ", ".join(repr(self.decode([i])) for i in first) + (", ..." if count > 5 else "")
        hint = ("this tokenizer belongs to a different model" if count > 16 else
                f"the token(s) {named} are past the model's vocabulary: a token the tokenizer "
                "config declares (eos_token, pad_token, additional_special_tokens) that the "
                "vocabulary lacks, say a typo, or a token added without resizing the model")
        raise TokenizerError(
            f"tokenizer ids run to {self.vocab_size - 1} but the model's vocabulary has "
            f"{model_vocab_size} entries (ids 0..{model_vocab_size - 1}): {hint}")

    def _ids_past(self, n: int) -> tuple[int, list[int]]:
        """How many ids are n or more, and the first five of them."""
        return self.vocab_size - n, list(range(n, min(n + 5, self.vocab_size)))

    def chat_prompt(self, messages, add_generation_prompt: bool = True, *, tools=None,
                    documents=None, template: str | None = None, **kwargs) -> str:
        """The model's own chat template rendered for `messages` ([{"role", "content"}, ...]),
        as `transformers`' `apply_chat_template(..., tokenize=False)` renders it. Extra keyword
        arguments become template variables. `template` names one of several templates."""
        source = self._select_template(template, tools)
        variables = {**self.special_tokens, **kwargs}
        from .chat_template import render_chat_template   # it imports this module's errors
        return render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, documents=documents, **variables)

    def chat_ids(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of `chat_prompt(...)`. The template writes its own special tokens, so none
        are added here (as `apply_chat_template(..., tokenize=True)` does)."""
        prompt = self.chat_prompt(messages, add_generation_prompt, **kwargs)
        return self.encode(prompt, add_special_tokens=False)

    def _select_template(self, name, tools) -> str:
        t = self.chat_template
        if not t:
            raise ChatTemplateError("this tokenizer has no chat template (the model files ship "
                                    "none); set tok.chat_template to a Jinja template string")
        if not isinstance(t, (str, dict)):
            raise ChatTemplateError(f"chat_template must be a string or a dict of them, got "
                                    f"{type(t).__name__}")
        if isinstance(t, str):
            if name not in (None, "default"):
                raise ChatTemplateError(f"no chat template named {name!r}; this tokenizer has "
                                        "one template")
            return t
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in t else "default"
        if name not in t:
            raise ChatTemplateError(f"no chat template named {name!r}; available: {sorted(t)}")
        return t[name]


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise InputError(f"encode expects a str, got {type(text).__name__}")


def _check_ids(ids, vocab_size: int) -> list[int]:
    """Ids as a list of Python ints, each in 0..vocab_size-1: an id outside the vocabulary
    would otherwise be dropped silently (the tokenizers library skips unknown ids)."""
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise InputError("decode expects a sequence of integer token ids") from None
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise InputError(f"token id {bad} is outside the tokenizer's vocabulary "
                         f"(0..{vocab_size - 1})")
    return ids


# --------------------------------------------------------------------------------------------
# Byte tokenizer


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters: the spelling of byte-level vocabularies.
    Printable Latin-1 bytes stand for themselves; the rest take code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ByteTokenizer(_Tokenizer):
    """Ids 0..255 are the bytes of the UTF-8 text. With `eos=True` (the default) id 256 is
    `<|endoftext|>`: it separates documents in training data and stops generation. Like a BPE
    tokenizer's special tokens, the string `<|endoftext|>` in the text encodes to 256.
    Needs nothing beyond the standard library; `save` writes files that transformers loads too."""

    EOS_TOKEN = "<|endoftext|>"

    def __init__(self, eos: bool = True, chat_template=None):
        self.eos = bool(eos)
        self.special_tokens = {"eos_token": self.EOS_TOKEN} if self.eos else {}
        self.chat_template = chat_template

    def __repr__(self):
        return f"ByteTokenizer(eos={self.eos})"

    @property
    def vocab_size(self) -> int:
        return 257 if self.eos else 256

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset({256} if self.eos else ())

    def token_to_id(self, token: str) -> int | None:
        if self.eos and token == self.EOS_TOKEN:
            return 256
        b = token.encode("utf-8", "surrogatepass")
        return b[0] if len(b) == 1 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of `text`. Nothing is ever added (the model adds no BOS or EOS);
        `add_special_tokens` is accepted for a uniform interface."""
        _check_text(text)
        pieces = text.split(self.EOS_TOKEN) if self.eos else [text]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids.append(256)
            ids.extend(_utf8(piece))
        return ids

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte runs that are not valid UTF-8 decode with U+FFFD replacements."""
        ids = _check_ids(ids, self.vocab_size)
        out, run = [], []
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", "replace"))
            run = []
            if not skip_special_tokens:
                out.append(self.EOS_TOKEN)
        out.append(bytes(run).decode("utf-8", "replace"))
        return "".join(out)

    def save(self, directory, token_types: bool | None = None) -> None:
        """tokenizer.json + tokenizer_config.json: a byte-level BPE with no merges, which is this
        tokenizer exactly, so transformers loads the directory too; the config marks it so
        `load_tokenizer` gives back a ByteTokenizer (no dependencies). (token_types: as for
        BPETokenizer.save; this one has no template for pairs.)"""
        b2u = _byte_to_unicode()
        added = [_added_token_json(256, self.EOS_TOKEN, special=True)] if self.eos else []
        tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
              "normalizer": None,
              "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                "trim_offsets": True, "use_regex": False},
              "post_processor": None,
              "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": False},
              "model": {"type": "BPE", "dropout": None, "unk_token": None,
                        "continuing_subword_prefix": None, "end_of_word_suffix": None,
                        "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                        "vocab": {b2u[b]: b for b in range(256)}, "merges": []}}
        cfg = _config_json(self.special_tokens, self.chat_template)
        cfg["tailtune_tokenizer"] = "byte"
        cfg["model_input_names"] = ["input_ids", "attention_mask"]
        _write_files(directory, json.dumps(tj, ensure_ascii=False), cfg)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"text is not valid Unicode (lone surrogate at index {e.start}); "
                         "it has no UTF-8 encoding") from None


def _added_token_json(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _config_json(special_tokens: dict, chat_template) -> dict:
    """tokenizer_config.json as transformers reads it. PreTrainedTokenizerFast takes the
    tokenizer.json exactly as written (a model-specific class could rebuild parts of it)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    cfg.update(special_tokens)
    if isinstance(chat_template, dict):
        cfg["chat_template"] = [{"name": k, "template": v} for k, v in chat_template.items()]
    elif chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def _write_files(directory, tokenizer_json: str, cfg: dict) -> None:
    """Each file whole or untouched (written to a temporary, then renamed), as the model's."""
    from .io.safetensors import write_atomic
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise TokenizerError(f"cannot create the directory {directory}: {e.strerror or e}") from None
    write_atomic(os.path.join(directory, "tokenizer.json"), [tokenizer_json.encode("utf-8")])
    write_atomic(os.path.join(directory, "tokenizer_config.json"),
                 [(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")])
    # files of another tokenizer saved here before, which loaders read over (or beside) the
    # config just written: an old chat template would win over this tokenizer's
    for name in _OVERRIDING_FILES:
        p = os.path.join(directory, name)
        try:
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TokenizerError(f"cannot remove {p}, which would override the saved tokenizer: "
                                 f"{e.strerror or e}") from None


_OVERRIDING_FILES = ("special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                     "additional_chat_templates")


# --------------------------------------------------------------------------------------------
# Byte-level BPE (tokenizers library)


def _prefix_every_word(pre) -> None:
    """In a tokenizer.json's pre_tokenizer spec: a space before every word of pre-split input
    (ByteLevel's add_prefix_space, Metaspace's prepend_scheme "always"), so that a word is
    tokenized as it would be inside a text (transformers' add_prefix_space=True)."""
    if not isinstance(pre, dict):
        return
    if pre.get("type") == "ByteLevel":
        pre["add_prefix_space"] = True
    elif pre.get("type") == "Metaspace":
        pre["prepend_scheme"] = "always"
        pre["add_prefix_space"] = True
    for p in pre.get("pretokenizers") or ():
        _prefix_every_word(p)


def _tokenizers():
    return optional_import("tokenizers", error=TokenizerError, what="BPE tokenizers")


class _NoPanic:
    """`with _NoPanic(source, doing):` around calls into the tokenizers library: a Rust panic
    there (a hostile regex past Oniguruma's retry limit, a post-processor naming a token that
    is not there, a garbage normalizer table) arrives as pyo3's PanicException, a BaseException
    that `except Exception` misses; it becomes a TokenizerError. pyo3_runtime, which defines it,
    is not reliably importable, so the type is matched by name. (The message is put together
    only on a panic: encode runs this on every call.)"""

    __slots__ = ("source", "doing")

    def __init__(self, source: str, doing: str = ""):
        self.source, self.doing = source, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is not None and kind.__name__ == "PanicException":
            where = f"{self.source}: {self.doing}" if self.doing else self.source
            raise TokenizerError(f"{where}: the tokenizers library crashed ({_clip(str(e))}); "
                                 "the tokenizer's files are corrupt or were made to crash "
                                 "it") from None
        return False


class BPETokenizer(_Tokenizer):
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: the named special tokens
    and the chat template. Whether BOS / EOS are added lives in the backend's post-processor.
    Build with `load_tokenizer` or the `from_*` constructors."""

    def __init__(self, backend, special_tokens: dict, *, chat_template=None, extra_eos_ids=(),
                 source: str = "<memory>"):
        self._tk = backend
        self.source = source
        with _NoPanic(source):
            # Encoding never truncates or pads: a tokenizer.json may carry settings for either,
            # which transformers also switches off unless asked per call.
            self._tk.no_truncation()
            self._tk.no_padding()
            vocab = self._tk.get_vocab(with_added_tokens=True)
            added = self._tk.get_added_tokens_decoder()
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._model_vocab_size = None  # set from GGUF metadata
        self.gguf_pre = None           # llama.cpp's name of the split, when read from GGUF
        self.gguf_token_types = None   # and its token types (numpy array)
        self._vocab_size = 1 + max(vocab.values(), default=-1)
        self._extra_eos = [i for i in extra_eos_ids if is_int(i)]
        for i in self._extra_eos:
            if i >= self._vocab_size:
                raise TokenizerError(f"{source}: the generation config's eos_token_id {i} is "
                                     f"past the tokenizer's vocabulary (ids 0.."
                                     f"{self._vocab_size - 1})")
        self._special_ids = frozenset(i for i, t in added.items() if t.special) | frozenset(
            i for n in self.special_tokens if (i := self._named_id(n)) is not None)

    def __repr__(self):
        return f"BPETokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """One past the largest id (base vocabulary and added tokens)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def _extra_eos_ids(self) -> list[int]:
        return self._extra_eos

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def _ids_past(self, n: int) -> tuple[int, list[int]]:
        # from the vocabulary itself: its ids can have gaps (one id of 2e9 in a tokenizer.json
        # makes vocab_size 2e9 with a handful of tokens)
        past = [i for i in self._tk.get_vocab(with_added_tokens=True).values() if i >= n]
        return len(past), heapq.nsmallest(5, past)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`. Special-token strings in the text (e.g. `<|im_end|>`) become their
        single ids, as in transformers. BOS / EOS are added only where the model's tokenizer
        config says so (`add_special_tokens=False` never adds them). Bytes the vocabulary has no
        token for are dropped, as the reference tokenizer drops them."""
        _check_text(text)
        try:
            with _NoPanic(self.source, "encoding a text"):
                return self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _utf8(text)  # a lone surrogate: say so instead of the library's type error
            raise

    def _encode_apart(self, text: str, previous: str) -> list[int]:
        cont = self._continuation()
        if cont is None or not previous or self._prefixes_after_added and any(
                previous.endswith(t) for t in self._added_texts()):
            return self.encode(text, add_special_tokens=False)
        # the prefix goes only before the text up to the first added token: the text after an
        # added token is prefixed again when the whole is encoded too
        at = min((i for t in self._added_texts() if (i := text.find(t)) >= 0), default=len(text))
        head, rest = text[:at], text[at:]
        try:
            with _NoPanic(self.source, "encoding a text"):
                ids = cont.encode(head, add_special_tokens=False).ids if head else []
        except TypeError:
            _utf8(text)
            raise
        return ids + (self.encode(rest, add_special_tokens=False) if rest else [])

    def _continuation(self):
        """A copy of the backend that prefixes no space to the text's start (normalizer
        Prepend left out; Metaspace's prepend_scheme "never"), or None when the backend
        prefixes nothing. Built on first use."""
        if not hasattr(self, "_cont"):
            with _NoPanic(self.source):
                spec = json.loads(self._tk.to_str())
            changed, self._prefixes_after_added = _without_prefix(spec)
            self._cont = _tokenizers().Tokenizer.from_str(json.dumps(spec)) if changed else None
            if self._cont is not None:
                self._cont.no_truncation()
                self._cont.no_padding()
        return self._cont

    def _added_texts(self) -> list[str]:
        if not hasattr(self, "_added"):
            self._added = [t.content for t in self._tk.get_added_tokens_decoder().values()
                           if t.content]
        return self._added

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel inside the tokenizers library."""
        texts = list(texts)
        for t in texts:
            _check_text(t)
        try:
            with _NoPanic(self.source, "encoding texts"):
                encs = self._tk.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            for t in texts:
                _utf8(t)  # a lone surrogate: say so instead of the library's type error
            raise
        return [e.ids for e in encs]

    def encode_words(self, word_lists, max_length: int | None = None):
        """(ids, word of each id: its index in the list, or None for a special token) of each
        list of words, as transformers' is_split_into_words encodes them: each word on its own,
        a byte-level vocabulary's space before every word (add_prefix_space, which transformers
        asks for with RoBERTa), the special tokens of one sequence around them; with
        max_length, the words past it cut (the special tokens kept)."""
        lists = [list(w) for w in word_lists]
        for words in lists:
            for w in words:
                if not isinstance(w, str):
                    raise TokenizerError(f"encode_words takes lists of strings, got a "
                                         f"{type(w).__name__} among the words")
                _check_text(w)
        with _NoPanic(self.source):
            spec = json.loads(self._tk.to_str())
        _prefix_every_word(spec.get("pre_tokenizer"))
        with _NoPanic(self.source):
            tk = _tokenizers().Tokenizer.from_str(json.dumps(spec))
            tk.no_padding()
            if max_length is None:
                tk.no_truncation()
            else:
                need = len(tk.encode([], is_pretokenized=True).ids) + 1
                if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < need:
                    raise TokenizerError(f"max_length must be an integer of at least {need} (the "
                                         f"special tokens and one token), got {max_length!r}")
                tk.enable_truncation(max_length)
        try:
            with _NoPanic(self.source, "encoding words"):
                encs = tk.encode_batch(lists, is_pretokenized=True, add_special_tokens=True)
        except TypeError:
            for words in lists:
                for w in words:
                    _utf8(w)   # a lone surrogate: say so instead of the library's type error
            raise
        return [(e.ids, e.word_ids) for e in encs]

    def encode_pairs(self, texts, pairs=None, max_length: int | None = None):
        """(ids, token type ids) of each text, or of each text and its pair (pairs[i] None:
        none), with the special tokens the tokenizer's template puts around one sequence or two
        (BERT: [CLS] a [SEP] b [SEP], types 0 then 1); with max_length, cut as transformers cuts
        them (the longer sequence first, the special tokens kept)."""
        if isinstance(texts, str) or isinstance(pairs, str):
            raise TokenizerError("encode_pairs takes lists of texts (and of pairs), not a string")
        texts = list(texts)
        pairs = [None] * len(texts) if pairs is None else list(pairs)
        if len(pairs) != len(texts):
            raise TokenizerError(f"{len(texts)} texts and {len(pairs)} pairs")
        for t in (*texts, *(p for p in pairs if p is not None)):
            _check_text(t)
        tk = self._tk
        if max_length is not None:   # on a copy: this tokenizer's own encode does not cut
            two = any(p is not None for p in pairs)
            with _NoPanic(self.source, "encoding texts"):
                need = len(self._tk.encode("", "" if two else None).ids) + (2 if two else 1)
            if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < need:
                raise TokenizerError(f"max_length must be an integer of at least {need} (the "
                                     f"special tokens and one token of each text), got "
                                     f"{max_length!r}")
            tk = _tokenizers().Tokenizer.from_str(self._tk.to_str())
            tk.enable_truncation(max_length, strategy="longest_first")
        tk.no_padding()
        inputs = [t if p is None else (t, p) for t, p in zip(texts, pairs)]
        try:
            with _NoPanic(self.source, "encoding texts"):
                encs = tk.encode_batch_fast(inputs, add_special_tokens=True)
        except TypeError:
            for t in (*texts, *(p for p in pairs if p is not None)):
                _utf8(t)   # a lone surrogate: say so instead of the library's type error
            raise
        return [(e.ids, e.type_ids) for e in encs]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept unless `skip_special_tokens`."""
        ids = _check_ids(ids, self.vocab_size)
        with _NoPanic(self.source, "decoding ids"):
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory, token_types: bool | None = None) -> None:
        """tokenizer.json (with the post-processor that adds BOS / EOS, if any) +
        tokenizer_config.json (special tokens, chat template): `load_tokenizer` and
        `transformers.AutoTokenizer` both load the directory and give the same ids.
        token_types: whether the model takes the template's token type ids (BERT's two
        segments); a RoBERTa or a causal LM does not (its generate() refuses them). None: a
        WordPiece vocabulary (BERT's) with a template that types the second text."""
        cfg = _config_json(self.special_tokens, self.chat_template)
        with _NoPanic(self.source, "saving"):
            body = self._tk.to_str()
            if token_types is None:
                token_types = type(self._tk.model).__name__ == "WordPiece"
            typed = token_types and any(self._tk.encode("a", "b").type_ids)
        # a two-segment template for a model with two types (BERT) gives token_type_ids; else
        # none (PreTrainedTokenizerFast's default has them, and a causal LM's generate() refuses
        # them, a RoBERTa indexes past its one type)
        cfg["model_input_names"] = (["input_ids", "token_type_ids", "attention_mask"] if typed
                                    else ["input_ids", "attention_mask"])
        _write_files(directory, body, cfg)

    # ---- constructors

    @classmethod
    def from_tokenizer_json(cls, path, config: dict | None = None, *,
                            root: str | None = None) -> "BPETokenizer":
        """A tokenizer.json, with a tokenizer_config.json's contents as `config`. `root`: the
        model directory the file was found in, which it must not link out of."""
        tk = _tokenizers()
        path = os.fspath(path)
        text = _read_text(path, root, _MAX_TOKENIZER_FILE)
        try:
            with _NoPanic(path):
                backend = tk.Tokenizer.from_str(text)
        except TokenizerError:
            raise
        except Exception as e:  # the library raises a bare Exception for bad JSON or schema
            raise TokenizerError(f"{path}: not a valid tokenizer.json: {e}") from None
        # The tokenizer.json's own post-processor decides BOS / EOS; transformers (v5) ignores
        # add_bos_token / add_eos_token in the config when a tokenizer.json is present.
        config = {k: v for k, v in (config or {}).items()
                  if k not in ("add_bos_token", "add_eos_token")}
        return cls._with_config(backend, config, path)

    @classmethod
    def from_vocab_merges(cls, vocab_path, merges_path, config: dict | None = None):
        """GPT-2 style vocab.json + merges.txt: byte-level BPE with GPT-2's split, as
        transformers' GPT2Tokenizer builds it (its default special token is <|endoftext|>)."""
        tk = _tokenizers()
        config = dict(config or {})
        try:
            with _NoPanic(f"{vocab_path}, {merges_path}"):
                model = tk.models.BPE.from_file(os.fspath(vocab_path), os.fspath(merges_path))
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"{vocab_path}, {merges_path}: not a valid GPT-2 vocabulary "
                                 f"and merges pair: {e}") from None
        backend = tk.Tokenizer(model)
        prefix = bool(config.get("add_prefix_space", False))
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=prefix)
        backend.decoder = tk.decoders.ByteLevel()
        for name in ("bos_token", "eos_token", "unk_token"):
            config.setdefault(name, "<|endoftext|>")
        config.setdefault("add_bos_token", False)
        config.setdefault("add_eos_token", False)
        return cls._with_config(backend, config, os.fspath(vocab_path))

    @classmethod
    def _with_config(cls, backend, cfg: dict, source: str, named_ids=None) -> "BPETokenizer":
        """Apply a tokenizer config the way transformers' TokenizersBackend does: tokens the
        config declares but the backend lacks are added, and explicit add_bos_token /
        add_eos_token flags (or a missing post-processor) give a new post-processor.
        named_ids: the special tokens' ids where the source gives them (a GGUF file's); those
        tokens are then not added (as llama.cpp matches only control and user-defined tokens
        in the text, a bos id naming a normal token does not make it one)."""
        named = _named_specials(cfg)
        with _NoPanic(source):
            _add_declared_tokens(backend, cfg, named if named_ids is None else {})
            add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
            if add_bos is not None or add_eos is not None or backend.post_processor is None:
                _set_bos_eos(backend, named, bool(add_bos), bool(add_eos), named_ids)
        tok = cls(backend, named, chat_template=cfg.get("chat_template"),
                  extra_eos_ids=cfg.get("_generation_eos_ids", ()), source=source)
        if named_ids is not None:
            tok._named_ids = dict(named_ids)
            tok._special_ids |= frozenset(named_ids.values())
        return tok

    @classmethod
    def from_gguf(cls, path) -> "BPETokenizer":
        """The tokenizer described by a GGUF file's `tokenizer.*` metadata: byte-level BPE
        (`tokenizer.ggml.model == "gpt2"`), split the way `tokenizer.ggml.pre` names, or
        SentencePiece (`"llama"`: tokens and scores, engine/spm_vocab.py)."""
        from .io.gguf import read_metadata
        path = os.fspath(path)
        meta = read_metadata(path)

        def get(key, kind, length=None):
            return _gguf_value(meta, key, kind, path, length)

        kind = get("tokenizer.ggml.model", "str")
        if kind not in ("gpt2", "llama"):
            what = "none" if kind is None else repr(kind)
            raise TokenizerError(f"{path}: GGUF tokenizer model {what} is not supported; "
                                 "tailtune reads byte-level BPE ('gpt2') and SentencePiece "
                                 "('llama') GGUF tokenizers")
        tokens = get("tokenizer.ggml.tokens", "strs")
        if tokens is None:
            raise TokenizerError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens (an array "
                                 "of strings)")
        if len(set(tokens)) != len(tokens):   # llama.cpp asserts they are distinct
            seen = {}
            twice = next(t for i, t in enumerate(tokens) if seen.setdefault(t, i) != i)
            again = tokens.index(twice, seen[twice] + 1)
            raise TokenizerError(f"{path}: GGUF tokenizer.ggml.tokens holds "
                                 f"{_clip(repr(twice), 60)} twice (ids {seen[twice]} and "
                                 f"{again}); llama.cpp refuses such a vocabulary")
        types = get("tokenizer.ggml.token_type", "ints", len(tokens))
        # llama.cpp takes a token as normal when the file gives no types
        kinds = types.tolist() if types is not None else [NORMAL] * len(tokens)
        pre = get("tokenizer.ggml.pre", "str") if kind == "gpt2" else None
        # llama.cpp's defaults for a SentencePiece vocabulary: ids 1 / 2 / 0 for bos / eos /
        # unknown, BOS added (the gpt2 kind has none, bar the Llama 3 group's BOS)
        spm = kind == "llama"
        defaults = {"bos": 1, "eos": 2, "unknown": 0} if spm else {}
        ids = {}
        for k in ("bos", "eos", "unknown", "padding"):
            i = meta.get(f"tokenizer.ggml.{k}_token_id")
            if i is not None and not is_int(i):
                raise TokenizerError(f"{path}: GGUF metadata tokenizer.ggml.{k}_token_id must "
                                     f"be a token id, got {_gguf_type(i)}")
            if i is None or not 0 <= i < len(tokens):   # as llama.cpp: its default instead
                i = defaults.get(k)
            if i is not None and 0 <= i < len(tokens):
                ids[k] = i
        rstrip = _gguf_rstrip(meta, tokens, kinds, path)
        if spm:
            backend = _gguf_spm_backend(path, tokens, kinds, get, ids.get("unknown"), rstrip)
        else:
            backend = _gguf_backend(path, tokens, get("tokenizer.ggml.merges", "strs"), pre,
                                    kinds, rstrip)
        named_ids = {name: ids[key] for name, key in (
            ("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
            ("pad_token", "padding")) if key in ids}
        named = {name: tokens[i] for name, i in named_ids.items()}
        add_bos = get("tokenizer.ggml.add_bos_token", "bool")
        if add_bos is None and (spm or pre in _LLAMA3_GROUP):
            add_bos = True   # llama.cpp's default; Llama 3 GGUFs omit the key
        add_eos = get("tokenizer.ggml.add_eos_token", "bool")
        # end-of-turn ids that are not ids of this vocabulary are ignored, as bos / eos above
        ends = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        cfg = {**named, "chat_template": _gguf_templates(meta, path),
               "_generation_eos_ids": [i for i in ends if is_int(i) and 0 <= i < len(tokens)]}
        if add_bos is not None:
            cfg["add_bos_token"] = add_bos
        if add_eos is not None:
            cfg["add_eos_token"] = add_eos
        tok = cls._with_config(backend, cfg, path, named_ids=named_ids)
        tok.gguf_pre = pre   # a GGUF export writes the same name back
        tok.gguf_token_types = types   # and an unused token unused
        arch = meta.get("general.architecture")
        declared = meta.get(f"{arch}.vocab_size") if isinstance(arch, str) else None
        tok._model_vocab_size = declared if is_int(declared) and declared > 0 else None
        return tok


def _without_prefix(spec) -> tuple[bool, bool]:
    """Take out of a tokenizer.json (a dict, changed in place) what prefixes a space to the
    text's start: a Prepend normalizer, Metaspace's prepend_scheme. (whether anything was,
    whether it also prefixed the text after an added token: a normalizer runs on each stretch
    between added tokens, Metaspace's "first" scheme only on the text's first.)"""
    changed, after_added = False, False
    norm = spec.get("normalizer")
    if isinstance(norm, dict):
        if norm.get("type") == "Prepend":
            spec["normalizer"], changed = None, True
        elif norm.get("type") == "Sequence":
            steps = norm.get("normalizers") or []
            kept = [n for n in steps if not (isinstance(n, dict) and n.get("type") == "Prepend")]
            changed = len(kept) != len(steps)
            norm["normalizers"] = kept
    after_added = changed
    pre = spec.get("pre_tokenizer")
    pres = (pre.get("pretokenizers") or [] if isinstance(pre, dict) and pre.get("type") == "Sequence"
            else [pre])
    for p in pres:
        if isinstance(p, dict) and p.get("type") == "Metaspace" and (
                p.get("prepend_scheme", "never") != "never" or p.get("add_prefix_space")):
            after_added |= p.get("prepend_scheme", "always") == "always"
            p["prepend_scheme"], changed = "never", True
            p.pop("add_prefix_space", None)
    return changed, after_added


def _gguf_templates(meta: dict, path: str):
    """tokenizer.chat_template, plus the named ones llama.cpp's converter writes as
    tokenizer.chat_template.<name> (listed in tokenizer.chat_templates): a string, a dict, or
    None."""
    default = _gguf_value(meta, "tokenizer.chat_template", "str", path)
    names = _gguf_value(meta, "tokenizer.chat_templates", "strs", path) or []
    named = {n: _gguf_value(meta, f"tokenizer.chat_template.{n}", "str", path) for n in names}
    named = {n: t for n, t in named.items() if t is not None}
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}


# What each GGUF tokenizer key must hold: checked on reading, since a model file is untrusted
# and a value of another type would fail later with a Python error that names nothing.
_GGUF_KINDS = {"str": "a string", "bool": "a bool", "strs": "an array of strings",
               "ints": "an array of integers", "floats": "an array of numbers"}


def _gguf_value(meta: dict, key: str, kind: str, path: str, length: int | None = None):
    """meta[key], or None when absent; TokenizerError when it is not of `kind` (or, for an
    array, not `length` long)."""
    v = meta.get(key)
    if v is None:
        return None
    if kind == "str":
        ok = isinstance(v, str)
    elif kind == "bool":
        ok = isinstance(v, bool)
    elif kind == "strs":
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
    else:  # numeric arrays come as 1-D numpy arrays
        ok = getattr(v, "ndim", None) == 1 and v.dtype.kind in ("iu" if kind == "ints" else "iuf")
    if ok and (length is None or len(v) == length):
        return v
    want = _GGUF_KINDS[kind] + (f" of {length} elements (one per token)" if length else "")
    raise TokenizerError(f"{path}: GGUF metadata {key} must be {want}, got {_gguf_type(v)}")


def _gguf_type(v) -> str:
    if hasattr(v, "dtype"):
        return f"an array of {len(v)} {v.dtype}"
    if isinstance(v, list):
        return f"an array of {len(v)} {'strings' if v and isinstance(v[0], str) else 'arrays'}"
    return f"{type(v).__name__} {_clip(repr(v), 60)}"


def _add_declared_tokens(backend, cfg: dict, named: dict) -> None:
    """Tokens a config declares (added_tokens_decoder, the named specials, the extra special
    lists) that the backend does not have yet, added in id order; named ones are special."""
    tk = _tokenizers()
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    decl = cfg.get("added_tokens_decoder")
    decl = decl if isinstance(decl, dict) else {}
    ordered = sorted(decl.items(), key=lambda kv: _declared_id(kv[0]))
    extra = [_added_token(tk, t) for _, t in ordered
             if isinstance(t, dict) and _token_str(t) and t["content"] not in present]
    listed = [*named.values()]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(cfg.get(key), list):
            listed += cfg[key]
    for t in listed:
        s = _token_str(t)
        if s and s not in present and s not in {x.content for x in extra}:
            extra.append(tk.AddedToken(s, special=True, normalized=False))
    backend.add_special_tokens([t for t in extra if t.special])
    backend.add_tokens([t for t in extra if not t.special])


def _declared_id(key) -> int:
    """The id an added_tokens_decoder key names, for ordering. A key that is not a plain number
    of sensible length sorts first: "²" passes isdigit() but not int(), and int() refuses
    numbers of more than 4300 digits."""
    key = str(key)
    return int(key) if key.isdecimal() and len(key) <= 18 else 0


def _added_token(tk, t: dict):
    return tk.AddedToken(t["content"], single_word=bool(t.get("single_word", False)),
                         lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                         normalized=bool(t.get("normalized", not t.get("special", False))),
                         special=bool(t.get("special", False)))


def _set_bos_eos(backend, named: dict, add_bos: bool, add_eos: bool, ids=None) -> None:
    """A post-processor adding BOS / EOS around a single sequence (and a pair), as
    transformers' update_post_processor writes it, with the ids `ids` gives for the names
    (a GGUF file's), else the tokens' ids. Built from its JSON form: the string form
    ("<s>:0 $A:0") would parse the token's text, and a token such as "a b", "a:1" or "$A" would
    break it or be taken for something else."""
    tk = _tokenizers()
    bos, eos = named.get("bos_token"), named.get("eos_token")
    ids = ids or {}
    id_of = {t: ids[n] if n in ids else backend.token_to_id(t)
             for n, t in (("bos_token", bos), ("eos_token", eos)) if t is not None}
    add_bos = add_bos and bos is not None and id_of[bos] is not None
    add_eos = add_eos and eos is not None and id_of[eos] is not None

    def around(seq: str, type_id: int) -> list:
        def special(t):
            return {"SpecialToken": {"id": t, "type_id": type_id}}
        return [*([special(bos)] if add_bos else []), {"Sequence": {"id": seq, "type_id": type_id}},
                *([special(eos)] if add_eos else [])]

    specials = {t: {"id": t, "ids": [id_of[t]], "tokens": [t]}
                for t, on in ((bos, add_bos), (eos, add_eos)) if on}
    spec = {"type": "TemplateProcessing", "single": around("A", 0),
            "pair": around("A", 0) + around("B", 1), "special_tokens": specials}
    # the library builds a post-processor from JSON only as part of a whole tokenizer
    shell = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
             "normalizer": None, "pre_tokenizer": None, "post_processor": spec, "decoder": None,
             "model": {"type": "BPE", "vocab": {}, "merges": []}}
    backend.post_processor = tk.Tokenizer.from_str(json.dumps(shell)).post_processor


# GGUF `tokenizer.ggml.pre` -> how the text is split before BPE. The names and their splits are
# llama.cpp's (llama-vocab.cpp), which is what wrote the name into the file; each split is the
# one in the original model's tokenizer.json. Unknown names are refused rather than guessed:
# a wrong split gives different ids without any error.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The pre names llama.cpp treats as Llama 3's (LLAMA_VOCAB_PRE_TYPE_LLAMA3): a word that is a
# whole vocabulary entry is one token even when the merges cannot build it (ignore_merges, as
# Llama 3's tokenizer.json says too), and BOS is added unless the file says otherwise.
_LLAMA3_GROUP = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})
_PRE_SPLITS = {
    # GPT-2's own split (the regex built into the ByteLevel pre-tokenizer); llama.cpp names it
    # "gpt-2" (files that say "gpt2" are read too)
    "gpt-2": "gpt2", "phi-2": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    # each digit alone, then GPT-2's split: the StarCoder family. SmolLM's tokenizer.json says
    # Digits(individual_digits) + ByteLevel; llama.cpp splits \p{N} first, the same thing.
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits", "minerva-7b": "digits",
    # Llama 3's split (digits in groups of up to three), used by many later BPE models
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    # Qwen2's split: Llama 3's with single digits. (Qwen2's tokenizer.json also NFC-normalizes;
    # llama.cpp does not, nor do we: the two differ only on text that is not in NFC.)
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _pre_tokenizer(tk, pre, path):
    split = _PRE_SPLITS.get(pre)
    if split is None:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not "
                             f"supported; known: {sorted(_PRE_SPLITS)}")
    pt = tk.pre_tokenizers
    if split == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if split == "digits":
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                         use_regex=True)])
    return pt.Sequence([pt.Split(tk.Regex(split), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _gguf_rstrip(meta, tokens, kinds, path) -> frozenset[int]:
    """The ids llama.cpp strips the whitespace after, which it decides by the model's name
    (Phi-3's: spm_vocab.llamacpp_rstrip)."""
    name = _gguf_value(meta, "general.name", "str", path)
    out = llamacpp_rstrip(name, tokens, kinds)
    if out is None:
        raise TokenizerError(f"{path}: general.name {name!r} makes llama.cpp treat the "
                             "vocabulary as Phi-3's, and it lacks one of </s>, <unk>, <s>, "
                             "<|endoftext|>, which llama.cpp then fails on")
    return out


def _gguf_backend(path, tokens, merges, pre, kinds, rstrip):
    """vocab + merges + pre-tokenizer -> tokenizers.Tokenizer. Control (and unknown) tokens
    become special added tokens and user-defined ones plain added tokens, so all match whole
    in the text; rstrip: the ids that take the whitespace after them (llama.cpp's Phi-3)."""
    if merges is None:
        raise TokenizerError(f"{path}: GGUF metadata lacks tokenizer.ggml.merges (an array of "
                             "strings), which a byte-level BPE ('gpt2') vocabulary needs")
    tk = _tokenizers()
    b2u = _byte_to_unicode()
    alphabet = set(b2u.values())
    # Byte-level vocabularies spell every byte with GPT-2's printable characters; a token with
    # any other character is respelled from its UTF-8 bytes (transformers does the same).
    # Control, unknown and user-defined tokens are matched whole in the text, not merged:
    # those keep their own spelling (DeepSeek's "<｜User｜>", a token with a space).
    spelled = [t if set(t) <= alphabet or k in (UNKNOWN, CONTROL, USER_DEFINED)
               else "".join(b2u[b] for b in t.encode("utf-8")) for t, k in zip(tokens, kinds)]
    vocab = {t: i for i, t in enumerate(spelled)}
    bad = next((m for m in merges if " " not in m), None)
    if bad is not None:
        raise TokenizerError(f"{path}: GGUF tokenizer.ggml.merges entry {_clip(repr(bad), 60)} "
                             "is not two tokens separated by a space")
    try:
        with _NoPanic(path, "GGUF vocabulary and merges"):
            model = tk.models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                  fuse_unk=False, dropout=None, ignore_merges=pre in _LLAMA3_GROUP)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"{path}: GGUF vocabulary and merges do not form a BPE model: "
                             f"{e}") from None
    backend = tk.Tokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(tk, pre, path)
    backend.decoder = tk.decoders.ByteLevel()
    with _NoPanic(path, "GGUF control and user-defined tokens"):
        add_matched_tokens(tk, backend, tokens, kinds, rstrip)
    return backend


def _gguf_spm_backend(path, tokens, kinds, get, unk_id, rstrip):
    """A SentencePiece ("llama") vocabulary -> tokenizers.Tokenizer (engine/spm_vocab.py)."""
    scores = get("tokenizer.ggml.scores", "floats", len(tokens))
    if scores is None:
        # llama.cpp would score every token 0 and merge leftmost first, which no BPE ranks
        raise TokenizerError(f"{path}: GGUF SentencePiece vocabulary without "
                             "tokenizer.ggml.scores: the scores decide how text is merged")
    if not np.isfinite(scores).all():
        raise TokenizerError(f"{path}: GGUF tokenizer.ggml.scores holds NaN or infinite values")
    prefix = get("tokenizer.ggml.add_space_prefix", "bool")
    unk = tokens[unk_id] if unk_id is not None else None
    try:
        with _NoPanic(path, "GGUF SentencePiece vocabulary"):
            return spm_backend(_tokenizers(), tokens, scores, kinds, unk,
                               True if prefix is None else prefix, rstrip)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"{path}: GGUF SentencePiece vocabulary does not form a "
                             f"tokenizer: {e}") from None
