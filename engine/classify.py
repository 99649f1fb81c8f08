"""Encoder runs (BERT): a sequence classifier's data, head and evaluation, for `tailtune
finetune` (engine/encoder_train.py runs the steps) and `tailtune eval`; sentence embeddings are
in engine/sentence.py. The data is JSONL, one {"text": ..., "label": ...} row per example, or
{"text": ..., "text_pair": ..., "label": ...} for a pair of texts (BERT's two segments); the labels
become the classifier head's classes (those of a classifier the model already has, when the
data's are among them; else the data's, sorted, and a new head). The saved model/ is in the
Hugging Face layout, which transformers' AutoModelForSequenceClassification loads, with the
tokenizer.

`--prefix-cache memory|disk` (PrefixRows) keeps each example's output of the frozen blocks (the
lowest trainable block's input, its real tokens only) after its first pass, so later epochs and
evaluations run the trainable tail alone; a schedule that moves the lowest trainable block
makes a new cache. On disk, a later run over the same pretrained prefix and texts reads it.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import data as D
from .errors import ConfigError, InputError
from .io import load, read_hf_config
from .io.hf_names import config_from_hf
from .io.resolve import resolve_model_path
from .tokenizer import load_tokenizer


def is_encoder(model_path: str) -> bool:
    """Whether `model_path` holds an encoder (looked up in its config.json, no weights read)."""
    from .io.hf_bert import TYPES
    return _hf_config(model_path).get("model_type") in TYPES


def is_classifier_run(model_path: str, data: str) -> bool:
    """Whether `tailtune finetune` of these is a classifier's (or a sentence encoder's) run: an
    encoder or a classifier, or rows of such a run ({"text", "label"}: a causal LM then gets a
    classifier in place of its LM head; {"anchor", "positive"} and {"tokens", "tags"}: refused
    for it, with the reason). Rows of a language model's data ("prompt", "completion", "messages", even with a
    "label" such as a preference's) stay a language model's run."""
    if is_classifier(model_path):
        return True
    row = _first_row(data)
    if not isinstance(row, dict) or any(k in row for k in ("prompt", "completion", "messages")):
        return False
    return "anchor" in row or "tokens" in row or "text" in row and "label" in row


def is_classifier(model_path: str) -> bool:
    """Whether `model_path` holds a sequence classifier or an encoder (its config.json)."""
    from .io.hf_bert import TYPES
    hf = _hf_config(model_path)            # (read once)
    archs = hf.get("architectures") or []
    return hf.get("model_type") in TYPES or any(isinstance(a, str) and a.endswith(
        "ForSequenceClassification") for a in archs)


def _hf_config(model_path: str) -> dict:
    """config.json of a model directory ({} for none, a GGUF file, or an unreadable one: that
    fails later, with its reason)."""
    path = resolve_model_path(str(model_path))
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return {}
    with contextlib.suppress(Exception):
        return read_hf_config(path)
    return {}


def read_labeled(path: str) -> tuple[list, list[str]]:
    """(texts, labels) of a JSONL file of {"text", "label"} rows (a label may be a number: it is
    its text); a row with a "text_pair" gives the tuple (text, pair)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such data file")
    if not path.lower().endswith((".jsonl", ".json")):
        raise InputError(f"{path}: a classifier trains on JSONL rows of "
                         '{"text": ..., "label": ...}')
    texts, labels = [], []
    for n, row in D.read_rows(path, check=False):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f'{where}: a row needs a "text" string and a "label"')
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise InputError(f'{where}: "label" must be a non-empty string or an integer, got '
                             f"{label!r}")
        pair = row.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise InputError(f'{where}: "text_pair" must be a string, got {type(pair).__name__}')
        texts.append(row["text"] if pair is None else (row["text"], pair))
        labels.append(str(label))
    if not texts:
        raise InputError(f"{path}: no rows")
    return texts, labels


