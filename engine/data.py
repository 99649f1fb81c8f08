"""Training data: text or JSONL files -> token arrays cached on disk (memmap) -> batches.

A data file is tokenized once; the result is stored under a key made of the file's bytes, the
tokenizer's fingerprint and the rendering options, and memory-mapped on later runs.

Formats:
  .txt    one token stream; examples are consecutive windows of seq_len + 1 tokens
  .jsonl  one example per line: {"prompt": ..., "completion": ...} or {"messages": [...]};
          loss only on the completion / the assistant turns. With a chat template (instruct
          models) a prompt/completion row is rendered as a user turn and an assistant turn.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import numpy as np

from .errors import InputError, is_int
from .model import IGNORE
from .tokenizer import ChatTemplateError

# 2: the file kind in the key, BOMs stripped, a text file's short last window; 3: no loss after
# an assistant turn's end token, one EOS where the tokenizer adds its own, text line ends as "\n";
# 4: the end token is the template's, not one inside the content; 5: a completion or chat turn
# tokenized as it continues the text before it (no second SentencePiece space prefix)
CACHE_VERSION = 5


def cache_root() -> str:
    return os.environ.get("TAILTUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tailtune")


class TokenData:
    """Tokens (int32), loss mask (uint8) and example boundaries, memory-mapped from the cache."""

    def __init__(self, tokens, mask, offsets, kind, source, key=""):
        self.tokens, self.mask, self.offsets = tokens, mask, offsets  # (n,), (n,), (E + 1,)
        self.kind = kind              # "text" or "examples"
        self.source = source
        self.key = key                # hash of the file and the tokenizer
        self.file_hash = ""           # hash of the file's bytes alone (a resumed run checks it)

    @property
    def n_examples(self) -> int:
        return len(self.offsets) - 1

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]


# ---- reading and tokenizing ---------------------------------------------------------------
def read_rows(path: str, check: bool = True):
    """(line number, row) of each JSONL row, checked as a prompt / completion or messages row
    (unless check is False), one at a time (a large file is never held parsed whole); errors
    name the file and the line."""
    first = True   # the first line that is not blank
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):   # a BOM (Notepad, PowerShell)
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw, e.start, "JSONL") from None
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):   # the file is one JSON array (an export)
                raise InputError(
                    f"{path}:{n}: a JSON array; tailtune reads JSONL, one JSON object per line "
                    "(convert it with: python -c \"import json, sys; [print(json.dumps(r)) for r "
                    f"in json.load(open(sys.argv[1]))]\" {path} > data.jsonl)")
            first = False
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield n, _check_row(row, f"{path}:{n}") if check else row


def _check_row(row, where):
    """row, checked (errors start with `where`: file:line, or rows[i])."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise InputError(f"{where}: each message needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(f"{where}: no assistant message, so nothing to learn from")
        return {"messages": msgs}
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return {"prompt": row["prompt"], "completion": row["completion"]}
    raise InputError(f"{where}: a row needs 'prompt' and 'completion' strings, or 'messages'")


