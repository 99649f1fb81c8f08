"""The fine-tuning run of an encoder (`tailtune finetune` when the model is a BERT): a
classifier (engine/classify.py) or a sentence encoder (engine/sentence.py), stepped with AdamW
under a freezing schedule, with telemetry, held-out evaluations, checkpoints and --resume.

A run directory holds metrics.jsonl (a line per step and per evaluation), summary.json,
loss.png (telemetry.png), model/ (the fine-tuned model in the Hugging Face layout, with the
tokenizer) and, while the run is not done, checkpoint/: the weights, the optimizer's state and
where the run is (batch order, schedule, trainable set), written every --save-every steps, on
Ctrl-C and when a step fails after others were done; `--resume DIR` continues from it exactly
(the steps after it are those of an uninterrupted run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np

from .classify import ClassifierTask, _first_row
from .errors import CheckpointError, DivergedError, InputError, is_number
from .io import write_json
from .optim import AdamW, CosineSchedule, clip_grad_norm, grad_norm
from .probes import Telemetry


def finetune_encoder(args, log=print, resume: str | None = None, given=None) -> dict:
    """`tailtune finetune` of a classifier on {"text", "label"} rows (an encoder's head, or a
    causal LM's in place of its LM head), an encoder's token classifier on {"tokens", "tags"}
    rows, or an encoder's sentence embeddings on {"anchor", "positive"} rows. TrainArgs as for a causal LM; the flags only language-model runs have
    are refused with the reason. resume: a run directory (or its checkpoint) to
    continue; given: the fields the user set (as for train.finetune)."""
    from .train import _apply_freezing, _check_out, resumed_args
    args.validate()
    state = ck = None
    if resume:
        args, ck, state = resumed_args(args, resume, given, log)
    if args.sample_prompt is not None:
        raise InputError("--sample-prompt is not available for a classifier or an encoder: it "
                         "generates text (language-model runs)")
    _check_out(args, resuming=resume is not None)
    row = _first_row(args.data)
    if isinstance(row, dict) and "anchor" in row:
        from .sentence import PairsTask
        task = PairsTask(args, log)
    elif isinstance(row, dict) and "tokens" in row:
        from .token_tags import TokenTask
        task = TokenTask(args, log)
    else:
        task = ClassifierTask(args, log)
    schedule = _apply_freezing(task.model, args)
    return run_encoder(args, task, log, schedule, state, ck)


class _Order:
    """The run's batches: a seeded permutation of the training examples, drawn anew when what
    is left of it is too short for a batch; state() is what a checkpoint keeps of it."""

    def __init__(self, n: int, seed: int, state: dict | None = None):
        self.n, self.rng = n, np.random.default_rng([seed, 11])
        if state is None:
            self.perm, self.at, self.epoch = self.rng.permutation(n), 0, 1
            return
        try:
            self.rng.bit_generator.state = state["rng"]
            self.perm = np.asarray(state["order"], np.int64)
            self.at, self.epoch = int(state["cursor"]), int(state["epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the batch order is not what tailtune writes ({e!r}; damaged "
                                  "checkpoint)") from None
        if sorted(self.perm.tolist()) != list(range(n)):
            raise CheckpointError(f"the batch order is not a permutation of the {n} training "
                                  "examples (another data file, or a damaged checkpoint)")

    def take(self, size: int, min_batch: int) -> np.ndarray:
        if len(self.perm) - self.at < min_batch:    # (a remainder too small: dropped)
            self.perm, self.at = self.rng.permutation(self.n), 0
            self.epoch += 1
        idx = self.perm[self.at:self.at + size]
        self.at += size
        return idx

    def state(self) -> dict:
        """(the permutation is replaced, never changed in place: kept by reference, made a list
        only when a checkpoint is written)"""
        return {"epoch": self.epoch, "cursor": self.at, "order": self.perm,
                "rng": self.rng.bit_generator.state}


def _file_hash(path: str | None) -> str:
    """The data file's hash as tokenize_file records it ("" without a file)."""
    from .data import _hash_file
    return _hash_file(path).hexdigest()[:32] if path else ""


def _check_state(state, ck, task, base_fp, hashes, steps):
    """A checkpoint continues this run only if it was made by an encoder run of this task, from
    this base model, on these data files, and is not past the run's end."""
    if state.get("task") != task.kind:
        raise CheckpointError(f"{ck}: the checkpoint is not of a {task.kind} run (it holds "
                              f"{state.get('task') or 'a causal LM run'})")
    if state["base_fingerprint"] != base_fp:
        raise CheckpointError(f"{ck}: the checkpoint was trained from a different model "
                              "(base fingerprints differ)")
    if state.get("data_hashes") != hashes:
        raise CheckpointError(f"{ck}: the data changed since the checkpoint (the training or "
                              "held-out file holds other contents now); a resumed run needs the "
                              "same data: start a new run")
    before = state.get("encoder_eval_before")
    if before is not None and not (isinstance(before, dict) and is_number(before.get("loss"))):
        raise CheckpointError(f"{ck}: 'encoder_eval_before' is not what tailtune writes there "
                              "(damaged checkpoint)")
    if state["step"] > steps:
        raise CheckpointError(f"{ck}: the checkpoint is at step {state['step']}, past the run's "
                              f"{steps} steps (damaged checkpoint)")


def run_encoder(args, task, log, schedule=None, state=None, ck=None) -> dict:
    """The steps of an encoder run, its evaluations before and after, the saved model; a
    freezing schedule (engine/schedules.py) changing the trainable set before each step, and
    telemetry (--telemetry-every) in the metrics, as in a causal LM's run. state, ck: the
    trainer state and directory of a checkpoint to continue from."""
    from .train import _lock_out, _make_out, fingerprint
    model = task.model
    base_fp = fingerprint(model)        # of the model as loaded: the run's starting point
    hashes = {"train": _file_hash(args.data), "eval": _file_hash(args.eval_data)}
    micro, steps = _count(task.n_train, args)
    if state is not None:
        _check_state(state, ck, task, base_fp, hashes, steps)
    created = not os.path.exists(args.out)
    _make_out(args.out)
    lock = _lock_out(args.out, log)     # before a checkpoint is read: a run still going has it
    try:
        return _Run(args, task, log, schedule, state, ck, base_fp, hashes, micro, steps,
                    created).run()
    finally:
        task.prefix.close()     # (disk: the files of prefixes the run trained deleted)
        if lock is not None:
            os.close(lock)


class _Run:
    """One encoder run, from its --out directory (created and locked) to the summary."""

    def __init__(self, args, task, log, schedule, state, ck, base_fp, hashes, micro, steps, created):
        self.args, self.task, self.log, self.schedule, self.state, self.ck = args, task, log, schedule, state, ck
        self.base_fp, self.hashes, self.micro, self.steps, self.created = base_fp, hashes, micro, steps, created
        self.metrics = os.path.join(args.out, "metrics.jsonl")
        self.ck_dir = os.path.join(args.out, "checkpoint")
        self.start = self.done = state["step"] if state else 0
        self.base = state.get("encoder_eval_before") if state else None
        self.seconds_before = float(state.get("train_seconds", 0.0)) if state else 0.0
        self.updating = False       # inside the optimizer's update: the weights are half-updated
        self.unlogged = None        # the last step's record, until it is in metrics.jsonl
        self.t0 = None              # when this process's steps began

    def run(self) -> dict:
        from .train import _log_metric, _save_final, on_signals, write_plots
        args, task, model, metric = self.args, self.task, self.task.model, self.task.metric
        try:
            self._setup()
            log = self.log
            log(f"{task.n_train} training / {task.n_held} held-out rows; {self.steps} steps of "
                f"{args.batch_size} x {args.grad_accum}; trainable "
                f"{model.num_params(True):,} of {model.num_params():,} parameters"
                f"{'' if model.dropout is None else '; ' + str(model.dropout)}")
            if self.state is None:
                self.base = self._evaluation(0, first=True)
            else:
                log(f"resumed at step {self.start} of {self.steps}")
                if (args.eval_every and 0 < self.start < self.steps
                        and self.start % args.eval_every == 0 and not self._evaluated(self.start)):
                    self._evaluation(self.start)   # the run stopped inside that evaluation
            if self.base:
                log(f"held-out before: loss {self.base['loss']:.4f}  {metric} {self.base[metric]:.3f}")
            with contextlib.ExitStack() as cleanup:
                stop, restore = on_signals()
                cleanup.callback(restore)
                seconds = self._steps(stop)
                if self.done < self.steps:   # Ctrl-C: the run goes on from here with --resume;
                    self._checkpoint()       # the model so far is saved too
                    log(f"interrupted at step {self.done}: checkpoint saved; continue with "
                        f"{self.resume_cmd}")
                # not logged when interrupted: the resumed run's lines are the straight run's
                final = self._evaluation(self.done, log_it=False)
                if final:
                    log(f"held-out after:  loss {final['loss']:.4f}  {metric} {final[metric]:.3f}")
                where = _save_final(model, task.tok, args.out, task.save_extra)
                summary = {"status": "done" if self.done == self.steps else "interrupted",
                           "task": task.kind, **task.summary(log), "steps": self.done,
                           "train_seconds": round(seconds, 2), "base_eval": self.base,
                           "final_eval": final,
                           "trainable_params": sum(model.params[n].size for n in self.trained),
                           "params": model.num_params(), "model": where}
                if self.schedule is not None:
                    summary["schedule"] = args.schedule
                if stop["signal"] is not None:
                    summary["signal"] = stop["signal"]
                write_json(os.path.join(args.out, "summary.json"), summary)
                if final and self.done == self.steps:   # last: a resume redoes all before it
                    _log_metric(self.metrics, {"step": self.done, "eval_loss": final["loss"],
                                               f"eval_{metric}": final[metric]})
        except BaseException as e:
            self._failed(e)
            raise
        if self.done == self.steps:   # superseded by model/ and the summary
            shutil.rmtree(self.ck_dir, ignore_errors=True)
        write_plots(self.metrics, args.out, self.telemetry is not None, self.log,
                    ylabel="loss (nats per example)")
        self.log(f"saved {where}")
        return summary

    def _setup(self):
        """The optimizer, the trainable set and telemetry; a checkpoint's weights and state;
        run.json (checked against a resumed run's directory)."""
        from .train import load_checkpoint, recorded_args, resume_command
        args, model, state, schedule = self.args, self.task.model, self.state, self.schedule
        warmup = max(1, round(0.05 * self.steps)) if args.warmup is None else min(args.warmup, self.steps)
        # a schedule that anneals each block itself (FreezeOut) keeps only the global warmup
        anneals = schedule is not None and schedule.anneals
        self.sched = CosineSchedule(args.lr, self.steps, warmup, args.lr if anneals else args.min_lr)
        self.opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
        if state is not None:   # the checkpoint's trainable set (its optimizer state's); the
            if schedule is not None:   # loop then changes it at the next step as the run did
                schedule.load_state_dict(state.get("schedule", {}))
            model.set_trainable(state["trainable"])
        elif schedule is not None:
            schedule.apply(model, self.opt, 0, self.steps)
        # under a schedule: every parameter that ever trained (the summary counts them)
        self.trained = set(model.trainable) | set(state.get("trained") or ()) if state else set(model.trainable)
        self.telemetry = None
        if args.telemetry_every:
            tokens, lengths, types = self.task.probe()
            # made before a checkpoint is loaded: what trained before still holds its pretrained
            # weights here, for drift and CKA
            self.telemetry = Telemetry(model, tokens, args.telemetry_every, total_steps=self.steps,
                                       pretrained=sorted(self.trained) if state else (),
                                       lengths=lengths, types=types)
        self.recorded = recorded_args(args)
        self.resume_cmd = resume_command(self.recorded, args.out)
        self._run_json()
        if state is not None:
            loaded = load_checkpoint(self.ck, model, self.opt)
            if any(loaded.get(k) != state.get(k) for k in ("step", "opt_t", "data")):
                raise CheckpointError(f"{self.ck}: the checkpoint changed while it was read (a "
                                      "run still going?); resume again once it has stopped")
            from .train import _truncate_metrics
            _truncate_metrics(self.metrics, self.start)
        self.task.start(model, self.trained)   # (prefix caches: after the checkpoint's weights)
        self.order = _Order(self.task.n_train, args.seed, state["data"] if state else None)
        self.position = self._position()

    def _run_json(self):
        path = os.path.join(self.args.out, "run.json")
        run = {"args": dataclasses.asdict(self.recorded), "base_fingerprint": self.base_fp,
               "task": self.task.kind, "trainable": self.task.model.trainable}
        if self.state is not None and os.path.exists(path):    # resumed into a run's directory:
            try:                                                # this run's, or refused
                with open(path) as f:
                    old = json.load(f)
                same = (old.get("base_fingerprint") == self.base_fp and old.get("task") == self.task.kind
                        and _training(old.get("args")) == _training(run["args"]))
            except (OSError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{path}: not a run description ({e}); resume into another "
                                      "--out") from None
            if not same:
                raise CheckpointError(f"{self.args.out}: run.json belongs to another run (another "
                                      "base model, task or training arguments); resume into "
                                      "another --out")
            return
        write_json(path, run)

    def _position(self):
        """Where the run is once a step's update is complete: a failure in the next step
        checkpoints this, not a batch order that has drawn that step's batches or AutoFreeze
        norms that counted it."""
        return (self.order.state(),
                self.schedule.state_dict() if self.schedule is not None else {})

    def _evaluated(self, step) -> bool:
        """metrics.jsonl holds the evaluation of `step`."""
        with contextlib.suppress(OSError):
            with open(self.metrics) as f:
                return any(r.get("step") == step and "eval_loss" in r for r in map(json.loads, f))
        return False

    def _evaluation(self, step, first=False, log_it=True):
        from .train import _log_metric
        r = self.task.evaluate()
        if r is not None and log_it:
            _log_metric(self.metrics, {"step": step, "eval_loss": r["loss"],
                                       f"eval_{self.task.metric}": r[self.task.metric]},
                        truncate=first)
        return r

    def _checkpoint(self):
        from .train import save_checkpoint
        data, sched = self.position
        save_checkpoint(self.ck_dir, self.task.model, self.task.tok, self.opt, {
            "step": self.done, "data": {**data, "order": data["order"].tolist()},
            "task": self.task.kind, "schedule": sched,
            "trained": sorted(self.trained), "trainable": self.task.model.trainable,
            "args": dataclasses.asdict(self.recorded), "base_fingerprint": self.base_fp,
            "encoder_eval_before": self.base, "data_hashes": self.hashes,
            "train_seconds": self.seconds_before + self.elapsed()})

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else time.perf_counter() - self.t0

    def _steps(self, stop) -> float:
        """The steps from where the run is to its end (or a Ctrl-C); the seconds they took."""
        from .train import _log_metric
        args, task, model, opt, schedule = self.args, self.task, self.task.model, self.opt, self.schedule
        self.t0 = time.perf_counter()
        for step in range(self.start, self.steps):
            if stop["signal"] is not None:
                break
            t_step = time.perf_counter()
            if schedule is not None:
                _change(schedule, model, opt, step, self.steps, task, self.trained)
            model.zero_grad()
            parts = [self.order.take(args.batch_size, task.min_batch)
                     for _ in range(min(args.grad_accum, self.micro - step * args.grad_accum))]
            # each micro-batch weighted by its share of what the loss averages over (examples;
            # a token classifier's labeled words), as one batch of them all would be
            weights = [task.weight(idx) for idx in parts]
            n_all, total = sum(len(p) for p in parts), sum(weights)
            loss = 0.0
            for j, (idx, w) in enumerate(zip(parts, weights)):
                if model.dropout is not None:
                    model.dropout.seek(step, j, args.grad_accum)
                loss += task.step(idx, w / total) * w / total
            if schedule is not None:
                schedule.observe(model, step)
            if self.telemetry is not None:   # before clipping: the layers' own gradient norms
                self.telemetry.before_update(step)
            norm = clip_grad_norm(model, args.clip) if args.clip else grad_norm(model)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise DivergedError(f"step {step + 1}: the loss or gradient is not finite "
                                    f"(loss {loss:.4g}, gradient norm {norm:.4g}); try a lower --lr")
            opt.lr = self.sched(step)
            self.updating = True
            opt.step()
            self.updating = False
            self.done = step + 1        # whole from here: a failure after this keeps the step
            self.position = self._position()
            # under lr-decay and FreezeOut each block has its own rate: the highest one applied
            top = max((opt.lr_scale.get(n, 1.0) for n in model.grads), default=1.0)
            rec = self.unlogged = {"step": self.done, "loss": loss, "lr": opt.lr * top,
                                   "grad_norm": norm, "examples": n_all,
                                   "step_s": time.perf_counter() - t_step}
            if schedule is not None:
                rec["trainable_blocks"] = model.trainable_blocks()
            if self.telemetry is not None and self.telemetry.due(step):
                rec["telemetry"] = self.telemetry.record(step, opt)
            _log_metric(self.metrics, rec)
            self.unlogged = None
            if self.done % 10 == 0 or self.done == self.steps:
                self.log(f"step {self.done}/{self.steps}  loss {loss:.4f}  lr {rec['lr']:.2e}  "
                         f"{time.perf_counter() - self.t0:.1f} s")
            if args.eval_every and self.done % args.eval_every == 0 and self.done < self.steps:
                self._evaluation(self.done)
            if args.save_every and self.done % args.save_every == 0 and self.done < self.steps:
                self._checkpoint()
        return self.seconds_before + self.elapsed()

    def _failed(self, e: BaseException):
        """The run failed (or a second Ctrl-C stopped it): the steps done are kept in a
        checkpoint when they are whole; a new run that did none leaves no --out behind."""
        from .train import _log_metric
        model = self.task.model
        if (self.done > self.start and not self.updating and not isinstance(e, DivergedError)
                and set(self.opt.state) == set(model.grads)):
            if self.unlogged is not None:          # the last step's line, as far as it got
                with contextlib.suppress(Exception):
                    _log_metric(self.metrics, self.unlogged)
            try:
                self._checkpoint()
                self.log(f"training stopped after step {self.done} (the error follows); the "
                         f"steps done are in a checkpoint: continue with {self.resume_cmd}")
            except BaseException as e2:   # the disk that failed may fail this too
                self.log(f"training stopped after step {self.done} (the error follows), and no "
                         f"checkpoint of it could be written ({e2!r})")
        if ((self.state is None or self.created)
                and not any(os.path.isdir(self.ck_dir + x) for x in ("", ".old"))):
            # nothing to resume here (no step done, a divergence, no checkpoint could be
            # written): a directory this run made goes; one that existed keeps only what it held
            if self.created:
                shutil.rmtree(self.args.out, ignore_errors=True)
            else:
                for f in ("metrics.jsonl", "run.json"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.args.out, f))


def _training(args) -> dict | None:
    """What of a run's recorded arguments determines its weights (the model is compared by its
    fingerprint: a packaged name and its path are one model)."""
    from .train import _NOT_TRAINING, with_defaults
    if not isinstance(args, dict):
        return None
    return {k: v for k, v in with_defaults(args).items() if k not in (*_NOT_TRAINING, "model")}


def _change(schedule, model, opt, step, steps, task, trained: set):
    """The schedule's trainable set and rates for `step`; `trained` (every parameter the run
    has trained) and the task's prefix caches follow a change."""
    if schedule.apply(model, opt, step, steps):
        trained.update(model.trainable)
        task.start(model, trained)


def _count(n_train: int, args) -> tuple[int, int]:
    from .trainer import count_steps
    return count_steps(n_train, args.batch_size, args.grad_accum, args.steps, args.epochs)
