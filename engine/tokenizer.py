"""Tokenizers and chat templates.

Two kinds:
- `ByteTokenizer`: no dependencies; ids 0..255 are the UTF-8 bytes of the text, 256 is an
  optional end-of-text token. For models trained from scratch.
- `BPETokenizer`: byte-level BPE from a Hugging Face `tokenizer.json`, GPT-2 style
  `vocab.json` + `merges.txt`, or the `tokenizer.ggml.*` metadata of a GGUF file. The BPE itself
  runs in the maintained `tokenizers` library (the `tailtune[hf]` extra), so ids match
  `transformers` by construction instead of by a re-implementation we would have to keep in step.

`load_tokenizer(path)` picks the right one. Chat templates come from model files, which are
untrusted: they are rendered in Jinja's immutable sandbox, set up the way `transformers` does it
so prompts match `apply_chat_template` character for character.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from datetime import datetime

from .errors import CheckpointError, InputError, optional_import


class TokenizerError(CheckpointError):
    """Tokenizer files that are missing, corrupt, unsupported, or that do not fit the model.
    A kind of CheckpointError: the tokenizer is part of the model's files."""


class ChatTemplateError(TokenizerError):
    """A chat template that is missing, invalid, unsafe, or that rejected the messages."""


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
    if os.path.isfile(tj):
        return BPETokenizer.from_tokenizer_json(tj, cfg)
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return BPETokenizer.from_vocab_merges(vocab, merges, cfg)
    if os.path.isfile(os.path.join(d, "tokenizer.model")):
        raise TokenizerError(f"{d}: holds only a SentencePiece tokenizer.model, which tailtune "
                             "does not read; save the tokenizer with transformers "
                             "(save_pretrained) to get a tokenizer.json")
    # (a directory holding only a .gguf never gets here: resolve_model_path gives its file)
    raise TokenizerError(f"{d}: no tokenizer files (looked for {', '.join(_HF_FILES)})")


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read {what}: {e}") from None


def _read_hf_config(d: str) -> dict:
    """tokenizer_config.json over special_tokens_map.json, with the chat template files that
    transformers (v4.43+) writes beside them; they win over a template inside the config."""
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            data = _read_json(p, name)
            if not isinstance(data, dict):
                raise TokenizerError(f"{p}: expected a JSON object")
            cfg.update(data)
    templates = _template_dict(cfg.get("chat_template"))
    jinja = os.path.join(d, "chat_template.jinja")
    if os.path.isfile(jinja):
        templates["default"] = _read_text(jinja)
    extra = os.path.join(d, "additional_chat_templates")
    if os.path.isdir(extra):
        for f in sorted(os.listdir(extra)):
            if f.endswith(".jinja"):
                templates[f[:-len(".jinja")]] = _read_text(os.path.join(extra, f))
    cfg["chat_template"] = _template_value(templates)
    gen = os.path.join(d, "generation_config.json")
    if os.path.isfile(gen):
        eos = _read_json(gen, "generation_config.json")
        eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
        cfg["_generation_eos_ids"] = [eos] if isinstance(eos, int) else list(
            eos if isinstance(eos, list) else [])
    return cfg


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from None


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
    cfg = _read_json(p, "config.json")
    if not isinstance(cfg, dict):
        return None
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


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

    def _named_id(self, name: str) -> int | None:
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
        if self.vocab_size > model_vocab_size:
            past = list(range(model_vocab_size, self.vocab_size))
            named = ", ".join(repr(self.decode([i])) for i in past[:5]) + (", ..." if len(past) > 5 else "")
            hint = ("this tokenizer belongs to a different model" if len(past) > 16 else
                    f"the token(s) {named} are past the model's vocabulary: a token the tokenizer "
                    "config declares (eos_token, pad_token, additional_special_tokens) that the "
                    "vocabulary lacks, say a typo, or a token added without resizing the model")
            raise TokenizerError(
                f"tokenizer ids run to {self.vocab_size - 1} but the model's vocabulary has "
                f"{model_vocab_size} entries (ids 0..{model_vocab_size - 1}): {hint}")

    def chat_prompt(self, messages, add_generation_prompt: bool = True, *, tools=None,
                    documents=None, template: str | None = None, **kwargs) -> str:
        """The model's own chat template rendered for `messages` ([{"role", "content"}, ...]),
        as `transformers`' `apply_chat_template(..., tokenize=False)` renders it. Extra keyword
        arguments become template variables. `template` names one of several templates."""
        source = self._select_template(template, tools)
        variables = {**self.special_tokens, **kwargs}
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

    def save(self, directory) -> None:
        """tokenizer.json + tokenizer_config.json: a byte-level BPE with no merges, which is this
        tokenizer exactly, so transformers loads the directory too; the config marks it so
        `load_tokenizer` gives back a ByteTokenizer (no dependencies)."""
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


