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
import hashlib
import math
import os
import shutil
import time

import numpy as np

from .classify import ClassifierTask, _first_row
from .errors import CheckpointError, DivergedError, InputError
from .io import write_json
from .optim import AdamW, CosineSchedule, clip_grad_norm
from .probes import Telemetry


def finetune_encoder(args, log=print, resume: str | None = None, given=None) -> dict:
    """`tailtune finetune` of an encoder: a classifier on {"text", "label"} rows, or sentence
    embeddings on {"anchor", "positive"} rows. TrainArgs as for a causal LM; the flags only
    those have are refused with the reason. resume: a run directory (or its checkpoint) to
    continue; given: the fields the user set (as for train.finetune)."""
    from .train import _apply_freezing, _check_out, resumed_args
    args.validate()
    state = ck = None
    if resume:
        args, ck, state = resumed_args(args, resume, given, log)
    if args.sample_prompt is not None:
        raise InputError("--sample-prompt is not available for an encoder: it generates text "
                         "(causal LMs)")
    if args.prefix_cache == "disk":
        raise InputError("--prefix-cache disk is not available for an encoder yet: use "
                         "--prefix-cache memory")
    _check_out(args, resuming=resume is not None)
    row = _first_row(args.data)
    if isinstance(row, dict) and "anchor" in row:
        from .sentence import PairsTask
        task = PairsTask(args, log)
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
        return {"epoch": self.epoch, "cursor": self.at, "order": self.perm.tolist(),
                "rng": self.rng.bit_generator.state}


def _file_hash(path: str | None) -> str:
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


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
    if state["step"] > steps:
        raise CheckpointError(f"{ck}: the checkpoint is at step {state['step']}, past the run's "
                              f"{steps} steps (damaged checkpoint)")


