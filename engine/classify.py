"""Encoder runs (BERT): `tailtune finetune` and `tailtune eval` when the model is one. A
sequence classifier here; sentence embeddings in engine/sentence.py, run by the same loop
(run_encoder). The data is JSONL, one {"text": ..., "label": ...} row per example, or
{"text": ..., "text_pair": ..., "label": ...} for a pair of texts (BERT's two segments); the labels
become the classifier head's classes (those of a classifier the model already has, when the
data's are among them; else the data's, sorted, and a new head).

A run directory holds metrics.jsonl (a line per step and per evaluation), summary.json and
model/ (the fine-tuned classifier in the Hugging Face layout, which transformers'
AutoModelForSequenceClassification loads, with the tokenizer). `--prefix-cache memory` keeps
each example's output of the frozen blocks (the lowest trainable block's input, its real tokens
only) after its first pass, so later epochs and evaluations run the trainable tail alone. What
the causal-LM runs have and these do not yet: checkpoints and --resume, freezing schedules, the
prefix cache on disk, telemetry.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time

import numpy as np

from . import data as D
from .errors import DivergedError, InputError
from .io import load, read_hf_config, write_json
from .io.hf_names import config_from_hf
from .io.resolve import resolve_model_path
from .optim import AdamW, CosineSchedule, clip_grad_norm
from .tokenizer import load_tokenizer


def is_encoder(model_path: str) -> bool:
    """Whether `model_path` holds an encoder (looked up in its config.json, no weights read)."""
    path = resolve_model_path(str(model_path))
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    with contextlib.suppress(Exception):    # an unreadable config fails later, with its reason
        return read_hf_config(path).get("model_type") == "bert"
    return False


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


def encode(tok, texts, seq_len: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids, token types or None) of each text or (text, pair), with the tokenizer's
    special tokens ([CLS] a [SEP] (b [SEP])), cut to seq_len as transformers cuts them (the longer
    of a pair first; the special tokens kept)."""
    if not hasattr(tok, "encode_pairs"):
        raise InputError(f"{type(tok).__name__} has no template for a classifier's texts; an "
                         "encoder needs its Hugging Face tokenizer (tokenizer.json)")
    a = [t[0] if isinstance(t, tuple) else t for t in texts]
    b = [t[1] if isinstance(t, tuple) else None for t in texts]
    out = []
    for ids, types in tok.encode_pairs(a, b, max_length=seq_len):
        ty = np.asarray(types, np.int64)
        out.append((np.asarray(ids, np.int64), ty if ty.any() else None))
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


class PrefixRows:
    """The frozen prefix's output (the input of block `start`) of each example, over its real
    tokens, computed the first time the example is drawn and read back after: in memory, as
    float32 or float16. Valid while the prefix's weights stay as they were (static freezing:
    the whole run; checked on every read)."""

    def __init__(self, model, seqs, start: int, dtype: str = "float32"):
        from .prefix_cache import _prefix_version
        self.model, self.seqs, self.start = model, seqs, start
        self.dtype = np.dtype(dtype)
        self.version = _prefix_version(model, start)
        self.rows: dict[int, np.ndarray] = {}
        self.computed = self.read = 0
        self.compute_s = self.read_s = 0.0

    def hidden(self, idx, tokens, lengths, types=None) -> np.ndarray:
        """(B, T, C) input of block `start` for the examples idx, batched as tokens."""
        from .prefix_cache import _prefix_version
        if _prefix_version(self.model, self.start) != self.version:
            raise InputError("a frozen prefix's weights changed under its cache")
        missing = [r for r, i in enumerate(idx) if int(i) not in self.rows]
        if missing:
            t0 = time.perf_counter()
            sub = np.asarray(missing)
            T = int(lengths[sub].max())
            h = self.model.prefix(np.ascontiguousarray(tokens[sub, :T]), self.start,
                                  lengths=lengths[sub],
                                  types=None if types is None else types[sub, :T])
            for j, r in enumerate(missing):
                self.rows[int(idx[r])] = h[j, :lengths[r]].astype(self.dtype)
            self.computed += len(missing)
            self.compute_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = np.zeros((*tokens.shape, self.model.config.d_model), np.float32)
        for r, i in enumerate(idx):
            out[r, :lengths[r]] = self.rows[int(i)]
        self.read += len(idx) - len(missing)
        self.read_s += time.perf_counter() - t0
        return out

    def report(self) -> dict:
        """What the cache cost and saved: seconds per example to compute the prefix against
        to read it back (reads include assembling every batch's padded array)."""
        per = lambda s, n: s / n if n else None  # noqa: E731
        nbytes = sum(a.nbytes for a in self.rows.values())
        return {"start": self.start, "dtype": self.dtype.name, "examples": len(self.rows),
                "mib": round(nbytes / 2**20, 1), "compute_s_per_example": per(self.compute_s, self.computed),
                "read_s_per_example": per(self.read_s, self.computed + self.read)}


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