def _tokenizers():
    return optional_import("tokenizers", error=TokenizerError, what="BPE tokenizers")


class BPETokenizer(_Tokenizer):
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: the named special tokens
    and the chat template. Whether BOS / EOS are added lives in the backend's post-processor.
    Build with `load_tokenizer` or the `from_*` constructors."""

    def __init__(self, backend, special_tokens: dict, *, chat_template=None, extra_eos_ids=(),
                 source: str = "<memory>"):
        self._tk = backend
        # Encoding never truncates or pads: a tokenizer.json may carry settings for either,
        # which transformers also switches off unless asked per call.
        self._tk.no_truncation()
        self._tk.no_padding()
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._extra_eos = [i for i in extra_eos_ids if isinstance(i, int)]
        self.source = source
        self._model_vocab_size = None  # set from GGUF metadata
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self._vocab_size = 1 + max(vocab.values(), default=-1)
        added = self._tk.get_added_tokens_decoder()
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`. Special-token strings in the text (e.g. `<|im_end|>`) become their
        single ids, as in transformers. BOS / EOS are added only where the model's tokenizer
        config says so (`add_special_tokens=False` never adds them). Bytes the vocabulary has no
        token for are dropped, as the reference tokenizer drops them."""
        _check_text(text)
        try:
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _utf8(text)  # a lone surrogate: say so instead of the library's type error
            raise

    def encode_batch(self, texts, add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts, in parallel inside the tokenizers library."""
        texts = list(texts)
        for t in texts:
            _check_text(t)
        try:
            encs = self._tk.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            for t in texts:
                _utf8(t)  # a lone surrogate: say so instead of the library's type error
            raise
        return [e.ids for e in encs]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens are kept unless `skip_special_tokens`."""
        return self._tk.decode(_check_ids(ids, self.vocab_size),
                               skip_special_tokens=skip_special_tokens)

    def save(self, directory) -> None:
        """tokenizer.json (with the post-processor that adds BOS / EOS, if any) +
        tokenizer_config.json (special tokens, chat template): `load_tokenizer` and
        `transformers.AutoTokenizer` both load the directory and give the same ids."""
        cfg = _config_json(self.special_tokens, self.chat_template)
        _write_files(directory, self._tk.to_str(), cfg)

    # ---- constructors

    @classmethod
    def from_tokenizer_json(cls, path, config: dict | None = None) -> "BPETokenizer":
        """A tokenizer.json, with a tokenizer_config.json's contents as `config`."""
        tk = _tokenizers()
        path = os.fspath(path)
        try:
            backend = tk.Tokenizer.from_file(path)
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
            model = tk.models.BPE.from_file(os.fspath(vocab_path), os.fspath(merges_path))
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
    def _with_config(cls, backend, cfg: dict, source: str) -> "BPETokenizer":
        """Apply a tokenizer config the way transformers' TokenizersBackend does: tokens the
        config declares but the backend lacks are added, and explicit add_bos_token /
        add_eos_token flags (or a missing post-processor) give a new post-processor."""
        named = _named_specials(cfg)
        _add_declared_tokens(backend, cfg, named)
        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        if add_bos is not None or add_eos is not None or backend.post_processor is None:
            _set_bos_eos(backend, named, bool(add_bos), bool(add_eos))
        return cls(backend, named, chat_template=cfg.get("chat_template"),
                   extra_eos_ids=cfg.get("_generation_eos_ids", ()), source=source)

    @classmethod
    def from_gguf(cls, path) -> "BPETokenizer":
        """The tokenizer described by a GGUF file's `tokenizer.*` metadata (byte-level BPE,
        `tokenizer.ggml.model == "gpt2"`), split the way `tokenizer.ggml.pre` names."""
        from .io.gguf import read_metadata
        path = os.fspath(path)
        meta = read_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            what = {"llama": "SentencePiece ('llama')", None: "none"}.get(kind, repr(kind))
            raise TokenizerError(f"{path}: GGUF tokenizer model {what} is not supported; "
                                 "tailtune reads byte-level BPE ('gpt2') GGUF tokenizers")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not isinstance(merges, list):
            raise TokenizerError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens or "
                                 "tokenizer.ggml.merges (string arrays)")
        backend = _gguf_backend(path, meta, tokens, merges)
        named = {}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(i, int) and 0 <= i < len(tokens):
                named[name] = tokens[i]
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None and meta.get("tokenizer.ggml.pre") in _LLAMA3_GROUP:
            add_bos = True   # llama.cpp's default for this group; Llama 3 GGUFs omit the key
        add_eos = meta.get("tokenizer.ggml.add_eos_token")
        cfg = {**named, "chat_template": meta.get("tokenizer.chat_template"),
               "_generation_eos_ids": [meta.get(f"tokenizer.ggml.{k}_token_id")
                                       for k in ("eot", "eom")]}
        if add_bos is not None:
            cfg["add_bos_token"] = bool(add_bos)
        if add_eos is not None:
            cfg["add_eos_token"] = bool(add_eos)
        tok = cls._with_config(backend, cfg, path)
        arch = meta.get("general.architecture")
        declared = meta.get(f"{arch}.vocab_size")
        tok._model_vocab_size = declared if isinstance(declared, int) else None
        return tok