def run_encoder(args, task, log, schedule=None, state=None, ck=None) -> dict:
    """The steps of an encoder run, its evaluations before and after, the saved model; a
    freezing schedule (engine/schedules.py) changing the trainable set before each step, and
    telemetry (--telemetry-every) in the metrics, as in a causal LM's run. state, ck: the
    trainer state and directory of a checkpoint to continue from."""
    from .train import (_lock_out, _log_metric, _make_out, _save_final, _truncate_metrics,
                        fingerprint, load_checkpoint, recorded_args, resume_command,
                        save_checkpoint)
    model, metric = task.model, task.metric
    base_fp = fingerprint(model)        # of the model as loaded: the run's starting point
    hashes = {"train": _file_hash(args.data), "eval": _file_hash(args.eval_data)}
    micro, steps = _count(task.n_train, args)
    if state is not None:
        _check_state(state, ck, task, base_fp, hashes, steps)
    warmup = max(1, round(0.05 * steps)) if args.warmup is None else min(args.warmup, steps)
    # a schedule that anneals each block itself (FreezeOut) keeps only the global warmup
    anneals = schedule is not None and schedule.anneals
    sched = CosineSchedule(args.lr, steps, warmup, args.lr if anneals else args.min_lr)
    opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    if state is not None:   # the checkpoint's trainable set (its optimizer state's); the loop
        if schedule is not None:   # then changes it at the next step as the run did
            schedule.load_state_dict(state.get("schedule", {}))
        model.set_trainable(state["trainable"])
    elif schedule is not None:
        schedule.apply(model, opt, 0, steps)
    # under a schedule: every parameter that ever trained (the summary counts them)
    trained = set(model.trainable) | set(state.get("trained") or ()) if state else set(model.trainable)
    telemetry = None
    if args.telemetry_every:
        tokens, lengths, types = task.probe()
        # made before a checkpoint is loaded: what trained before still holds its pretrained
        # weights here, for drift and CKA
        telemetry = Telemetry(model, tokens, args.telemetry_every, total_steps=steps,
                              pretrained=sorted(trained) if state else (), lengths=lengths,
                              types=types)
    if state is not None:
        load_checkpoint(ck, model, opt)
    task.start(model)                   # (prefix caches: after the checkpoint's weights)
    start = state["step"] if state else 0
    order = _Order(task.n_train, args.seed, state["data"] if state else None)
    recorded = recorded_args(args)
    resume_cmd = resume_command(recorded, args.out)
    created = not os.path.exists(args.out)
    _make_out(args.out)
    lock = _lock_out(args.out, log)
    metrics = os.path.join(args.out, "metrics.jsonl")
    ck_dir = os.path.join(args.out, "checkpoint")
    cleanup = contextlib.ExitStack()
    done, base, updating = start, None, False

    def evaluation(step, first=False):
        r = task.evaluate()
        if r is not None:
            _log_metric(metrics, {"step": step, "eval_loss": r["loss"], f"eval_{metric}": r[metric]},
                        truncate=first)
        return r

    def checkpoint():
        save_checkpoint(ck_dir, model, task.tok, opt, {
            "step": done, "data": order.state(), "task": task.kind,
            "schedule": schedule.state_dict() if schedule is not None else {},
            "trained": sorted(trained), "trainable": model.trainable,
            "args": dataclasses.asdict(recorded), "base_fingerprint": base_fp,
            "encoder_eval_before": base, "data_hashes": hashes})
    try:
        log(f"{task.n_train} training / {task.n_held} held-out rows; {steps} steps of "
            f"{args.batch_size} x {args.grad_accum}; trainable "
            f"{model.num_params(True):,} of {model.num_params():,} parameters")
        if state is None:
            base = evaluation(0, first=True)
        else:
            base = state.get("encoder_eval_before")
            _truncate_metrics(metrics, start)
            log(f"resumed at step {start} of {steps}")
        if base:
            log(f"held-out before: loss {base['loss']:.4f}  {metric} {base[metric]:.3f}")
        t0 = time.perf_counter()
        stop = _on_signals(cleanup)
        for step in range(start, steps):
            if stop["signal"] is not None:
                break
            t_step = time.perf_counter()
            if schedule is not None and _change(schedule, model, opt, step, steps, task):
                trained.update(model.trainable)
            model.zero_grad()
            parts = [order.take(args.batch_size, task.min_batch)
                     for _ in range(min(args.grad_accum, micro - step * args.grad_accum))]
            n_all = sum(len(p) for p in parts)
            loss = sum(task.step(idx, len(idx) / n_all) * len(idx) / n_all for idx in parts)
            if schedule is not None:
                schedule.observe(model, step)
            if telemetry is not None:   # before clipping: the layers' own gradient norms
                telemetry.before_update(step)
            norm = clip_grad_norm(model, args.clip) if args.clip else None
            if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
                raise DivergedError(f"step {step + 1}: the loss or gradient is not finite "
                                    f"(loss {loss}); try a lower --lr")
            opt.lr = sched(step)
            updating = True     # a failure inside the update leaves the weights half-updated
            opt.step()
            updating = False
            done = step + 1
            # under lr-decay and FreezeOut each block has its own rate: the highest one applied
            top = max((opt.lr_scale.get(n, 1.0) for n in model.grads), default=1.0)
            rec = {"step": done, "loss": loss, "lr": opt.lr * top, "grad_norm": norm,
                   "examples": n_all, "step_s": time.perf_counter() - t_step}
            if schedule is not None:
                rec["trainable_blocks"] = model.trainable_blocks()
            if telemetry is not None and telemetry.due(step):
                rec["telemetry"] = telemetry.record(step, opt)
            _log_metric(metrics, rec)
            if done % 10 == 0 or done == steps:
                log(f"step {done}/{steps}  loss {loss:.4f}  lr {rec['lr']:.2e}  "
                    f"{time.perf_counter() - t0:.1f} s")
            if args.eval_every and done % args.eval_every == 0 and done < steps:
                evaluation(done)
            if args.save_every and done % args.save_every == 0 and done < steps:
                checkpoint()
        seconds = time.perf_counter() - t0
        if done < steps:   # Ctrl-C: the run can go on from here; the model so far is saved too
            checkpoint()
            log(f"interrupted at step {done}: checkpoint saved; continue with {resume_cmd}")
        final = evaluation(done)
        if final:
            log(f"held-out after:  loss {final['loss']:.4f}  {metric} {final[metric]:.3f}")
        where = _save_final(model, task.tok, args.out, task.save_extra)
        summary = {"status": "done" if done == steps else "interrupted", "task": task.kind,
                   **task.summary(log), "steps": done, "train_seconds": round(seconds, 2),
                   "base_eval": base, "final_eval": final,
                   "trainable_params": sum(model.params[n].size for n in trained),
                   "params": model.num_params(), "model": where}
        if schedule is not None:
            summary["schedule"] = args.schedule
        if stop["signal"] is not None:
            summary["signal"] = stop["signal"]
        write_json(os.path.join(args.out, "summary.json"), summary)
        if done == steps:   # superseded by model/ and the summary
            shutil.rmtree(ck_dir, ignore_errors=True)
        _plots(metrics, args.out, telemetry is not None, log)
        log(f"saved {where}")
        return summary
    except BaseException as e:
        if (isinstance(e, Exception) and not isinstance(e, DivergedError) and done > start
                and not updating and set(opt.state) == set(model.grads)):
            try:   # the steps done so far are whole: keep them
                checkpoint()
                log(f"training stopped after step {done} (the error follows); the steps done "
                    f"are in a checkpoint: continue with {resume_cmd}")
            except Exception as e2:   # the disk that failed may fail this too
                log(f"training stopped after step {done} (the error follows), and no "
                    f"checkpoint of it could be written ({e2})")
        if state is None and not os.path.isdir(ck_dir):
            # nothing to resume: a run that failed leaves no --out behind (a second Ctrl-C
            # during the final save included); one that existed keeps only what it held
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


def _change(schedule, model, opt, step, steps, task) -> bool:
    """The schedule's trainable set and rates for `step`; the task's prefix caches follow a
    change. True when the set changed."""
    changed = schedule.apply(model, opt, step, steps)
    if changed:
        task.start(model)
    return changed


def _plots(metrics, out, telemetry, log):
    """loss.png (and telemetry.png) of the run's metrics.jsonl; a failure (no matplotlib, a
    full disk) fails no run."""
    from .train import _plot, _plot_telemetry
    loss = lambda m, png, log: _plot(m, png, log, ylabel="loss (nats per example)")  # noqa: E731
    for plot, png in ((loss, "loss.png"), *(((_plot_telemetry, "telemetry.png"),) if telemetry else ())):
        try:
            plot(metrics, os.path.join(out, png), log)
        except OSError as e:
            log(f"note: no {png} ({e.strerror or e})")


def _on_signals(cleanup) -> dict:
    """Ctrl-C (SIGINT, SIGTERM; SIGBREAK on Windows) ends the run after the current step, which
    then checkpoints, evaluates and saves as at its end; a second one stops at once. The
    handlers before are put back when `cleanup` closes."""
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