def encode(tok, texts, seq_len: int, config=None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, token types or None) of each text or (text, pair), with the tokenizer's
    special tokens ([CLS] a [SEP] (b [SEP])), cut to seq_len as transformers cuts them (the longer
    of a pair first; the special tokens kept). config: the model's; a RoBERTa's pairs get no
    types (transformers does not pass them to it: its table has one; a tokenizer whose
    template numbers the second text 1 would index past it)."""
    if not hasattr(tok, "encode_pairs"):
        raise InputError(f"{type(tok).__name__} has no template for a classifier's texts; a "
                         "classifier needs a Hugging Face tokenizer (tokenizer.json) or a GGUF "
                         "file's BPE vocabulary")
    a = [t[0] if isinstance(t, tuple) else t for t in texts]
    b = [t[1] if isinstance(t, tuple) else None for t in texts]
    out = []
    typed = config is None or config.model_type == "bert"
    for ids, types in tok.encode_pairs(a, b, max_length=seq_len):
        ty = np.asarray(types, np.int64)
        out.append((np.asarray(ids, np.int64), ty if typed and ty.any() else None))
    return out


def batch(seqs, idx, pad_id: int):
    """(tokens (B, T) padded on the right to the longest, lengths (B,), types (B, T) or None
    when every token is of type 0) of seqs[idx]: (ids, types or None) as encode() gives them,
    or token id arrays alone."""
    items = [seqs[i] if isinstance(seqs[i], tuple) else (seqs[i], None) for i in idx]
    lengths = np.array([len(ids) for ids, _ in items], np.int64)
    tokens = np.full((len(items), int(lengths.max())), pad_id, np.int64)
    typed = any(t is not None for _, t in items)
    types = np.zeros(tokens.shape, np.int64) if typed else None
    for r, (ids, t) in enumerate(items):
        tokens[r, :lengths[r]] = ids
        if t is not None:
            types[r, :lengths[r]] = t
    return tokens, lengths, types


class _InMemory:
    """A PrefixRows' rows in memory: example -> its (length, C) array, made as computed."""

    def __init__(self):
        self.rows: dict[int, np.ndarray] = {}

    def __contains__(self, i) -> bool:
        return i in self.rows

    def get(self, i) -> np.ndarray:
        return self.rows[i]

    def put(self, i, a):
        self.rows[i] = a

    def count(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.rows.values())

    def close(self):
        self.rows = {}


class _OnDisk:
    """A PrefixRows' rows in memory-mapped files (prefix_cache.RowFiles), each example's at
    its offset: a later run over the same prefix and texts reads the rows this one computed.
    disposable: the prefix holds weights a run trained, and close() deletes the files."""

    def __init__(self, directory, key, lengths, C, dtype, disposable):
        from .prefix_cache import RowFiles
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.file = RowFiles(directory, key, (int(self.offsets[-1]), C), len(lengths), dtype)
        self.disposable, self.size = disposable, int(self.file.store.nbytes)
        self.n = int(self.file.filled.sum())       # rows an earlier run computed

    def __contains__(self, i) -> bool:
        return bool(self.file.filled[i])

    def get(self, i) -> np.ndarray:
        return self.file.store[self.offsets[i]:self.offsets[i + 1]]

    def put(self, i, a):
        self.file.store[self.offsets[i]:self.offsets[i + 1]] = a
        self.file.filled[i] = True

    def count(self) -> int:
        if self.file.store is not None:   # (rows another cache over the same file filled too)
            self.n = int(self.file.filled.sum())
        return self.n

    def nbytes(self) -> int:
        return self.size

    def close(self):
        if self.file.store is not None:
            self.file.close(delete=self.disposable)


def _seqs_hash(seqs) -> str:
    """Hash of a list of texts' token ids and types (encode()'s output): a disk cache's key."""
    import hashlib
    h = hashlib.sha256()
    for s in seqs:
        ids, types = s if isinstance(s, tuple) else (s, None)
        h.update(np.int64(len(ids)).tobytes())
        h.update(np.ascontiguousarray(ids, np.int64).data)
        h.update(b"-" if types is None else np.ascontiguousarray(types, np.int64).data)
    return h.hexdigest()[:24]