def choose_labels(model_path: str, data_labels) -> list[str]:
    """The model's own classes when the data's are among them (its head is kept), else the
    data's, sorted (a new head)."""
    path = resolve_model_path(str(model_path))
    own = config_from_hf(read_hf_config(path)).labels
    seen = sorted(set(data_labels))
    if own and set(seen) <= set(own):
        return own
    if len(seen) == 1:
        raise InputError(f"the training data has one label ({seen[0]!r}): a classifier needs "
                         "examples of two or more")
    return seen


class ClassifierTask:
    """A classifier's run: labeled texts (or pairs of texts), the model with its head over their
    labels, an optional prefix cache; step() and evaluate() for run_encoder."""
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
        self.seqs, self.targets = encode(self.tok, texts, seq_len), np.array([index[x] for x in labels])
        if model.config.type_vocab_size < 2 and any(s[1] is not None for s in self.seqs):
            raise InputError(f"{args.data}: pairs of texts (text_pair) need two token types; "
                             f"{args.model} has {model.config.type_vocab_size}")
        held_texts, held_labels = _capped(args, held_texts, held_labels, log)
        self.held = encode(self.tok, held_texts, seq_len)
        self.held_targets = np.array([index[x] for x in held_labels], np.int64)
        cut = sum(len(s[0]) == seq_len for s in self.seqs)
        if cut:
            log(f"note: {cut} training texts reach --seq-len {seq_len} and may be cut")
        self.n_train, self.n_held, self.labels = len(self.seqs), len(self.held), classes
        self.pad, self.batch_size, self.args = _pad(self.tok), args.batch_size, args
        self.caches = (None, None)

    def start(self, model):
        """After the trainable set is fixed: the prefix caches (--prefix-cache memory)."""
        low = model.lowest_trainable_block()
        if self.args.prefix_cache == "memory" and low > 0:
            dt = self.args.prefix_dtype
            self.caches = (PrefixRows(model, self.seqs, low, dt), PrefixRows(model, self.held, low, dt))

    def step(self, idx, scale: float) -> float:
        loss = _forward(self.model, self.seqs, idx, self.pad, self.caches[0], self.targets[idx])
        self.model.backward(scale)
        return loss

    def evaluate(self):
        return (evaluate(self.model, self.held, self.held_targets, self.batch_size, self.pad,
                         self.caches[1]) if self.n_held else None)

    def summary(self, log) -> dict:
        out = {"labels": self.labels}
        if self.caches[0] is not None:
            r = out["prefix_cache"] = self.caches[0].report()
            log(f"prefix cache: blocks below {r['start']} computed once for {r['examples']} "
                f"training texts ({r['mib']} MiB): {1e3 * (r['compute_s_per_example'] or 0):.2f} "
                f"ms an example to compute, {1e3 * (r['read_s_per_example'] or 0):.3f} ms to read")
        return out

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


def _first_row(path: str):
    """The first JSONL row of `path` (None when it is not a readable JSONL file: read_* says
    why)."""
    with contextlib.suppress(Exception):
        for _, row in D.read_rows(path, check=False):
            return row
    return None


def finetune_encoder(args, log=print) -> dict:
    """`tailtune finetune` of an encoder: a classifier on {"text", "label"} rows, or sentence
    embeddings on {"anchor", "positive"} rows (engine/sentence.py). TrainArgs as for a causal
    LM; the flags only those have are refused with the reason."""
    from .train import _apply_freezing, _check_out
    args.validate()
    for flag, value, default in (("--schedule", args.schedule, "static"),
                                 ("--telemetry-every", args.telemetry_every, 0),
                                 ("--save-every", args.save_every, 0),
                                 ("--sample-prompt", args.sample_prompt, None)):
        if value != default:
            raise InputError(f"{flag} is not available for an encoder yet; it works with "
                             "causal LMs")
    if args.prefix_cache == "disk":
        raise InputError("--prefix-cache disk is not available for an encoder yet: use "
                         "--prefix-cache memory")
    _check_out(args, resuming=False)
    row = _first_row(args.data)
    if isinstance(row, dict) and "anchor" in row:
        from .sentence import PairsTask
        if args.prefix_cache != "off":
            raise InputError("--prefix-cache is not available for sentence-embedding runs yet")
        task = PairsTask(args, log)
    else:
        task = ClassifierTask(args, log)
    _apply_freezing(task.model, args)
    task.start(task.model)
    return run_encoder(args, task, log)


