"""Sequence classification with an encoder (BERT): `tailtune finetune` and `tailtune eval` when
the model is one. The data is JSONL, one {"text": ..., "label": ...} row per example, or
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
    when every token is of type 0)."""
    lengths = np.array([len(seqs[i][0]) for i in idx], np.int64)
    tokens = np.full((len(idx), int(lengths.max())), pad_id, np.int64)
    typed = any(seqs[i][1] is not None for i in idx)
    types = np.zeros(tokens.shape, np.int64) if typed else None
    for r, i in enumerate(idx):
        tokens[r, :lengths[r]] = seqs[i][0]
        if typed and seqs[i][1] is not None:
            types[r, :lengths[r]] = seqs[i][1]
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


def finetune_classifier(args, log=print) -> dict:
    """`tailtune finetune` of an encoder: TrainArgs as for a causal LM; the flags only those
    have are refused with the reason."""
    from .train import (_apply_freezing, _check_out, _lock_out, _log_metric, _make_out,
                        _save_final, check_seq_len)
    args.validate()
    for flag, value, default in (("--schedule", args.schedule, "static"),
                                 ("--telemetry-every", args.telemetry_every, 0),
                                 ("--save-every", args.save_every, 0),
                                 ("--sample-prompt", args.sample_prompt, None)):
        if value != default:
            raise InputError(f"{flag} is not available for an encoder (a classifier) yet; "
                             "it works with causal LMs")
    if args.prefix_cache == "disk":
        raise InputError("--prefix-cache disk is not available for an encoder (a classifier) "
                         "yet: use --prefix-cache memory")
    _check_out(args, resuming=False)
    texts, labels = read_labeled(args.data)
    if args.eval_data:
        held_texts, held_labels = read_labeled(args.eval_data)
    else:
        train_idx, eval_idx = D.split(len(texts), args.eval_fraction, args.seed)
        held_texts = [texts[i] for i in eval_idx]
        held_labels = [labels[i] for i in eval_idx]
        texts = [texts[i] for i in train_idx]
        labels = [labels[i] for i in train_idx]
        if not texts:
            raise InputError(f"{args.data}: {len(held_texts)} row(s), and --eval-fraction "
                             f"{args.eval_fraction} holds out all of them: none is left to train "
                             "on (give more rows, --eval-fraction 0, or --eval-data)")
    classes = choose_labels(args.model, labels)
    unknown = sorted(set(held_labels) - set(classes))
    if unknown:
        raise InputError(f"held-out labels {unknown[:5]} never occur in the training data")
    log(f"loading {args.model} as a classifier over {len(classes)} labels: {classes}")
    model = load(args.model, labels=classes)
    tok = load_tokenizer(resolve_model_path(args.model), model_vocab_size=model.config.vocab_size)
    seq_len = check_seq_len(args.seq_len, model.config)
    _apply_freezing(model, args)
    index = {c: i for i, c in enumerate(classes)}
    seqs, targets = encode(tok, texts, seq_len), np.array([index[x] for x in labels])
    if model.config.type_vocab_size < 2 and any(s[1] is not None for s in seqs):
        raise InputError(f"{args.data}: pairs of texts (text_pair) need two token types; "
                         f"{args.model} has {model.config.type_vocab_size}")
    if args.eval_batches and len(held_texts) > args.eval_batches * args.batch_size:
        n = args.eval_batches * args.batch_size
        log(f"note: held-out evaluations use the first {n} of {len(held_texts)} texts "
            f"(--eval-batches {args.eval_batches} x --batch-size {args.batch_size}; 0: all)")
        held_texts, held_labels = held_texts[:n], held_labels[:n]
    held = encode(tok, held_texts, seq_len)
    held_targets = np.array([index[x] for x in held_labels], np.int64)
    cut = sum(len(s[0]) == seq_len for s in seqs)
    if cut:
        log(f"note: {cut} training texts reach --seq-len {seq_len} and may be cut")
    pad = tok.pad_id if tok.pad_id is not None else 0
    micro, steps = _count(len(seqs), args)
    warmup = max(1, round(0.05 * steps)) if args.warmup is None else min(args.warmup, steps)
    sched = CosineSchedule(args.lr, steps, warmup, args.min_lr)
    opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    low = model.lowest_trainable_block()
    caches = (None, None)
    if args.prefix_cache == "memory" and low > 0:
        caches = (PrefixRows(model, seqs, low, args.prefix_dtype),
                  PrefixRows(model, held, low, args.prefix_dtype))
    created = not os.path.exists(args.out)
    _make_out(args.out)
    lock = _lock_out(args.out, log)
    metrics = os.path.join(args.out, "metrics.jsonl")
    cleanup = contextlib.ExitStack()
    try:
        log(f"{len(seqs)} training / {len(held)} held-out texts; {steps} steps of "
            f"{args.batch_size} x {args.grad_accum}; trainable "
            f"{model.num_params(True):,} of {model.num_params():,} parameters")
        base = (evaluate(model, held, held_targets, args.batch_size, pad, caches[1])
                if len(held) else None)
        if base:
            log(f"held-out before: loss {base['loss']:.4f}  accuracy {base['accuracy']:.3f}")
            _log_metric(metrics, {"step": 0, "eval_loss": base["loss"],
                                  "eval_accuracy": base["accuracy"]}, truncate=True)
        rng = np.random.default_rng([args.seed, 11])
        order, at = rng.permutation(len(seqs)), 0
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
                if at >= len(order):
                    order, at = rng.permutation(len(seqs)), 0
                parts.append(order[at:at + args.batch_size])
                at += args.batch_size
            n_all = sum(len(p) for p in parts)
            loss = 0.0
            for idx in parts:
                loss += _forward(model, seqs, idx, pad, caches[0], targets[idx]) * len(idx) / n_all
                model.backward(len(idx) / n_all)
            norm = clip_grad_norm(model, args.clip) if args.clip else None
            if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
                raise DivergedError(f"step {step + 1}: the loss or gradient is not finite "
                                    f"(loss {loss}); try a lower --lr")
            opt.lr = sched(step)
            opt.step()
            done = step + 1
            rec = {"step": step + 1, "loss": loss, "lr": opt.lr, "grad_norm": norm}
            _log_metric(metrics, rec)
            if (step + 1) % 10 == 0 or step + 1 == steps:
                log(f"step {step + 1}/{steps}  loss {loss:.4f}  lr {opt.lr:.2e}  "
                    f"{time.perf_counter() - t0:.1f} s")
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps and len(held):
                mid = evaluate(model, held, held_targets, args.batch_size, pad, caches[1])
                _log_metric(metrics, {"step": step + 1, "eval_loss": mid["loss"],
                                      "eval_accuracy": mid["accuracy"]})
        seconds = time.perf_counter() - t0
        final = (evaluate(model, held, held_targets, args.batch_size, pad, caches[1])
                 if len(held) else None)
        if final:
            log(f"held-out after:  loss {final['loss']:.4f}  accuracy {final['accuracy']:.3f}")
            _log_metric(metrics, {"step": done, "eval_loss": final["loss"],
                                  "eval_accuracy": final["accuracy"]})
        where = _save_final(model, tok, args.out)
        summary = {"status": "done" if done == steps else "interrupted",
                   "task": "classification", "labels": classes, "steps": done,
                   "train_seconds": round(seconds, 2), "base_eval": base, "final_eval": final,
                   "trainable_params": model.num_params(True), "params": model.num_params(),
                   "model": where}
        if caches[0] is not None:
            summary["prefix_cache"] = caches[0].report()
            r = summary["prefix_cache"]
            log(f"prefix cache: blocks below {low} computed once for {r['examples']} training "
                f"texts ({r['mib']} MiB): {1e3 * (r['compute_s_per_example'] or 0):.2f} ms an "
                f"example to compute, {1e3 * (r['read_s_per_example'] or 0):.3f} ms to read")
        write_json(os.path.join(args.out, "summary.json"), summary)
        if stop["signal"] is not None:
            summary["signal"] = stop["signal"]
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


def eval_classifier(model_path: str, data: str, batch_size: int, seq_len: int) -> dict:
    """`tailtune eval` of a classifier: loss and accuracy on labeled JSONL."""
    texts, labels = read_labeled(data)
    model = load(model_path)
    if model.config.labels is None:
        raise InputError(f"{model_path} is an encoder without a classifier head: fine-tune it "
                         "on labeled data first (tailtune finetune)")
    unknown = sorted(set(labels) - set(model.config.labels))
    if unknown:
        raise InputError(f"{data}: labels {unknown[:5]} are not among the model's "
                         f"{model.config.labels}")
    tok = load_tokenizer(resolve_model_path(model_path), model_vocab_size=model.config.vocab_size)
    index = {c: i for i, c in enumerate(model.config.labels)}
    seqs = encode(tok, texts, min(seq_len, model.config.context_length))
    pad = tok.pad_id if tok.pad_id is not None else 0
    return evaluate(model, seqs, np.array([index[x] for x in labels], np.int64), batch_size, pad)