def _add_declared_tokens(backend, cfg: dict, named: dict) -> None:
    """Tokens a config declares (added_tokens_decoder, the named specials, the extra special
    lists) that the backend does not have yet, added in id order; named ones are special."""
    tk = _tokenizers()
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    decl = cfg.get("added_tokens_decoder")
    decl = decl if isinstance(decl, dict) else {}
    ordered = sorted(decl.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
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


def _added_token(tk, t: dict):
    return tk.AddedToken(t["content"], single_word=bool(t.get("single_word", False)),
                         lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                         normalized=bool(t.get("normalized", not t.get("special", False))),
                         special=bool(t.get("special", False)))


def _set_bos_eos(backend, named: dict, add_bos: bool, add_eos: bool) -> None:
    """A post-processor adding BOS / EOS around a single sequence (and a pair), as
    transformers' update_post_processor writes it."""
    tk = _tokenizers()
    bos, eos = named.get("bos_token"), named.get("eos_token")
    add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = (f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1"
            f"{' ' + eos + ':1' if add_eos else ''}")
    specials = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = tk.processors.TemplateProcessing(single=single, pair=pair,
                                                              special_tokens=specials)


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
    # GPT-2's own split (the regex built into the ByteLevel pre-tokenizer)
    "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
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


# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


def _gguf_backend(path, meta, tokens, merges):
    """vocab + merges + pre-tokenizer -> tokenizers.Tokenizer. Control tokens become special
    added tokens and user-defined ones plain added tokens, so both match whole in the text."""
    tk = _tokenizers()
    b2u = _byte_to_unicode()
    alphabet = set(b2u.values())
    # Byte-level vocabularies spell every byte with GPT-2's printable characters; a token with
    # any other character is respelled from its UTF-8 bytes (transformers does the same).
    spelled = [t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        model = tk.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, dropout=None,
                              ignore_merges=meta.get("tokenizer.ggml.pre") in _LLAMA3_GROUP)
    except Exception as e:
        raise TokenizerError(f"{path}: GGUF vocabulary and merges do not form a BPE model: "
                             f"{e}") from None
    backend = tk.Tokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(tk, meta.get("tokenizer.ggml.pre"), path)
    backend.decoder = tk.decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and len(types) == len(tokens):
        types = [int(x) for x in types]
        # A control token spelled outside the byte alphabet is a mislabel in the file: adding
        # it would create an id past the model's vocabulary.
        control = [tk.AddedToken(t, special=True, normalized=False)
                   for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
        user = [tk.AddedToken(t, special=False, normalized=False)
                for t, s, k in zip(tokens, spelled, types) if k == _USER_DEFINED and t == s]
        backend.add_special_tokens(control)
        backend.add_tokens(user)
    return backend


# --------------------------------------------------------------------------------------------
# Chat templates


# A template must not exhaust memory or time with one operator.
_MAX_BUILD = 1_000_000   # longest string / list one `*` may build
_MAX_POWER_BITS = 1_000_000  # largest integer `**` may build, in bits (2 ** 10 ** 9: minutes)


def _jinja():
    return optional_import("jinja2", "jinja2.ext", "jinja2.sandbox", error=ChatTemplateError,
                           what="chat templates")


@functools.lru_cache(maxsize=1)
def _environment():
    """Jinja's immutable sandbox with transformers' settings and helpers. The sandbox refuses
    underscore attributes (the way to Python internals), unsafe callables and in-place changes
    to the caller's objects; we also bound `*` and `**`, so a template cannot make one huge
    string or number."""
    jinja2 = _jinja()
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            _check_binop(jinja2, operator, left, right)
            return super().call_binop(context, operator, left, right)

        def unsafe_undefined(self, obj, attribute):
            # Jinja returns an Undefined that prints as "" and fails only when used further;
            # a template reaching for Python internals should fail right there, visibly.
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        assistant masks; rendering keeps the body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
            return call.set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = Environment(trim_blocks=True, lstrip_blocks=True,
                      extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class(jinja2)
    return env


def _check_binop(jinja2, operator, left, right) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                    and len(seq) * n > _MAX_BUILD):
                raise jinja2.exceptions.SecurityError(
                    f"the template repeats a sequence of {len(seq)} items {n} times "
                    f"(more than {_MAX_BUILD} in all)")
    elif (isinstance(left, int) and isinstance(right, int) and right > 0
          and abs(left).bit_length() * right > _MAX_POWER_BITS):
        raise jinja2.exceptions.SecurityError(
            f"the template raises an integer to the power {right}: more than "
            f"{_MAX_POWER_BITS} bits")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateRaised(Exception):
    """raise_exception(...) called by the template: it rejects the conversation."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _namespace_class(jinja2):
    class Namespace(jinja2.utils.Namespace):
        """Jinja's namespace, refusing underscore names (they could shadow internals)."""

        def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r}: underscore names are not allowed")

    return Namespace


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    jinja2 = _jinja()
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): "
                                f"{e.message}") from None