class PrefixRows:
    """The frozen prefix's output (the input of block `start`) of each example, over its real
    tokens, computed the first time the example is drawn and read back after: in memory, or in
    a memory-mapped file in `directory` (reused by later runs over the same prefix and texts),
    as float32 or float16. Valid while the prefix's weights stay as they were (checked on every
    read); a schedule that moves the lowest trainable block makes a new one. `below`: the cache
    of a lower block whose prefix is unchanged (the lowest blocks froze): an example it holds
    runs from there, through the blocks between, rather than from the embeddings. disposable:
    the prefix holds weights the run trained (no later run can reuse its file)."""

    def __init__(self, model, seqs, start: int, dtype: str = "float32", below=None,
                 directory: str | None = None, disposable: bool = False):
        from .prefix_cache import _check_room, _prefix_version, prefix_hash
        self.model, self.seqs, self.start = model, seqs, start
        self.dtype = np.dtype(dtype)
        self.version = _prefix_version(model, start)
        self.below = below if below is not None and below.start < start and below.valid() else None
        lengths = [len(s[0] if isinstance(s, tuple) else s) for s in seqs]
        C = model.config.d_model
        key = f"{prefix_hash(model, start)}-{_seqs_hash(seqs)}-{dtype}" if directory else ""
        _check_room(sum(lengths) * C * self.dtype.itemsize, len(seqs), directory, key)
        self.rows = (_OnDisk(directory, key, lengths, C, self.dtype, disposable) if directory
                     else _InMemory())
        self.reused = self.rows.count()    # rows an earlier run left on disk
        self.computed = self.read = self.carried = 0
        self.compute_s = self.read_s = 0.0

    def valid(self) -> bool:
        from .prefix_cache import _prefix_version
        return _prefix_version(self.model, self.start) == self.version

    def _assemble(self, idx, shape, lengths) -> np.ndarray:
        out = np.zeros((*shape, self.model.config.d_model), np.float32)
        for r, i in enumerate(idx):
            out[r, :lengths[r]] = self.rows.get(int(i))
        return out

    def hidden(self, idx, tokens, lengths, types=None) -> np.ndarray:
        """(B, T, C) input of block `start` for the examples idx, batched as tokens."""
        if not self.valid():
            raise InputError("a frozen prefix's weights changed under its cache")
        missing = [r for r, i in enumerate(idx) if int(i) not in self.rows]
        if missing:
            t0 = time.perf_counter()
            sub = np.asarray(missing)
            T = int(lengths[sub].max())
            x, ty = np.ascontiguousarray(tokens[sub, :T]), None if types is None else types[sub, :T]
            below = self.below
            if below is not None and below.valid() and all(int(idx[r]) in below.rows for r in missing):
                h = self.model.prefix(x, self.start, below._assemble(idx[sub], x.shape, lengths[sub]),
                                      below.start, lengths=lengths[sub], types=ty)
                self.carried += len(missing)
            else:
                h = self.model.prefix(x, self.start, lengths=lengths[sub], types=ty)
            if self.dtype == np.float16:
                from .prefix_cache import check_half
                check_half(h, self.start)
            for j, r in enumerate(missing):
                self.rows.put(int(idx[r]), h[j, :lengths[r]].astype(self.dtype))
            if self.below is not None and self.rows.count() == len(self.seqs):
                self.below.free()   # every row is here: the lower cache's go
                self.below = None
            self.computed += len(missing)
            self.compute_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self._assemble(idx, tokens.shape, lengths)
        self.read += len(idx) - len(missing)
        self.read_s += time.perf_counter() - t0
        return out

    def free(self, keep_rows=False):
        """A newer cache took this one's place: its rows go (a disposable file deleted), unless
        that cache carries them up (it frees them once it holds every row); the rows this one
        carried up from go."""
        if self.below is not None:
            self.below.free()
            self.below = None
        if not keep_rows:
            self.rows.close()


def cache_report(caches) -> dict:
    """What the training data's prefix caches of a run cost and saved: seconds per example to
    compute a prefix against to read it back (reads include assembling every batch's padded
    array); start block, size and rows of the last cache; how many caches a schedule made."""
    last = caches[-1]
    computed = sum(c.computed for c in caches)
    reads = computed + sum(c.read for c in caches)
    per = lambda s, n: s / n if n else None  # noqa: E731
    nbytes = last.rows.nbytes()
    return {"start": last.start, "dtype": last.dtype.name, "examples": last.rows.count(),
            "storage": "disk" if isinstance(last.rows, _OnDisk) else "memory",
            "reused": sum(c.reused for c in caches),
            "mib": round(nbytes / 2**20, 1), "caches": len(caches),
            "starts": [c.start for c in caches], "carried": sum(c.carried for c in caches),
            "compute_s_per_example": per(sum(c.compute_s for c in caches), computed),
            "read_s_per_example": per(sum(c.read_s for c in caches), reads)}