def run_encoder(args, task, log) -> dict:
    """The steps of an encoder run, its evaluations before and after, the saved model."""
    from .train import _lock_out, _log_metric, _make_out, _save_final
    model, metric = task.model, task.metric
    micro, steps = _count(task.n_train, args)
    warmup = max(1, round(0.05 * steps)) if args.warmup is None else min(args.warmup, steps)
    sched = CosineSchedule(args.lr, steps, warmup, args.min_lr)
    opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    created = not os.path.exists(args.out)
    _make_out(args.out)
    lock = _lock_out(args.out, log)
    metrics = os.path.join(args.out, "metrics.jsonl")
    cleanup = contextlib.ExitStack()

    def evaluation(step, first=False):
        r = task.evaluate()
        if r is not None:
            _log_metric(metrics, {"step": step, "eval_loss": r["loss"], f"eval_{metric}": r[metric]},
                        truncate=first)
        return r
    try:
        log(f"{task.n_train} training / {task.n_held} held-out rows; {steps} steps of "
            f"{args.batch_size} x {args.grad_accum}; trainable "
            f"{model.num_params(True):,} of {model.num_params():,} parameters")
        base = evaluation(0, first=True)
        if base:
            log(f"held-out before: loss {base['loss']:.4f}  {metric} {base[metric]:.3f}")
        rng = np.random.default_rng([args.seed, 11])
        order, at = rng.permutation(task.n_train), 0
        t0 = time.perf_counter()
        stop = _on_signals(cleanup)
        done = 0
        for step in range(steps):
            if stop["signal"] is not None:
                log(f"interrupted at step {step}: the model as trained so far is saved")
                break
            model.zero_grad()
            parts = []
            for _ in range(min(args.grad_accum, micro - step * args.grad_accum)):
                if len(order) - at < task.min_batch:    # (a remainder too small: dropped)
                    order, at = rng.permutation(task.n_train), 0
                parts.append(order[at:at + args.batch_size])
                at += args.batch_size
            n_all = sum(len(p) for p in parts)
            loss = sum(task.step(idx, len(idx) / n_all) * len(idx) / n_all for idx in parts)
            norm = clip_grad_norm(model, args.clip) if args.clip else None
            if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
                raise DivergedError(f"step {step + 1}: the loss or gradient is not finite "
                                    f"(loss {loss}); try a lower --lr")
            opt.lr = sched(step)
            opt.step()
            done = step + 1
            _log_metric(metrics, {"step": done, "loss": loss, "lr": opt.lr, "grad_norm": norm})
            if done % 10 == 0 or done == steps:
                log(f"step {done}/{steps}  loss {loss:.4f}  lr {opt.lr:.2e}  "
                    f"{time.perf_counter() - t0:.1f} s")
            if args.eval_every and done % args.eval_every == 0 and done < steps:
                evaluation(done)
        seconds = time.perf_counter() - t0
        final = evaluation(done)
        if final:
            log(f"held-out after:  loss {final['loss']:.4f}  {metric} {final[metric]:.3f}")
        where = _save_final(model, task.tok, args.out, task.save_extra)
        summary = {"status": "done" if done == steps else "interrupted", "task": task.kind,
                   **task.summary(log), "steps": done, "train_seconds": round(seconds, 2),
                   "base_eval": base, "final_eval": final,
                   "trainable_params": model.num_params(True), "params": model.num_params(),
                   "model": where}
        if stop["signal"] is not None:
            summary["signal"] = stop["signal"]
        write_json(os.path.join(args.out, "summary.json"), summary)
        log(f"saved {where}")
        return summary
    except BaseException:
        # no checkpoint to resume from: a run that failed leaves no --out behind (a second
        # Ctrl-C during the final save included); one that existed keeps only what it held
        if created:
            shutil.rmtree(args.out, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(metrics)
        raise
    finally:
        cleanup.close()
        if lock is not None:
            os.close(lock)


def _on_signals(cleanup) -> dict:
    """Ctrl-C (SIGINT, SIGTERM; SIGBREAK on Windows) ends the run after the current step, which
    then evaluates and saves as at its end; a second one stops at once. The handlers before are
    put back when `cleanup` closes."""
    import signal
    import threading
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                sig = getattr(signal, name)
                cleanup.callback(signal.signal, sig, signal.signal(sig, on_signal))
    return stop


def _count(n_train: int, args) -> tuple[int, int]:
    from .trainer import count_steps
    return count_steps(n_train, args.batch_size, args.grad_accum, args.steps, args.epochs)


def eval_encoder(model_path: str, data: str, batch_size: int, seq_len: int) -> dict:
    """`tailtune eval` of an encoder: a classifier's loss and accuracy on labeled JSONL, or a
    sentence encoder's ranking loss and recall@1 on {"anchor", "positive"} rows."""
    row = _first_row(data)
    if isinstance(row, dict) and "anchor" in row:
        from .sentence import read_pairs, retrieval
        anchors, positives = read_pairs(data)
        model = load(model_path)
        if model.config.labels is not None:
            raise InputError(f"{model_path} is a classifier: evaluate it on labeled rows")
        tok = load_tokenizer(resolve_model_path(model_path), model_vocab_size=model.config.vocab_size)
        n = min(seq_len, model.config.context_length)
        return retrieval(model, encode(tok, anchors, n), encode(tok, positives, n), batch_size,
                         _pad(tok))
    texts, labels = read_labeled(data)
    model = load(model_path)
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
    seqs = encode(tok, texts, min(seq_len, model.config.context_length))
    return evaluate(model, seqs, np.array([index[x] for x in labels], np.int64), batch_size,
                    _pad(tok))