def render_chat_template(source: str, messages, add_generation_prompt: bool = True,
                         **variables) -> str:
    """Render a chat template in the sandbox. Messages are copied to plain JSON data first, so
    the template never sees the caller's objects; keys whose value is None are dropped, as
    transformers drops them (templates test for a missing key, not for None)."""
    jinja2 = _jinja()
    template = _compile(source)
    chat = [_message(m) for m in messages]
    variables = {k: _plain(v) for k, v in variables.items()}
    try:
        return template.render(messages=chat, add_generation_prompt=bool(add_generation_prompt),
                               **variables)
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried an operation the sandbox forbids "
                                f"(model files are untrusted; refusing to render): {e}") from None
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError,
            OverflowError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None


def _message(m) -> dict:
    if not isinstance(m, dict):
        raise InputError(f"chat messages must be dicts like {{'role': ..., 'content': ...}}, "
                         f"got {type(m).__name__}")
    return {k: _plain(v) for k, v in m.items() if v is not None}


def _plain(v):
    """JSON-like data rebuilt from plain types; anything else becomes an inert '<TypeName>'
    string (objects could carry methods the sandbox does not know to be dangerous)."""
    if v is None or type(v) in (str, int, float, bool):
        return v
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, int):
        return int.__int__(v)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    if isinstance(v, tuple) and type(v) is tuple:
        return tuple(_plain(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():
        return _plain(v.item())  # a numpy scalar
    return f"<{type(v).__name__}>"