class PrefixCaches:
    """A run's PrefixRows (--prefix-cache memory or disk), one per list of texts (the training
    texts, the held-out ones), at the lowest trainable block: follow() makes them anew whenever
    a schedule moves it (carried up from the last ones when the lowest blocks froze); close()
    at the end of the run lets them go (the files of prefixes the run trained deleted)."""

    def __init__(self, args, lists, log):
        self.on, self.dtype, self.lists, self.log = args.prefix_cache != "off", args.prefix_dtype, lists, log
        self.directory = os.path.join(D.cache_root(), "prefix") if args.prefix_cache == "disk" else None
        self.caches: tuple = (None,) * len(lists)
        self.built: list[PrefixRows] = []      # every cache of the first list, for the report

    def follow(self, model, trained=()):
        """trained: every parameter the run has trained so far."""
        if not self.on:
            return
        from .prefix_cache import in_prefix
        low, old = model.lowest_trainable_block(), self.caches
        if old[0] is not None and old[0].start == low and old[0].valid():
            return
        if low <= 0:
            if not self.built:
                self.log("prefix cache: not used while block 0 (or an embedding) is trainable: "
                         "there is no frozen prefix")
            self.caches = (None,) * len(self.lists)
        else:
            disposable = any(in_prefix(n, low) for n in trained)
            caches = []
            try:
                for s, o in zip(self.lists, old):   # (none for an empty held-out list)
                    caches.append(PrefixRows(model, s, low, self.dtype, below=o,
                                             directory=self.directory, disposable=disposable)
                                  if len(s) else None)
            except BaseException:
                for c in caches:
                    if c is not None:
                        c.free()
                raise
            self.caches = tuple(caches)
            self.built.append(self.caches[0])
            reused = sum(c.reused for c in caches if c is not None)
            if reused:
                self.log(f"prefix cache: {reused} rows of block {low}'s inputs read from an "
                         f"earlier run's cache in {self.directory}")
        for c, new in zip(old, self.caches):
            if c is not None:
                c.free(keep_rows=new is not None and new.below is c)

    def close(self):
        for c in self.caches:
            if c is not None:
                c.free()

    def summary(self, what: str) -> dict:
        """{"prefix_cache": the report} when a cache was made (logged), else {}."""
        if not self.built:
            return {}
        r = cache_report(self.built)
        moved = (f" (a cache at each of blocks {', '.join(map(str, r['starts']))}; "
                 f"{r['carried']} rows carried up)" if r["caches"] > 1 else "")
        earlier = f", {r['reused']} read from an earlier run's" if r["reused"] else ""
        cost = ("" if r["compute_s_per_example"] is None else
                f"{1e3 * r['compute_s_per_example']:.2f} ms an example to compute, ")
        self.log(f"prefix cache ({r['storage']}): the inputs of block {r['start']} kept for "
                 f"{r['examples']} {what} ({r['mib']} MiB{earlier}){moved}: {cost}"
                 f"{1e3 * (r['read_s_per_example'] or 0):.3f} ms to read")
        return {"prefix_cache": r}


def _forward(model, seqs, idx, pad_id, cache, targets=None, grad=True):
    tokens, lengths, types = batch(seqs, idx, pad_id)
    if cache is None:
        return model.forward(tokens, targets, lengths=lengths, types=types, grad=grad)
    h = cache.hidden(idx, tokens, lengths, types)
    return model.forward(tokens, targets, lengths=lengths, types=types, grad=grad, hidden=h,
                         start=cache.start)


def evaluate(model, seqs, targets, batch_size: int, pad_id: int, cache=None) -> dict:
    """Mean loss, accuracy and per-class accuracy over all examples."""
    n = len(seqs)
    loss_sum, pred = 0.0, np.empty(n, np.int64)
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        logits = _forward(model, seqs, idx, pad_id, cache)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss_sum -= float(logp[np.arange(len(idx)), targets[idx]].sum(dtype=np.float64))
        pred[idx] = logits.argmax(1)
    right = pred == targets
    labels = model.config.labels
    per = {labels[k]: float(right[targets == k].mean()) for k in np.unique(targets)}
    return {"loss": loss_sum / n, "accuracy": float(right.mean()), "per_label": per}


