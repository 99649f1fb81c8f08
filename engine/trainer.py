"""The optimizer steps of a fine-tuning run, over token data in memory: batches, gradient
accumulation, the learning-rate schedule, clipping, a freezing schedule, the frozen-prefix
cache, telemetry and held-out loss. No files are written (a disk prefix cache aside).

`tailtune finetune` (engine/train.py) drives one of these and adds what lives in files: the
run directory, checkpoints and exact resume, evaluations on a timetable, Ctrl-C, progress and
metrics lines. In one's own program:

    tok = engine.load_tokenizer("smollm2")
    rows = [{"prompt": "...", "completion": "..."}, ...]          # or messages, as in JSONL
    train = engine.data.from_rows(tok, rows)                      # also from_text, from_tokens
    model.train_last(2)
    with engine.Trainer(model, train, seq_len=192, steps=100, lr=1e-4,
                        pad_id=tok.batch_pad_id) as trainer:
        for rec in trainer:          # one dict per optimizer step (metrics.jsonl's fields)
            print(rec["step"], rec["loss"])
        print(trainer.evaluate(held))            # mean loss per target token

A schedule (engine.schedules.make) changes the trainable set from the first step on; without
one the model's own trainable set trains throughout.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from . import data as D
from .errors import DivergedError, InputError, check_flags, is_int
from .model import IGNORE, Model
from .optim import AdamW, CosineSchedule, clip_grad_norm, grad_norm
from .prefix_cache import PrefixCache, in_prefix
from .probes import Telemetry


def _forward(model, x, y, idx, cache, grad=True):
    if cache is None:
        return model.forward(x, y, grad=grad)
    return model.forward(x, y, grad=grad, hidden=cache.hidden(idx, x), start=cache.start)


def evaluate(model, examples, indices, batch_size, pad_id, max_batches=None, cache=None,
             progress=None) -> float:
    """Mean loss per target token over the held-out examples. progress(done, total) after
    each batch (train.EvalProgress shows a long evaluation is moving)."""
    total, count = 0.0, 0
    n_batches = math.ceil(len(indices) / batch_size)
    n_batches = min(n_batches, max_batches) if max_batches else n_batches
    for b, (x, y, idx) in enumerate(D.eval_batches(examples, indices, batch_size, pad_id)):
        if max_batches and b >= max_batches:
            break
        n = int((y >= 0).sum())
        if n:
            total += _forward(model, x, y, idx, cache, grad=False) * n
            count += n
        if progress is not None:
            progress(b + 1, n_batches)
    return total / count if count else float("nan")


def count_steps(n_train, batch_size, grad_accum, steps=None, epochs=1.0):
    """(batches drawn, optimizer steps) of a run. An epoch is ceil(n_train / batch_size)
    batches, its last one short when the batch size does not divide it; without `steps` the
    run draws exactly that many passes' batches, so its last step may accumulate fewer than
    grad_accum of them."""
    micro = steps * grad_accum if steps else max(1, math.ceil(epochs * -(-n_train // batch_size)))
    return micro, math.ceil(micro / grad_accum)


def loop_rules(lr) -> tuple:
    """(name, test, what it must be) of the settings the Trainer checks; `tailtune finetune`
    checks its flags by the same ones (prefixed --) before anything is read."""
    count = lambda lo: lambda v: is_int(v) and v >= lo  # noqa: E731
    return (("steps", lambda v: v is None or count(1)(v), "an integer >= 1 (or none: train for epochs)"),
            ("epochs", lambda v: 0 < v < math.inf, "a number > 0"),
            ("batch_size", count(1), "an integer >= 1"),
            ("grad_accum", count(1), "an integer >= 1"),
            ("lr", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("min_lr", lambda v: 0 <= v <= lr, f"between 0 and lr {lr}"),
            ("warmup", lambda v: v is None or count(0)(v), "an integer >= 0"),
            ("weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("clip", lambda v: v >= 0, ">= 0 (0 disables clipping)"),  # a negative one flips the gradient
            ("seed", count(0), "an integer >= 0"),
            ("eval_batches", count(0), "an integer >= 0 (0: all)"),
            ("telemetry_every", count(0), "an integer >= 0 (0: off)"),
            ("prefix_cache", lambda v: v in ("off", "memory", "disk"), "off, memory or disk"),
            ("prefix_dtype", lambda v: v in ("float32", "float16"), "float32 or float16"))


def _examples(data, seq_len, what):
    """An Examples set from Examples or TokenData (cut into seq_len windows / rows)."""
    if isinstance(data, D.Examples):
        if seq_len is not None and seq_len != data.T:
            raise InputError(f"{what}: Examples cut for seq_len {data.T}, and seq_len {seq_len} "
                             "was given (give TokenData to cut it, or leave seq_len out)")
        return data
    if isinstance(data, D.TokenData):
        if seq_len is None:
            raise InputError(f"{what}: token data needs seq_len (the window / longest example)")
        return D.Examples(data, seq_len)
    raise InputError(f"{what}: expected engine.data.Examples or TokenData (engine.data.from_rows, "
                     f"from_text, from_tokens), got {type(data).__name__}")


def _indices(idx, n, what) -> np.ndarray:
    """Example indices, checked: integers in 0..n-1 (a negative one would wrap around)."""
    a = np.asarray(idx)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InputError(f"{what}: expected a 1-D sequence of integer example indices")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise InputError(f"{what}: indices must be in 0..{n - 1} (there are {n} examples)")
    return a


class Trainer:
    """Optimizer steps over `data`; `held` (optional) is what evaluate() scores by default.

    data, held: engine.data.Examples, or TokenData with `seq_len`; train_idx / eval_idx pick
    their examples (default: every example of `data` that has a loss token, every one of
    `held`; held may be `data` itself with disjoint indices, as a held-out split).
    steps: optimizer steps, or `epochs` passes over train_idx when None. Each step draws
    grad_accum batches of batch_size; lr follows a cosine from `lr` to `min_lr` after `warmup`
    steps (default 5%). clip: global gradient-norm clip (0: none). opt: an optimizer made over
    `model` (default AdamW with `weight_decay`). schedule: from engine.schedules.make.
    prefix_cache: "off", "memory" or "disk" ($TAILTUNE_CACHE/prefix), stored as prefix_dtype;
    eval_batches caps the held-out batches it holds room for (0: all).
    telemetry_every: per-layer telemetry every N steps, in the step's record (0: off).
    Dropout is the model's own (model.set_dropout(p, seed=...)): each micro-batch draws the
    masks of its step and number, as `finetune --dropout p --seed ...` does.

    state / load: to continue a run, the dict state() gave at a checkpoint, and load(model,
    opt) putting that checkpoint's weights and optimizer state back (train.py does both)."""

    def __init__(self, model, data, held=None, *, train_idx=None, eval_idx=None, seq_len=None,
                 steps=None, epochs=1.0, batch_size=8, grad_accum=1, lr=1e-4, warmup=None,
                 min_lr=0.0, weight_decay=0.0, clip=1.0, seed=0, opt=None, schedule=None,
                 prefix_cache="off", prefix_dtype="float32", eval_batches=0, telemetry_every=0,
                 pad_id=0, log=print, state=None, load=None):
        if not isinstance(model, Model):
            raise InputError(f"model: expected an engine.Model (engine.load(path)), got "
                             f"{type(model).__name__}")
        V = model.config.vocab_size
        given = locals()   # the arguments, by name
        check_flags((
            *((name, given[name], ok, must) for name, ok, must in loop_rules(lr)),
            ("seq_len", seq_len, lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"),
            ("pad_id", pad_id, lambda v: is_int(v) and 0 <= v < V,
             f"a token id in 0..{V - 1} (tok.batch_pad_id)")))
        if opt is not None and getattr(opt, "model", None) is not model:
            raise InputError("opt: an optimizer made over this model (engine.AdamW(model, ...))")
        if schedule is not None and getattr(schedule, "L", None) != model.config.n_layer:
            raise InputError(f"schedule: made for {getattr(schedule, 'L', '?')} blocks, the model "
                             f"has {model.config.n_layer} (engine.schedules.make(name, "
                             f"{model.config.n_layer}, k, ...))")
        if held is None and eval_idx is not None:
            raise InputError("eval_idx picks examples of `held`, and no held set was given")
        self.model, self.schedule, self.log = model, schedule, log
        self.examples = _examples(data, seq_len, "data")
        self.held = None if held is None else (
            self.examples if held is data else _examples(held, seq_len, "held"))
        for what, ex in (("data", self.examples), ("held", self.held)):
            if ex is None or (what == "held" and ex is self.examples):
                continue
            top = int(ex.data.tokens.max()) if len(ex.data.tokens) else -1
            if top >= V:   # found here, not in the middle of the run
                raise InputError(f"{what} holds token id {top}, outside the model's vocabulary "
                                 f"0..{V - 1} (tokenized for another model?)")
        if eval_idx is not None:
            eval_idx = _indices(eval_idx, len(self.held), "eval_idx")
        if train_idx is None:   # every example; of a split `held`, those it does not hold out
            train_idx = np.arange(len(self.examples))
            if self.held is self.examples and eval_idx is not None:
                train_idx = np.setdiff1d(train_idx, eval_idx)
        train_idx = _indices(train_idx, len(self.examples), "train_idx")
        # without loss tokens an example adds nothing (its loss is 0 / 0): left out, and none
        # at all is an error naming why
        D.check_targets(self.examples, train_idx, "data", lambda m: log(f"note: {m}"),
                        "they are left out of training")
        self.train_idx = train_idx[self.examples.targets()[train_idx] > 0]
        self.eval_idx = (np.zeros(0, np.int64) if self.held is None else
                         np.arange(len(self.held)) if eval_idx is None else eval_idx)
        if len(self.eval_idx):
            D.check_targets(self.held, self.eval_idx, "held")
        self._closed = False
        self.pad_id, self.batch_size, self.grad_accum, self.clip = pad_id, batch_size, grad_accum, clip
        self.eval_batches = eval_batches
        self.batches = D.Batches(self.examples, self.train_idx, batch_size, seed, pad_id)
        self.micro_total, self.steps = count_steps(len(self.train_idx), batch_size, grad_accum,
                                                   steps, epochs)
        warmup = warmup if warmup is not None else max(1, self.steps // 20)
        # a schedule that anneals each block itself (FreezeOut) keeps only the global warmup
        anneals = schedule is not None and schedule.anneals
        self.lr_at = CosineSchedule(lr, total=self.steps, warmup=min(warmup, self.steps),
                                    min_lr=lr if anneals else min_lr)
        self.opt = opt if opt is not None else AdamW(model, lr=lr, weight_decay=weight_decay)
        if state is not None:
            if schedule is not None:
                schedule.load_state_dict(state.get("schedule", {}))
                if "trainable" in state:   # the set the checkpoint's optimizer state belongs to;
                    model.freeze()         # the loop then changes it at `step` as the run did
                    model.unfreeze(*state["trainable"])
                else:
                    schedule.apply(model, self.opt, state["step"], self.steps)
        elif schedule is not None:
            schedule.apply(model, self.opt, 0, self.steps)
        if not model.trainable:
            raise InputError("nothing is trainable")
        # every parameter trained so far: a disk prefix cache holding one is never reused
        self.trained = set(model.trainable) | set(state.get("trained") or ()) if state else \
            set(model.trainable)
        self.telemetry = None
        if telemetry_every:
            src, probe_idx = ((self.held, self.eval_idx[:4]) if len(self.eval_idx)
                              else (self.examples, self.train_idx[:4]))
            probe = D.make_batch(src, probe_idx, pad_id)[0]
            probe_len = [max(1, len(src.get(int(i))[0]) - 1) for i in probe_idx]   # without padding
            # made before a resumed run loads its checkpoint: what trained before it still
            # holds its pretrained weights here, for drift and CKA
            earlier = sorted(self.trained) if state is not None else ()
            self.telemetry = Telemetry(model, probe, telemetry_every, total_steps=self.steps,
                                       pretrained=earlier, lengths=probe_len)
        if load is not None:
            load(model, self.opt)
            self.trained.update(model.trainable)
        self.step_no = 0 if state is None else int(state["step"])
        if state is not None:
            self.batches.restore(state["data"])
        self.caches = _Caches(model, self.examples, self.held, self.train_idx, self.eval_idx,
                              self.trained, prefix_cache, prefix_dtype, batch_size, eval_batches,
                              pad_id, log)
        self.updating = False   # True only inside the optimizer's update (a failure there
        self.record = None      # leaves the weights half-updated); record: the last step's, so far
        self._done = self._position()

    def _position(self):
        """Where the run is once a step's update is complete: a failure in the next step (out of
        memory, a full disk) checkpoints this, not a loader that has drawn that step's batch or
        AutoFreeze norms that counted it."""
        return self.batches.state(), self.schedule.state_dict() if self.schedule else {}

    def state(self) -> dict:
        """What continuing this run needs besides the weights and the optimizer's state: the
        steps done, the data position and the schedule's state after the last complete update,
        the trainable set and every parameter trained so far."""
        data, sched = self._done
        return {"step": self.step_no, "data": data, "schedule": sched,
                "trained": sorted(self.trained), "trainable": self.model.trainable}

    @property
    def changing(self) -> bool:
        """A failure left the trainable set half-changed (optimizer state not matching it)."""
        return set(self.opt.state) != set(self.model.grads)

    def step(self) -> dict:
        """One optimizer step; its record: step, loss, lr, grad_norm, tokens, tokens_per_s,
        trainable_blocks (and telemetry when due). A DivergedError before a non-finite update."""
        self._check_open()
        if self.step_no >= self.steps:
            raise InputError(f"the run's {self.steps} steps are done")
        model, opt, step = self.model, self.opt, self.step_no
        t0 = time.perf_counter()
        if self.schedule is not None and self.schedule.apply(model, opt, step, self.steps):
            self.caches.refresh()
            self.trained.update(model.trainable)
        opt.lr = self.lr_at(step)
        model.zero_grad()
        # accumulated micro-batches give what one batch of them all would: each weighted by its
        # share of the target positions (not 1 / grad_accum: a micro-batch with few targets
        # would weigh each of them more)
        n_micro = min(self.grad_accum, self.micro_total - step * self.grad_accum)
        micro = [self.batches.next() for _ in range(n_micro)]
        n_targets = [int((y != IGNORE).sum()) for _, y, _ in micro]
        loss, ntok = 0.0, 0
        for j, ((x, y, idx), n) in enumerate(zip(micro, n_targets)):
            ntok += sum(len(self.examples.get(int(i))[0]) - 1 for i in idx)   # inputs, not padding
            if model.dropout is not None:
                model.dropout.seek(step, j, self.grad_accum)
            if n:
                share = n / sum(n_targets)
                loss += share * _forward(model, x, y, idx, self.caches.train)
                model.backward(scale=share)
        if self.schedule is not None:
            self.schedule.observe(model, step)
        if self.telemetry is not None:   # before clipping: the layers' own gradient norms
            self.telemetry.before_update(step)
        gnorm = clip_grad_norm(model, self.clip) if self.clip else grad_norm(model)
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            # diverged: stop before this update (no NaN weights to save as the result)
            why = (f"try a lower --lr than {self.lr_at.lr:g}" if step else
                   "this is before any update, so the model or the data give it, not the "
                   "learning rate (with --prefix-dtype float16, try float32)")
            raise DivergedError(f"step {step + 1}: training diverged (loss {loss:.4g}, gradient "
                                f"norm {gnorm:.4g}); {why}. No model was saved")
        self.updating = True
        opt.step()
        self.updating = False
        self.step_no += 1   # whole from here: a failure after this point keeps it
        self._done = self._position()
        tok_s = ntok / (time.perf_counter() - t0)
        # under lr-decay and FreezeOut each block has its own rate: the highest one applied
        top = max((opt.lr_scale.get(n, 1.0) for n in model.grads), default=1.0)
        self.record = rec = {"step": self.step_no, "loss": loss, "lr": opt.lr * top,
                             "grad_norm": gnorm, "tokens": ntok, "tokens_per_s": tok_s,
                             "trainable_blocks": model.trainable_blocks()}
        if self.telemetry is not None and self.telemetry.due(step):
            rec["telemetry"] = self.telemetry.record(step, opt)
        return rec

    def __iter__(self):
        while self.step_no < self.steps:
            yield self.step()

    def evaluate(self, data=None, indices=None, max_batches=None, progress=None):
        """Mean loss per target token: of `held` (through its prefix cache; None without a
        held-out set), or of other data (Examples / TokenData, cut as the training data)."""
        self._check_open()
        if data is None:
            if not len(self.eval_idx):
                return None
            return evaluate(self.model, self.held, self.eval_idx, self.batch_size, self.pad_id,
                            max_batches or self.eval_batches, self.caches.eval, progress)
        ex = _examples(data, self.examples.T, "data")
        idx = np.arange(len(ex)) if indices is None else np.asarray(indices, np.int64)
        return evaluate(self.model, ex, idx, self.batch_size, self.pad_id, max_batches, None, progress)

    def prefix_cache_report(self):
        return self.caches.report()

    def close(self):
        """Lets the prefix caches go (their disposable files deleted); the trainer is done."""
        self._closed = True
        self.caches.close()

    def _check_open(self):
        if self._closed:
            raise InputError("this Trainer is closed (its prefix caches are gone): make a new one")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Caches:
    """The frozen-prefix caches of a run (training and held-out data), moved when a schedule
    changes the lowest trainable block: rebuilt lower when it unfreezes a block inside the
    cached prefix, filled from the old rows when it freezes the lowest blocks. `trained` holds
    every parameter the run has trained so far: a disk file whose prefix holds one of them can
    never be reused, and is deleted when the cache moves and at the end of the run."""

    def __init__(self, model, examples, held, train_idx, eval_idx, trained: set, mode="off",
                 dtype="float32", batch_size=8, eval_batches=0, pad_id=0, log=print):
        self.model, self.examples, self.held, self.log = model, examples, held, log
        self.trained, self.pad_id, self.batch_size = trained, pad_id, batch_size
        self.mode, self.dtype = mode, dtype
        # room only for the examples a run reads: its training ones, and the held-out ones that
        # evaluate() reaches under eval_batches
        cap = eval_batches * batch_size if eval_batches else None
        self.train_rows, self.eval_rows = np.asarray(train_idx), np.asarray(eval_idx)[:cap]
        self.train = self.eval = None
        self.built: list[PrefixCache] = []     # every training-data cache of the run, for report()
        self.held_built: list[PrefixCache] = []
        try:
            self.refresh()
        except BaseException:   # the run's own close() never comes: delete disposable files now
            self.close()
            raise

    def refresh(self):
        if self.mode == "off":
            return
        start = self.model.lowest_trainable_block()
        if self.train is not None and self.train.start == start and self.train.valid_for(self.model):
            return
        if start <= 0:
            if not self.built:
                self.log("prefix cache: not used while block 0 (or an embedding) is trainable: "
                         "there is no frozen prefix")
            self.close()
            self.train = self.eval = None
            return
        d = os.path.join(D.cache_root(), "prefix") if self.mode == "disk" else None

        # the lowest blocks froze, and what lies below them did not train
        up = self.train is not None and self.train.start < start and self.train.valid_for(self.model)

        shared = self.held is self.examples   # one cache serves both

        def make(ex, old, rows):
            c = PrefixCache(self.model, ex, start, self.dtype, d, ex.data.key,
                            disposable=any(in_prefix(n, start) for n in self.trained), rows=rows)
            if up:
                c.fill_from(old, self.batch_size, self.pad_id)
            return c

        old_train, old_eval = self.train, self.eval
        self.train = make(self.examples, old_train, np.union1d(self.train_rows, self.eval_rows)
                          if shared else self.train_rows)
        self.built.append(self.train)   # before the next can fail: close() deletes its files
        self.eval = self.train if shared else (
            None if self.held is None else make(self.held, old_eval, self.eval_rows))
        if self.eval is not None and self.eval is not self.train:
            self.held_built.append(self.eval)
        for c in (old_train, old_eval):
            if c is not None:
                c.close()
        held_bytes = self.eval.nbytes if self.eval is not None and self.eval is not self.train else 0
        mib = (self.train.nbytes + held_bytes) / 2**20
        how = f", {int(self.train.filled.sum())} rows carried up from block {old_train.start}" if up else ""
        self.log(f"prefix cache: inputs of block {start} ({self.dtype}, {self.mode}, {mib:.0f} MiB{how})")

    def close(self):
        """At the end of the run: every cache let go, the disposable files deleted."""
        for c in self.built + self.held_built:
            c.close()

    def report(self):
        """Measured cost of a prefix recompute against a read, over every cache of the run
        (the training data's, and a separate held-out file's)."""
        if not self.built:
            return None
        caches = self.built + self.held_built
        rs = [c.report() for c in caches]
        computed, reads = sum(r["examples_computed"] for r in rs), sum(r["reads"] for r in rs)
        hits = sum(r["hits"] for r in rs)
        compute_s, read_s = sum(c.compute_s for c in caches), sum(c.read_s for c in caches)
        last = rs[len(self.built) - 1]              # start block, bytes: the last training cache's
        r = {**last, "examples_computed": computed, "reads": reads, "hits": hits,
             "compute_ms_per_example": 1e3 * compute_s / computed if computed else float("nan"),
             "read_ms_per_example": 1e3 * read_s / reads if reads else float("nan"),
             "caches": rs}
        each = lambda n, ms, p: f" at {ms:.{p}f} ms each" if n else ""   # noqa: E731
        self.log(f"prefix cache: computed {computed} prefixes"
                 f"{each(computed, r['compute_ms_per_example'], 2)}, served {reads} rows to "
                 f"training steps and evaluations ({hits} from the cache, the rest computed when "
                 "first asked for)"
                 f"{each(reads, r['read_ms_per_example'], 3)}"
                 + (f" (over {len(rs)} caches, at blocks {', '.join(str(x['start_block']) for x in rs)})"
                    if len(rs) > 1 else ""))
        return r