def _file_kind(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such data file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: the data file is empty")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return "examples"
    if ext in (".txt", ".text", ".md", ".py", ""):
        return "text"
    raise InputError(f"{path}: unknown data format {ext!r} (use .txt or .jsonl)")


def _encode_example(tok, row, use_template, head):
    """(ids, mask) of one row: mask 1 on the tokens the loss is computed on. head: what the
    tokenizer puts before a text (a BOS; _added_around)."""
    if "messages" in row:
        msgs = row["messages"]
    elif use_template:
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    else:
        # the prompt takes what the tokenizer puts before a text (a BOS), not what it puts
        # after (an EOS would sit between prompt and completion); the completion ends in EOS
        p = head + tok.encode(row["prompt"], add_special_tokens=False)
        c = list(_with_eos(_continued(tok, row["completion"], row["prompt"]), tok.eos_id))
        return p + c, [0] * len(p) + [1] * len(c)
    if not use_template:
        raise InputError("'messages' rows need a tokenizer with a chat template")
    return _chat_segments(tok, msgs)


def _continued(tok, text, previous):
    """Ids of `text` after `previous` (tok.encode_continuation; a tokenizer of the caller's own
    with only `encode` gives encode's ids)."""
    f = getattr(tok, "encode_continuation", None)
    return f(text, previous) if f else tok.encode(text, add_special_tokens=False)


def _chat_segments(tok, msgs):
    """Render the conversation turn by turn: each assistant turn is the text the template adds
    between the prompt for it (with the generation prompt) and the conversation including it."""
    ids, mask, done = [], [], ""
    stops = set(tok.eos_ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        full = tok.chat_prompt(msgs[:i + 1], add_generation_prompt=False)
        if i:
            prompt = tok.chat_prompt(msgs[:i], add_generation_prompt=True)
        else:   # an opening assistant turn: the prompt is what the template puts before its
            # content (a default system prompt, the role header), found through a placeholder
            mark = "\x00tailtune-content\x00"
            head = tok.chat_prompt([{**m, "content": mark}], add_generation_prompt=False)
            if mark not in head:
                raise InputError("the chat template changes message contents; cannot tell the "
                                 "opening assistant turn's prompt apart")
            prompt = head[:head.index(mark)]
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InputError("the chat template does not render conversations prefix by prefix; "
                             "cannot tell assistant turns apart")
        for before, text, m_val in ((done, prompt[len(done):], 0),
                                    (prompt, full[len(prompt):], 1)):
            seg = _continued(tok, text, before) if text else []
            ids += seg
            mask += ([0] * len(seg) if m_val == 0
                     else _through_turn_end(tok, seg, text, m["content"], stops))
        done = full
    return ids, mask


def _through_turn_end(tok, seg, text, content, stops):
    """The loss mask of an assistant turn's tokens `seg` (of `text`, its content as rendered
    and what the template writes after it): 1 up to and including the end-of-turn token the
    template writes, 0 after it. What follows that token (ChatML's newline after <|im_end|>)
    is never generated (generation stops at the token), so it is not trained, as transformers'
    assistant-token masks leave it out. A template that ends turns with no such token trains
    the whole turn, even when the content itself holds one."""
    at = text.find(content) if content else -1
    after = text[at + len(content):] if at >= 0 else text   # what the template adds after it
    if not any(t in stops for t in tok.encode(after, add_special_tokens=False)):
        return [1] * len(seg)
    end = max(i for i, t in enumerate(seg) if t in stops)    # the template's: it comes last
    return [1] * (end + 1) + [0] * (len(seg) - end - 1)


def tokenize_file(path: str, tok, use_template: bool | None = None, cache_dir: str | None = None,
                  log=None) -> TokenData:
    """Tokenize `path` once (cached on disk under a key of its contents and the tokenizer)."""
    kind = _file_kind(path)
    if use_template is None:
        use_template = bool(tok.chat_template)
    h = _hash_file(path)
    file_hash = h.hexdigest()[:32]
    h.update(f"|{kind}|{tok.fingerprint()}|{use_template}|{CACHE_VERSION}".encode())
    key = h.hexdigest()[:32]
    data = _tokenize(path, kind, key, tok, use_template, cache_dir, log, file_hash)
    data.file_hash = file_hash
    return data


def from_rows(tok, rows, use_template: bool | None = None) -> TokenData:
    """Rows in memory, as a JSONL file holds them ({"prompt": ..., "completion": ...} or
    {"messages": [...]}), tokenized as tokenize_file would (the same ids and loss mask)."""
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise InputError(f"rows: expected a list of row dicts, got {type(rows).__name__}")
    if use_template is None:
        use_template = bool(tok.chat_template)
    head = _added_around(tok)[0]
    ids_parts, mask_parts = [], []
    for n, row in enumerate(rows):
        where = f"rows[{n}]"
        row = _check_row(row, where)
        try:
            ids, ms = _encode_example(tok, row, use_template, head)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: {e}") from None
        except ValueError as e:   # e.g. a lone surrogate ("\ud83d", a cut emoji)
            raise InputError(f"{where}: cannot encode this row ({e})") from None
        ids_parts.append(np.asarray(ids, np.int32))
        mask_parts.append(np.asarray(ms, np.uint8))
    if not ids_parts:
        raise InputError("rows: no examples")
    return _in_memory(ids_parts, mask_parts, "examples",
                      f"|examples|{tok.fingerprint()}|{use_template}|{CACHE_VERSION}")


def from_text(tok, text: str) -> TokenData:
    """A text in memory as one token stream, as tokenize_file reads a .txt file."""
    if not isinstance(text, str):
        raise InputError(f"text: expected a str, got {type(text).__name__}")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")   # as _read_text
    tokens = np.asarray(_with_eos(encode_text(tok, text), tok.eos_id), np.int32)
    return _in_memory([tokens], None, "text", f"|text|{tok.fingerprint()}|{CACHE_VERSION}")


def from_tokens(sequences, masks=None) -> TokenData:
    """Token id sequences, one example each; masks (same lengths, 0/1) mark the tokens the
    loss is computed on (default: all)."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
        raise InputError("sequences: expected a list of sequences (or a 2-D array), got one 1-D array")
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__iter__"):
        raise InputError(f"sequences: expected a list of sequences, got {type(sequences).__name__}")
    ids_parts = []
    for n, seq in enumerate(sequences):
        a = np.asarray(seq)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise InputError(f"sequences[{n}]: expected a 1-D sequence of integer token ids")
        if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
            raise InputError(f"sequences[{n}]: token ids must be >= 0 and fit in int32")
        ids_parts.append(a.astype(np.int32))
    if not ids_parts:
        raise InputError("sequences: no examples")
    mask_parts = None
    if masks is not None:
        mask_parts = [np.asarray(m) for m in masks]
        if len(mask_parts) != len(ids_parts):
            raise InputError(f"masks: {len(mask_parts)} masks for {len(ids_parts)} sequences")
        for n, (m, a) in enumerate(zip(mask_parts, ids_parts)):
            if m.shape != a.shape or not np.isin(m, (0, 1)).all():
                raise InputError(f"masks[{n}]: expected {len(a)} values of 0 or 1 (one per token)")
        mask_parts = [m.astype(np.uint8) for m in mask_parts]
    return _in_memory(ids_parts, mask_parts, "examples", f"|tokens|{CACHE_VERSION}")


def _in_memory(ids_parts, mask_parts, kind, salt) -> TokenData:
    """TokenData over arrays in memory, keyed (for the disk prefix cache) by their contents."""
    tokens = np.concatenate(ids_parts)
    mask = np.concatenate(mask_parts) if mask_parts is not None else np.ones(len(tokens), np.uint8)
    offsets = np.cumsum([0] + [len(a) for a in ids_parts]).astype(np.int64)
    if len(tokens) < 2:
        raise InputError(f"too little data to train on ({len(tokens)} tokens)")
    h = hashlib.sha256()
    for a in (tokens, mask, offsets):
        h.update(np.ascontiguousarray(a).data)
    data = TokenData(tokens, mask, offsets, kind, "<memory>", "")
    data.file_hash = h.hexdigest()[:32]
    h.update(salt.encode())
    data.key = h.hexdigest()[:32]
    return data


def _hash_file(path: str):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _tokenize(path, kind, key, tok, use_template, cache_dir, log, file_hash) -> TokenData:
    """The cache entry `key`, or the file tokenized and stored there."""
    d = os.path.join(cache_dir or os.path.join(cache_root(), "data"), key)
    if os.path.isfile(os.path.join(d, "meta.json")):
        data = _load_cached(d, path)
        if data is not None:
            return data
        if log:  # it is only a cache: rebuild it
            log(f"note: the cached tokens in {d} are damaged; tokenizing again")
    if log:
        log(f"tokenizing {path} (cached afterwards in {d})")
    if kind == "text":
        tokens = np.asarray(_with_eos(encode_text(tok, _read_text(path)), tok.eos_id), np.int32)
        mask = np.ones(len(tokens), np.uint8)
        offsets = np.array([0, len(tokens)], np.int64)
    else:
        # each example's ids become arrays at once: Python lists of ints cost ~60 bytes a
        # token (a 100 MB file peaked at 1.8 GB), the arrays 5
        ids_parts, mask_parts = [], []
        head = _added_around(tok)[0]
        said = time.perf_counter()
        for n, r in read_rows(path):
            try:
                ids, ms = _encode_example(tok, r, use_template, head)
            except (InputError, ChatTemplateError) as e:   # name the row the template refused
                raise type(e)(f"{path}:{n}: {e}") from None
            except ValueError as e:   # e.g. a lone surrogate ("\ud83d", a cut emoji)
                raise InputError(f"{path}:{n}: cannot encode this row ({e})") from None
            ids_parts.append(np.asarray(ids, np.int32))
            mask_parts.append(np.asarray(ms, np.uint8))
            if log and time.perf_counter() - said > 30:   # a big file takes minutes
                said = time.perf_counter()
                log(f"tokenizing {path}: {len(ids_parts):,} rows so far (line {n:,})")
        if not ids_parts:
            raise InputError(f"{path}: no examples in the file")
        tokens, mask = np.concatenate(ids_parts), np.concatenate(mask_parts)
        offsets = np.cumsum([0] + [len(a) for a in ids_parts]).astype(np.int64)
        del ids_parts, mask_parts
    if len(tokens) < 2:
        raise InputError(f"{path}: too little text to train on ({len(tokens)} tokens)")
    # the key names the bytes hashed before tokenizing: tokens of other bytes must not be
    # stored under it (a file still being written when the run started)
    if _hash_file(path).hexdigest()[:32] != file_hash:
        raise InputError(f"{path} changed while it was being tokenized (is something still "
                         "writing it?); run again once the file is complete")
    try:
        _store(d, tokens, mask, offsets, {"kind": kind, "source": os.path.abspath(path)})
    except OSError as e:   # a read-only home, a full disk: it is only a cache
        if log:
            log(f"note: cannot cache the tokens in {d} ({e.strerror or e}); kept in memory "
                "(set TAILTUNE_CACHE to a writable directory to cache them)")
        return TokenData(tokens, mask, offsets, kind, path, key)
    data = _load_cached(d, path)
    if data is None:
        raise InputError(f"{d}: the tokenized data just written there cannot be read back")
    return data


TEXT_CHUNK = 1 << 20   # characters per encode call of a long text


def encode_text(tok, text: str, chunk: int = TEXT_CHUNK) -> np.ndarray:
    """tok.encode(text) as int32, for a text of any length. One encode call over a whole file
    holds ~170 bytes per character (a 30 MB file: 5.2 GB), so a long text is encoded in pieces
    that end after a newline standing alone between two non-space characters: a byte-level
    BPE's pre-tokenizer always splits on both sides of it, so the ids are the same (after a run
    of whitespace it would not: at a text's end the run is one piece, inside it is not). Each
    cut is checked (the two lines around it encoded together and apart); a tokenizer that does
    not split there (one that marks the start of a text, as SentencePiece does) gets the single
    call instead."""
    if len(text) <= chunk:
        return np.asarray(tok.encode(text), np.int32)
    cuts, at = [], chunk
    while at < len(text):
        nl = text.find("\n", at)   # a newline alone between two non-space characters
        while nl != -1 and nl + 1 < len(text) and (text[nl + 1].isspace() or text[nl - 1].isspace()):
            nl = text.find("\n", nl + 1)
        if nl == -1 or nl + 1 >= len(text):
            break
        cuts.append(nl + 1)
        at = nl + 1 + chunk
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for c in cuts:   # the lines on either side of each cut
        before = text[text.rfind("\n", 0, c - 1) + 1:c]
        after = text[c:text.find("\n", c) + 1 or len(text)]
        if tok.encode(before + after, add_special_tokens=False) != (
                tok.encode(before, add_special_tokens=False) + tok.encode(after, add_special_tokens=False)):
            return np.asarray(tok.encode(text), np.int32)
    head, tail = _added_around(tok)
    parts = [np.asarray(head, np.int32)]
    # a few pieces at a time through encode_batch, which the tokenizers library runs on every
    # core (1.4x faster on 2 busy cores); any object with encode alone works too
    group = max(1, min(4, os.cpu_count() or 1))
    batch = getattr(tok, "encode_batch", None) or (lambda ps, **kw: [tok.encode(p, **kw) for p in ps])
    for g in range(0, len(pieces), group):
        parts += [np.asarray(ids, np.int32)
                  for ids in batch(pieces[g:g + group], add_special_tokens=False)]
    parts.append(np.asarray(tail, np.int32))
    return np.concatenate(parts)


def _added_around(tok) -> tuple[list, list]:
    """What tok.encode(text) adds before and after the text's own ids (a BOS, an EOS: the
    tokenizer's post-processor), found on a sample."""
    bare, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    at = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def _with_eos(ids, eos_id):
    """ids ending with one EOS: added unless the tokenizer's post-processor (or the text) put
    it there already (two in a row would train EOS -> EOS)."""
    if eos_id is None or (len(ids) and ids[-1] == eos_id):
        return ids
    return np.append(np.asarray(ids, np.int32), np.int32(eos_id))


def _read_text(path: str) -> str:
    """A text file as UTF-8 (a BOM dropped), with Windows and old Mac line ends read as "\n",
    as Python's text mode reads them (else the model would learn to write "\r"); a byte that is
    not UTF-8 is named by line and column, as in JSONL files, instead of becoming U+FFFD in the
    training text."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, raw[line_start:], e.start - line_start,
                        "text") from None


def _not_utf8(path, line_no: int, line: bytes, at: int, kind: str) -> InputError:
    """The error for byte `at` of a line that is not UTF-8, named by line and column."""
    return InputError(f"{path}:{line_no}: not UTF-8 text (byte 0x{line[at]:02x} at column "
                      f"{at + 1}); {kind} files must be UTF-8")


def _store(d, tokens, mask, offsets, meta):
    """Write the arrays, then meta.json last: a cache entry without it is incomplete."""
    os.makedirs(d, exist_ok=True)
    tmp = None
    try:   # a failed write (a full disk) leaves no temporary file behind
        for name, a in (("tokens", tokens), ("mask", mask), ("offsets", offsets)):
            tmp = os.path.join(d, f"{name}.tmp{os.getpid()}.npy")
            np.save(tmp, a)
            os.replace(tmp, os.path.join(d, f"{name}.npy"))
        tmp = os.path.join(d, f"meta.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({**meta, "version": CACHE_VERSION}, f)
        os.replace(tmp, os.path.join(d, "meta.json"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _load_cached(d, path):
    """The cache entry in d, or None when it is unreadable or inconsistent (a truncated or
    edited file)."""
    try:
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        arr = {n: np.load(os.path.join(d, f"{n}.npy"), mmap_mode="r") for n in ("tokens", "mask", "offsets")}
        t, m, o = arr["tokens"], arr["mask"], arr["offsets"]
        ok = (meta.get("kind") in ("text", "examples") and t.ndim == m.ndim == o.ndim == 1
              and len(t) == len(m) and len(o) >= 2 and o[0] == 0 and o[-1] == len(t))
    except (OSError, ValueError, EOFError, AttributeError):  # ValueError: also bad JSON, short mmap
        return None
    if not ok:
        return None
    return TokenData(t, m, o, meta["kind"], path, os.path.basename(os.path.normpath(d)))


# ---- examples, splits, batches ------------------------------------------------------------
class Examples:
    """Index space of training examples: windows of a token stream, or the rows of a JSONL
    file truncated to seq_len + 1 tokens."""

    def __init__(self, data: TokenData, seq_len: int, stride: int | None = None):
        """stride (text only): windows start every `stride` tokens and each scores only the
        targets the one before did not, so every target keeps at least seq_len - stride tokens
        of context (sliding-window perplexity); default seq_len, windows that do not overlap."""
        self.data, self.T = data, seq_len
        self.stride = seq_len if stride is None else stride
        if not is_int(self.stride) or not 1 <= self.stride <= seq_len:
            raise InputError(f"stride {stride!r}: must be an integer in 1..seq_len {seq_len}")
        if data.kind == "text":
            n = len(data.tokens)
            # windows of T + 1 tokens, each stride further; the last one shorter, so that no
            # trailing token goes untrained (or unevaluated)
            self.n = 1 + max(0, -(-(n - 1 - seq_len) // self.stride))
        else:
            self.n = data.n_examples
            lengths = np.diff(np.asarray(data.offsets))
            self.truncated = int((lengths > seq_len + 1).sum())

    def __len__(self):
        return self.n

    def targets(self) -> np.ndarray:
        """Loss tokens of each example as get() returns it (truncated to T + 1 tokens; the
        first token is never a target)."""
        if self.data.kind == "text":  # windows of a stream whose mask is all ones
            a = np.arange(self.n, dtype=np.int64) * self.stride
            n = np.maximum(0, np.minimum(a + self.T + 1, len(self.data.tokens)) - (a + 1))
            n[1:] = np.maximum(0, n[1:] - (self.T - self.stride))   # scored by the window before
            return n
        o = np.asarray(self.data.offsets, np.int64)
        cs = np.concatenate([[0], np.cumsum(self.data.mask, dtype=np.int64)])
        end = np.minimum(o[:-1] + self.T + 1, o[1:])
        return cs[end] - cs[np.minimum(o[:-1] + 1, end)]

    def get(self, i):
        """(ids, mask) of example i, at most T + 1 tokens."""
        if self.data.kind == "text":
            a = i * self.stride
            ids, mask = self.data.tokens[a:a + self.T + 1], self.data.mask[a:a + self.T + 1]
            if i and self.stride < self.T:   # its first T - stride targets: the window before's
                mask = np.array(mask)
                mask[1:1 + self.T - self.stride] = 0
            return ids, mask
        ids, mask = self.data.example(i)
        return ids[:self.T + 1], mask[:self.T + 1]


def check_targets(examples: Examples, indices, source: str, warn=None, what="they add nothing"):
    """An InputError when the examples at `indices` hold no loss token (the loss would be NaN,
    0 / 0, and nothing would train); `warn` is told how many hold none."""
    per = examples.targets()[np.asarray(indices, np.int64)]
    if len(per) and not per.any():
        raise InputError(f"{source}: no tokens to compute the loss on within --seq-len {examples.T}: "
                         f"no example has a completion or assistant token among its first "
                         f"{examples.T + 1} tokens (raise --seq-len or shorten the prompts)")
    empty = int((per == 0).sum())
    if empty and warn:
        warn(f"{source}: {empty} of {len(per)} examples have no loss tokens within --seq-len "
             f"{examples.T} (the prompt fills the window); {what}")


def split(n: int, eval_fraction: float, seed: int):
    """Deterministic train / held-out index split."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    k = int(round(n * eval_fraction))
    if eval_fraction > 0:
        k = max(1, min(n - 1, k))
    return np.sort(order[k:]), np.sort(order[:k])


def make_batch(examples: Examples, idx, pad_id: int):
    """tokens (B, T'), targets (B, T') with T' the longest example in the batch; targets are
    the next tokens where the mask allows loss, else -100 (also on padding)."""
    pairs = [examples.get(int(i)) for i in idx]
    T = max(1, max(len(ids) - 1 for ids, _ in pairs))
    x = np.full((len(pairs), T), pad_id, np.int64)
    y = np.full((len(pairs), T), IGNORE, np.int64)
    for r, (ids, mask) in enumerate(pairs):
        n = len(ids) - 1
        if n <= 0:
            continue
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(np.asarray(mask[1:]) > 0, ids[1:], IGNORE)
    return x, y


class Batches:
    """Shuffled batches over an index set, reproducible from (seed, epoch, cursor): that state
    is all a checkpoint needs to continue the same sequence."""

    def __init__(self, examples: Examples, indices, batch_size: int, seed: int, pad_id: int):
        self.examples, self.indices = examples, np.asarray(indices)
        self.B, self.seed, self.pad_id = batch_size, seed, pad_id
        self.epoch, self.cursor = 0, 0
        if len(self.indices) == 0:
            raise InputError("no training examples (none left after the held-out split, or "
                             "none given)")

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)

    def next(self):
        """(tokens, targets, example indices) of the next batch."""
        order = self._order()
        if self.cursor >= len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._order()
        idx = order[self.cursor:self.cursor + self.B]
        self.cursor += len(idx)
        return (*make_batch(self.examples, idx, self.pad_id), idx)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict):
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def steps_per_epoch(self) -> int:
        return -(-len(self.indices) // self.B)


def eval_batches(examples: Examples, indices, batch_size: int, pad_id: int):
    """(tokens, targets, example indices) over `indices` in order."""
    for i in range(0, len(indices), batch_size):
        idx = indices[i:i + batch_size]
        yield (*make_batch(examples, idx, pad_id), idx)