def choose_labels(model_path: str, data_labels, per_token: bool = False) -> list[str]:
    """The model's own classes when the data's are among them (its head is kept; with
    per_token, a token classifier's only), else the data's, sorted (a new head)."""
    hf = _hf_config(model_path)     # (a GGUF file: a language model, no classes of its own)
    try:
        own = config_from_hf(hf) if hf else None
    except ConfigError:     # a head the engine does not train (regression, multi-label): replaced
        own = None
    seen = sorted(set(data_labels))
    if own is not None and own.labels and (own.per_token or not per_token) \
            and set(seen) <= set(own.labels):
        return own.labels
    if len(seen) == 1:
        what = "tag" if per_token else "label"
        raise InputError(f"the training data has one {what} ({seen[0]!r}): a "
                         f"{'token ' if per_token else ''}classifier needs two or more")
    return seen


class ClassifierTask:
    """A classifier's run: labeled texts (or pairs of texts), the model with its head over their
    labels, an optional prefix cache; step() and evaluate() for encoder_train.run_encoder."""
    kind, metric = "classification", "accuracy"
    min_batch = 1

    def __init__(self, args, log):
        (texts, labels), (held_texts, held_labels) = train_and_held(args, read_labeled)
        classes = choose_labels(args.model, labels)
        unknown = sorted(set(held_labels) - set(classes))
        if unknown:
            raise InputError(f"held-out labels {unknown[:5]} never occur in the training data")
        log(f"loading {args.model} as a classifier over {len(classes)} labels: {classes}")
        self.model = model = load(args.model, labels=classes)
        self.tok, seq_len = _tokenizer_and_length(args, model)
        index = {c: i for i, c in enumerate(classes)}
        self.seqs = encode(self.tok, texts, seq_len, model.config)
        self.targets = np.array([index[x] for x in labels])
        if model.config.type_vocab_size < 2 and any(s[1] is not None for s in self.seqs):
            raise InputError(f"{args.data}: pairs of texts (text_pair) need two token types; "
                             f"{args.model} has {model.config.type_vocab_size}")
        held_texts, held_labels = _capped(args, held_texts, held_labels, log)
        self.held = encode(self.tok, held_texts, seq_len, model.config)
        self.held_targets = np.array([index[x] for x in held_labels], np.int64)
        cut = sum(len(s[0]) == seq_len for s in self.seqs)
        if cut:
            log(f"note: {cut} training texts reach --seq-len {seq_len} and may be cut")
        self.n_train, self.n_held, self.labels = len(self.seqs), len(self.held), classes
        self.pad, self.batch_size = _pad(self.tok), args.batch_size
        if not model.config.encoder:
            self.pad = _causal_pad(self.tok, model)
        self.prefix = PrefixCaches(args, (self.seqs, self.held), log)

    def start(self, model, trained=()):
        """When the trainable set is fixed, and whenever a schedule changes it: the prefix
        caches follow the lowest trainable block (trained: what the run has trained so far)."""
        self.prefix.follow(model, trained)

    def probe(self):
        """Telemetry's probe batch: the first held-out examples (training ones without)."""
        seqs = self.held if self.n_held else self.seqs
        return batch(seqs, np.arange(min(4, len(seqs))), self.pad)

    def weight(self, idx) -> int:
        """What the loss of a micro-batch averages over: its examples."""
        return len(idx)

    def step(self, idx, scale: float) -> float:
        loss = _forward(self.model, self.seqs, idx, self.pad, self.prefix.caches[0], self.targets[idx])
        self.model.backward(scale)
        return loss

    def evaluate(self):
        return (evaluate(self.model, self.held, self.held_targets, self.batch_size, self.pad,
                         self.prefix.caches[1]) if self.n_held else None)

    def summary(self, log) -> dict:
        return {"labels": self.labels, **self.prefix.summary("training texts")}

    save_extra = None


def train_and_held(args, read):
    """(training columns, held-out columns) of the rows read(path) gives as parallel lists:
    --eval-data's rows held out, else --eval-fraction of --data's (seeded)."""
    cols = read(args.data)
    if args.eval_data:
        return cols, read(args.eval_data)
    train_idx, eval_idx = D.split(len(cols[0]), args.eval_fraction, args.seed)
    train, held = (tuple([c[i] for i in idx] for c in cols) for idx in (train_idx, eval_idx))
    if not train[0]:
        raise InputError(f"{args.data}: {len(held[0])} row(s), and --eval-fraction "
                         f"{args.eval_fraction} holds out all of them: none is left to train "
                         "on (give more rows, --eval-fraction 0, or --eval-data)")
    return train, held


def _capped(args, held, other, log):
    """The held-out rows --eval-batches keeps (all with 0)."""
    n = args.eval_batches * args.batch_size
    if args.eval_batches and len(held) > n:
        log(f"note: held-out evaluations use the first {n} of {len(held)} rows "
            f"(--eval-batches {args.eval_batches} x --batch-size {args.batch_size}; 0: all)")
        return held[:n], other[:n]
    return held, other


def _tokenizer_and_length(args, model):
    from .train import check_seq_len
    tok = load_tokenizer(resolve_model_path(args.model), model_vocab_size=model.config.vocab_size)
    return tok, check_seq_len(args.seq_len, model.config)


def _pad(tok) -> int:
    return tok.pad_id if tok.pad_id is not None else 0


def _causal_pad(tok, model) -> int:
    """A causal classifier's pad id: the tokenizer's, else its end-of-text token's (made the
    pad token of the tokenizer saved with the model, so that transformers can pad a batch), the
    usual choice; set as the model's pad_token_id, by which transformers' classifier finds each
    text's last token (the engine applies the same rule, Model._last_tokens)."""
    if tok.pad_id is None and tok.special_tokens.get("eos_token") is not None:
        tok.special_tokens["pad_token"] = tok.special_tokens["eos_token"]
    pad = tok.batch_pad_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    return model.config.pad_token_id


def _first_row(path: str):
    """The first JSONL row of `path` (None when it is not a readable JSONL file: read_* says
    why)."""
    with contextlib.suppress(Exception):
        for _, row in D.read_rows(path, check=False):
            return row
    return None


def eval_encoder(model_path: str, data: str, batch_size: int, seq_len: int) -> dict:
    """`tailtune eval` of an encoder: a classifier's loss and accuracy on labeled JSONL, a
    token classifier's loss, word accuracy and entity F1 on {"tokens", "tags"} rows, or a
    sentence encoder's ranking loss and recall@1 on {"anchor", "positive"} rows."""
    row = _first_row(data)
    if isinstance(row, dict) and "tokens" in row:
        from .token_tags import eval_tagged
        return eval_tagged(model_path, data, batch_size, seq_len)
    if isinstance(row, dict) and "anchor" in row:
        from .sentence import read_pairs, retrieval
        anchors, positives = read_pairs(data)
        model = load(model_path)
        if model.config.labels is not None:
            raise InputError(f"{model_path} is a classifier: evaluate it on labeled rows")
        tok = load_tokenizer(resolve_model_path(model_path), model_vocab_size=model.config.vocab_size)
        n = min(seq_len, model.config.context_length)
        return retrieval(model, encode(tok, anchors + positives, n), batch_size, _pad(tok))
    texts, labels = read_labeled(data)
    model = load(model_path)
    if model.config.per_token:
        raise InputError(f'{model_path} is a token classifier: evaluate it on {{"tokens", '
                         '"tags"} rows')
    if model.config.labels is None:
        raise InputError(f"{model_path} is an encoder without a classifier head: fine-tune it "
                         "on labeled data first (tailtune finetune), or evaluate it as a sentence "
                         'encoder on {"anchor", "positive"} rows')
    unknown = sorted(set(labels) - set(model.config.labels))
    if unknown:
        raise InputError(f"{data}: labels {unknown[:5]} are not among the model's "
                         f"{model.config.labels}")
    tok = load_tokenizer(resolve_model_path(model_path), model_vocab_size=model.config.vocab_size)
    index = {c: i for i, c in enumerate(model.config.labels)}
    seqs = encode(tok, texts, min(seq_len, model.config.context_length), model.config)
    return evaluate(model, seqs, np.array([index[x] for x in labels], np.int64), batch_size,
                    _pad(tok))
