"""A fine-tuning run from files to a run directory: `tailtune finetune`. The steps themselves
are engine/trainer.py's Trainer; around it this adds the data files, held-out evaluations on a
timetable, checkpoints and exact resume, SIGINT, progress and metrics.

A run directory holds:
  run.json            the arguments and the base model's fingerprint (what makes it "this run")
  metrics.jsonl       one line per step (loss, lr, grad norm, tokens/s) and per evaluation
  checkpoint/         the latest checkpoint: the model in the Hugging Face layout (loads in
                      transformers), tokenizer files, optimizer.safetensors, trainer_state.json
  model/              the final fine-tuned model (Hugging Face layout + tokenizer)
  summary.json, loss.png
Directories are written under a temporary name and renamed into place, so a crash mid-write
never leaves a checkpoint that looks valid but is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import data as D
from . import schedules
from .errors import (CheckpointError, ConfigError, DivergedError, InputError, check_flags, is_int,
                     is_number)
from .generate import generate, stop_ids
from .io import load_params, remove_abandoned, save_model, write_json
from .io.hf_names import config_to_hf
from .io.resolve import resolve_model_path
from .io.safetensors import SafetensorsFile, write as write_safetensors
from .model import Model
from .probes import plot_telemetry
from .tokenizer import load_tokenizer
from .trainer import Trainer, count_steps, loop_rules

STATE = "trainer_state.json"


@dataclass
class TrainArgs:
    model: str                          # model path or packaged name ("smollm2")
    data: str                           # .txt or .jsonl training file
    out: str                            # run directory
    eval_data: str | None = None        # held-out file; else eval_fraction of data
    eval_fraction: float = 0.1
    train_last: int | None = None       # trainable tail: last K blocks + final norm
    unfreeze: list = field(default_factory=list)  # globs of trainable params (with train_last: beside its blocks)
    steps: int | None = None            # optimizer steps (default: from epochs)
    epochs: float = 1.0
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int | None = None           # default: 5% of the steps
    min_lr: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    dropout: float = 0.0                # in the trained blocks (engine/dropout.py); 0: off
    attention_dropout: float | None = None   # of the attention probabilities (default: dropout)
    eval_every: int = 0                 # 0: only before and after training
    eval_batches: int = 50              # cap on held-out batches per evaluation
    save_every: int = 0                 # 0: only at the end (and on Ctrl-C)
    seed: int = 0
    sample_prompt: str | None = None    # generate from it before and after (default: a held-out prompt)
    sample_tokens: int = 48
    schedule: str = "static"            # freezing schedule (engine/schedules.py); k = train_last
    schedule_every: int = 50            # gradual / autofreeze / lisa: steps between changes
    lr_decay: float = 0.8               # lr-decay: factor per block below the top
    freezeout_t0: float = 0.5           # freezeout: when the lowest trainable block stops
    freezeout_spacing: str = "linear"   # freezeout: the blocks' stop times, linear | squared | cubic
    freezeout_scaled: bool = False      # freezeout: block i starts at lr / t_i (its stop time)
    autofreeze_threshold: float = 0.05  # autofreeze: relative gradient-norm change to freeze
    prefix_cache: str = "off"           # frozen-prefix activation cache: off | memory | disk
    prefix_dtype: str = "float32"       # ... stored as float32 or float16
    telemetry_every: int = 0            # per-layer telemetry every N steps (0: off)

    def validate(self):
        """Reject values that would train silently wrong or fail late with a message that does
        not name them; called before anything is read or written. Messages name the CLI flag
        (the field name with dashes)."""
        pos = lambda v: v >= 1  # noqa: E731
        nonneg = lambda v: v >= 0  # noqa: E731   (False for NaN too)
        # the loop's own settings by the Trainer's rules; then what only a run from files has
        rules = (*loop_rules(self.lr), ("seq_len", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
                 ("eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
                 ("eval_every", nonneg, ">= 0 (0: before and after training only)"),
                 ("save_every", nonneg, ">= 0 (0: at the end and on Ctrl-C only)"),
                 ("train_last", lambda v: v is None or v >= 0, ">= 0"),
                 ("schedule_every", pos, ">= 1"),
                 ("lr_decay", *schedules.RANGES["decay"]),
                 ("freezeout_t0", *schedules.RANGES["t0"]),
                 ("freezeout_spacing", lambda v: v in schedules.SPACINGS, "linear, squared or cubic"),
                 ("freezeout_scaled", lambda v: isinstance(v, bool), "True or False"),
                 ("autofreeze_threshold", *schedules.RANGES["threshold"]),
                 ("sample_tokens", nonneg, ">= 0"),
                 ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                 ("attention_dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1)"))
        check_flags((f"--{name.replace('_', '-')}", getattr(self, name), ok, must)
                    for name, ok, must in rules)

    def training_fields(self) -> dict:
        """What determines the weights: a resumed run must agree on all of it."""
        d = dataclasses.asdict(self)
        for k in _NOT_TRAINING:
            d.pop(k)
        return d


DEFAULT_TRAIN_LAST = 2   # blocks trained when neither --train-last nor --unfreeze is given


# Arguments that do not change the weights: a resumed run takes them from the command line.
_NOT_TRAINING = ("out", "eval_every", "save_every", "sample_prompt", "sample_tokens", "eval_batches",
                 "prefix_cache", "telemetry_every")


def with_defaults(recorded: dict) -> dict:
    """A run's recorded arguments, with the fields added to TrainArgs since it was recorded
    at their defaults (what that run ran with), so that it still compares equal to itself."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainArgs)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {**defaults, **recorded}


def fingerprint(model: Model) -> str:
    """Hash of the config and every weight: identifies the base model of a run."""
    h = hashlib.sha256(json.dumps(model.config.architecture(), sort_keys=True).encode())
    for n in sorted(model.params):
        h.update(n.encode())
        h.update(np.ascontiguousarray(model.params[n]).data)
    return h.hexdigest()[:32]


class Progress:
    """One status line on a terminal (loss, tokens/s, ETA); plain lines otherwise."""

    def __init__(self, total, stream=None, every=10):
        stream = stream or sys.stderr   # looked up now: sys.stderr may be replaced after import
        self.total, self.stream, self.every = total, stream, every
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.first = None

    def update(self, step, loss, tok_s):
        done = step + 1
        if self.first is None:
            self.first = (done, time.perf_counter())
        d0, t0 = self.first
        rate = (done - d0) / max(1e-9, time.perf_counter() - t0)
        eta = (self.total - done) / rate if rate > 0 and done > d0 else float("nan")
        bar = "#" * int(20 * done / self.total)
        msg = (f"step {done}/{self.total} [{bar:<20}] loss {loss:.4f} | {tok_s:,.0f} tok/s | "
               f"ETA {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + msg + "\x1b[K")
            if done == self.total:
                self.stream.write("\n")
        elif done % self.every == 0 or done == self.total or done == 1:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def newline(self):
        if self.tty:
            self.stream.write("\n")


def _fmt_time(s):
    if not math.isfinite(s):
        return "--"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- setup --------------------------------------------------------------------------------
def _check_out(args: TrainArgs, resuming: bool):
    """Fail early on an --out that cannot be used; the directory itself is created only once
    everything else has been checked (_make_out), so a failed start leaves nothing behind."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not resuming:
        raise InputError(f"--out {args.out} already holds {_what_is_in(args)}; nothing was changed. "
                         f"Choose another --out (or delete that directory)")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"--out {args.out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {args.out}: no permission to write in {parent}")


def _make_out(path: str):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {path}: cannot create the directory ({e.strerror or e})") from None


def _paths_absolute(fields: dict) -> dict:
    """Training fields with the paths absolute, as run.json records them."""
    out = {**fields, **{k: fields[k] and os.path.abspath(fields[k])
                        for k in ("data", "eval_data") if k in fields}}
    if "model" in fields:
        out["model"] = _model_place(fields["model"])
    return out


def _model_place(model: str):
    """Where a --model names, for comparing two of them; the name itself when it names nothing
    here (a run recorded before model paths were recorded absolute, from another directory)."""
    try:
        return os.path.abspath(resolve_model_path(model))
    except (CheckpointError, InputError):
        return model


def _what_is_in(args: TrainArgs) -> str:
    try:
        with open(os.path.join(args.out, "run.json")) as f:
            old = with_defaults(json.load(f)["args"])
        same = _paths_absolute({k: v for k, v in old.items() if k not in _NOT_TRAINING}) == \
            _paths_absolute(args.training_fields())
    except (ValueError, KeyError, TypeError, AttributeError):
        return "a different run"
    except OSError:
        return "other files"
    if not same:
        return "a different run"
    resume = f"this same run, unfinished (continue it with {_command_line(['--resume', args.out])})"
    if os.path.isdir(os.path.join(args.out, "checkpoint")):
        return resume      # (an encoder run that Ctrl-C stopped has written a summary too)
    if os.path.exists(os.path.join(args.out, "summary.json")):
        return "this same run, finished"
    if (os.path.isfile(os.path.join(args.out, "model", "config.json"))
            and not os.path.isdir(os.path.join(args.out, "checkpoint"))):
        return f"this same run, finished (its model is in {os.path.join(args.out, 'model')})"
    try:
        _checkpoint_dir(args.out)
    except CheckpointError:
        # Not reused: a run still going (no checkpoint until --save-every or Ctrl-C) looks the same.
        return ("this same run, unfinished and without a checkpoint (it stopped, or is still "
                "running, before saving one), so there is nothing to resume")
    return resume


def _command_line(argv: list[str]) -> str:
    """argv as the user's shell reads it back (paths with spaces or quotes stay one argument)."""
    if os.name == "nt":
        return subprocess.list2cmdline(argv)
    return shlex.join(argv)


def _checkpoint_dir(path: str) -> str:
    """The checkpoint inside a run directory, or the directory itself."""
    for cand in (os.path.join(path, "checkpoint"), path, os.path.join(path, "checkpoint.old")):
        if os.path.isfile(os.path.join(cand, STATE)):
            return cand
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        raise CheckpointError(f"{path}: the run finished (its model is in {path}/model), so there "
                              f"is nothing to resume; to train further, start a new run with "
                              f"--model {path}")
    raise CheckpointError(f"{path}: no checkpoint to resume (no {STATE} found)")


def _read_state(ck: str) -> dict:
    """trainer_state.json of a checkpoint, checked: a damaged one is named, not a traceback."""
    path = os.path.join(ck, STATE)
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e})") from None
    need = {"step": (int, "an integer"), "data": (dict, "an object"), "args": (dict, "an object"),
            "base_fingerprint": (str, "a string"), "opt_t": (int, "an integer"),
            "opt_lr": ((int, float), "a number")}
    for k, (t, what) in need.items():
        if not isinstance(state, dict) or not isinstance(state.get(k), t):
            raise CheckpointError(f"{path}: {k!r} is missing or not {what} (damaged checkpoint)")
    if not all(is_int(state["data"].get(k)) and state["data"][k] >= 0 for k in ("epoch", "cursor")) \
            or state["step"] < 0 or state["opt_t"] < 0:
        raise CheckpointError(f"{path}: 'step', 'opt_t' and the data position ('epoch', 'cursor') "
                              "must be integers >= 0 (damaged checkpoint)")
    # written since 2026-11-30 (older checkpoints lack them: each has a fallback where it is used)
    optional = {"opt_counts": lambda v: isinstance(v, dict) and all(
                    isinstance(c, dict) and all(is_int(x) and x >= 0 for x in c.values()) for c in v.values()),
                "data_hashes": _two_strings, "data_keys": _two_strings,   # data_keys: 12-01
                "trained": _names, "trainable": _names,
                "eval_before": lambda v: v is None or is_number(v),
                "sample_before": lambda v: v is None or isinstance(v, str)}
    for k, ok in optional.items():
        if k in state and not ok(state[k]):
            raise CheckpointError(f"{path}: {k!r} is not what tailtune writes there (damaged checkpoint)")
    return state


def _two_strings(v) -> bool:
    return isinstance(v, dict) and set(v) == {"train", "eval"} and all(isinstance(x, str) for x in v.values())


def _names(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(n, str) for n in v)


def check_seq_len(seq_len: int, cfg) -> int:
    """--seq-len, refused when past the model's context (finetune, eval and inspect)."""
    if seq_len > cfg.context_length:
        raise InputError(f"--seq-len {seq_len} exceeds the model's context of "
                         f"{cfg.context_text()}")
    return seq_len


def check_train_last(k: int, cfg) -> int:
    """--train-last, refused when past the model's depth (finetune and inspect)."""
    if not 0 <= k <= cfg.n_layer:
        raise InputError(f"--train-last {k}: the model has {cfg.n_layer} blocks")
    return k


def _apply_freezing(model: Model, args: TrainArgs):
    """The initial trainable set, and dropout; returns the schedule (None for a fixed set)."""
    model.set_dropout(args.dropout, args.attention_dropout, seed=args.seed)
    if args.unfreeze and args.train_last is None:   # the globs alone
        if args.schedule != "static":
            raise InputError(f"--schedule {args.schedule} works on blocks: give --train-last K "
                             "(--unfreeze then adds its parameters to the schedule's blocks)")
        model.freeze()
        model.unfreeze(*args.unfreeze)
        schedule = None
    else:
        k = check_train_last(DEFAULT_TRAIN_LAST if args.train_last is None else args.train_last,
                             model.config)
        model.train_last(k)
        if args.unfreeze:   # beside the blocks, throughout
            model.unfreeze(*args.unfreeze)
        schedule = None if args.schedule == "static" else schedules.make(
            args.schedule, model.config.n_layer, k, every=args.schedule_every, decay=args.lr_decay,
            t0=args.freezeout_t0, threshold=args.autofreeze_threshold, seed=args.seed,
            spacing=args.freezeout_spacing, scaled=args.freezeout_scaled, also=args.unfreeze)
    if not model.trainable:
        raise InputError("nothing is trainable")
    return schedule


def load_data(args: TrainArgs, tok, seq_len, log):
    train = D.tokenize_file(args.data, tok, log=log)
    ex = D.Examples(train, seq_len)
    if args.eval_data:
        held = D.Examples(D.tokenize_file(args.eval_data, tok, log=log), seq_len)
        train_idx, eval_idx = np.arange(len(ex)), np.arange(len(held))
    else:
        if len(ex) < 2 and args.eval_fraction > 0:
            raise InputError(f"{args.data}: too little data to hold any out; give --eval-data")
        train_idx, eval_idx = D.split(len(ex), args.eval_fraction, args.seed)
        held = ex
    # without loss tokens the loss is NaN (0 / 0) and nothing trains; a batch of only such
    # examples would stop the run as diverged, so they are left out
    D.check_targets(ex, train_idx, args.data, _warn, "they are left out of training")
    train_idx = train_idx[ex.targets()[train_idx] > 0]
    if len(eval_idx):
        D.check_targets(held, eval_idx, args.eval_data or f"{args.data} (held-out part)",
                        _warn if args.eval_data else None)
    return ex, train_idx, held, eval_idx


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class EvalProgress:
    """Silent for a quick evaluation; one that runs past `after` seconds shows batches done and
    the time left (in place on a terminal, a line every `every` seconds otherwise), so a long
    held-out pass is not mistaken for a hang."""

    def __init__(self, what="held-out loss", stream=None, after=5.0, every=30.0):
        self.what, self.stream = what, stream or sys.stderr
        self.after, self.every = after, every
        self.t0, self.last = time.perf_counter(), None

    def __call__(self, done, total):
        now = time.perf_counter()
        el = now - self.t0
        tty = self.stream.isatty()
        if el < self.after or (not tty and self.last is not None and now - self.last < self.every
                               and done < total):
            return
        msg = (f"{self.what}: batch {done}/{total} | {_fmt_time(el)} so far, ETA "
               f"{_fmt_time(el / done * (total - done))}")
        self.stream.write(("\r" + msg + "\x1b[K" + ("\n" if done == total else "")) if tty else msg + "\n")
        self.stream.flush()
        self.last = now


# ---- checkpoints --------------------------------------------------------------------------
def _write_dir(dst: str, fill) -> None:
    """dst whole or untouched: fill(tmp) writes a temporary sibling, which is then swapped in
    (an old dst kept aside as dst.old until the swap is done). A failure removes the temporary."""
    tmp, old = dst + f".tmp{os.getpid()}", dst + ".old"
    remove_abandoned(os.path.dirname(os.path.abspath(dst)), os.path.basename(dst) + ".tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_checkpoint(dst: str, model, tok, opt, state: dict):
    """A complete checkpoint in dst (written aside, then swapped in)."""
    def fill(tmp):
        save_model(model, tmp)
        tok.save(tmp, token_types=model.config.type_vocab_size > 1)
        tensors = {f"{n}:{k}": a for n, st in opt.state.items() for k, a in st.items()
                   if isinstance(a, np.ndarray)}
        counts = {n: {k: a for k, a in st.items() if not isinstance(a, np.ndarray)}
                  for n, st in opt.state.items()}           # per-parameter step counts
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"), tensors)
        write_json(os.path.join(tmp, STATE), {**state, "opt_t": opt.t, "opt_lr": opt.lr,
                                              "opt_counts": counts})
    try:
        _write_dir(dst, fill)
    except (OSError, CheckpointError) as e:   # named by the checkpoint, not its staging folder
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).rsplit(": ", 1)[-1]
        raise CheckpointError(f"{dst}: could not write the checkpoint: {why}") from None


def _optimizer_names(src: str) -> list[str]:
    """The parameters a checkpoint holds optimizer state for (its trainable set)."""
    st = SafetensorsFile(os.path.join(src, "optimizer.safetensors"))
    return sorted({key.rsplit(":", 1)[0] for key in st.keys()})


def load_checkpoint(src: str, model, opt) -> dict:
    state = _read_state(src)
    cfg, params = load_params(src)
    if cfg.architecture() != model.config.architecture():
        raise CheckpointError(f"{src}: checkpoint holds a different architecture")
    for n in model.params:  # all: a schedule may have frozen blocks after training them
        model.params[n][...] = params[n]
        model._updated[n] = model._updated.get(n, 0) + 1   # new weights: a prefix cache sees it
    st = SafetensorsFile(os.path.join(src, "optimizer.safetensors"))
    loaded = {n: {} for n in opt.state}
    for key in st.keys():
        if ":" not in key:
            raise CheckpointError(f"{src}: optimizer tensor {key!r} is not named parameter:entry "
                                  "(damaged checkpoint)")
        n, k = key.rsplit(":", 1)
        if n not in loaded:
            raise CheckpointError(f"{src}: optimizer state for {n}, which this run does not train")
        loaded[n][k] = st.float32(key)
    for n, entries in loaded.items():   # moments restarted at zero would not resume exactly
        if not entries and "trainable" not in state:
            continue   # an older checkpoint, its trainable set rebuilt: a block joining here
        lost = [k for k, a in opt.state[n].items() if isinstance(a, np.ndarray) and k not in entries]
        if lost:
            raise CheckpointError(f"{src}: optimizer state of {n} lacks {', '.join(lost)} "
                                  "(damaged checkpoint)")
    for n, c in state.get("opt_counts", {}).items():
        if n in loaded:
            loaded[n].update(c)
    try:
        opt.load_state_dict({"t": state["opt_t"], "lr": state["opt_lr"], "state": loaded})
    except InputError as e:
        raise CheckpointError(f"{src}: {e} (damaged checkpoint)") from None
    return state


def _given(args: TrainArgs, given) -> set:
    """The fields the user set: `given` when the caller knows it (the CLI does), else those
    that differ from their defaults."""
    if given is not None:
        return set(given)
    defaults = dataclasses.asdict(TrainArgs(model="", data="", out=""))
    return {k for k, v in dataclasses.asdict(args).items() if v != defaults[k]}


def _check_resume_args(args: TrainArgs, saved: TrainArgs, given: set):
    """A resumed run continues with its own training arguments: one given that differs from
    the run's is an error, not silently ignored."""
    # a path as given and as recorded (absolute) name one file
    mine, theirs = _paths_absolute(args.training_fields()), _paths_absolute(saved.training_fields())
    if not saved.unfreeze and theirs["train_last"] is None:   # what None meant for the run
        theirs["train_last"] = DEFAULT_TRAIN_LAST
    differ = [f"--{k.replace('_', '-')} {mine[k]!r} (the run has {theirs[k]!r})"
              for k in mine if k not in ("model", "data") and k in given and mine[k] != theirs[k]]
    if os.path.abspath(args.data) != os.path.abspath(saved.data):
        differ.insert(0, f"--data {args.data} (the run trained on {saved.data})")
    if differ:
        raise InputError("--resume continues a run with its own training arguments, and these "
                         f"differ from them: {'; '.join(differ)}. Drop them, or start a new run "
                         "in another --out")


# ---- the run ------------------------------------------------------------------------------
def finetune(args: TrainArgs, resume: str | None = None, log=print, given=None) -> dict:
    """Run (or continue) a fine-tuning run; returns the summary. On SIGINT or SIGTERM the
    current step finishes, a checkpoint is written and the summary has status 'interrupted'.

    A resumed run keeps its own arguments; of those that do not change the weights (evaluation,
    samples, telemetry, checkpoints, the prefix cache) the ones set in `args` replace the run's.
    `given` names the fields the user set (the CLI passes its flags); without it, the fields
    that differ from their defaults count as set.

    While it runs, the --out directory is locked: a second process training into it (a
    --resume of a run that is still going) is refused instead of writing into the same files."""
    from .classify import is_classifier_run
    if is_classifier_run(args.model, args.data):   # an encoder, or labeled rows
        from .encoder_train import finetune_encoder
        return finetune_encoder(args, log, resume, given)
    with contextlib.ExitStack() as cleanup:   # closing the lock's fd releases it (so would the
        return _finetune(args, resume, log, given, cleanup)   # process's end, however it ends)


_UNLOCKED = ("note: --out is not locked ({why}): a --resume of this run from another process "
             "while it trains would write into the same files")


def _lock_out(path: str, log=print):
    """An exclusive flock on the --out directory itself (no lock file to leave behind), or None
    where the platform or the filesystem has no flock (said in the log)."""
    try:
        import fcntl
    except ImportError:
        log(_UNLOCKED.format(why="this platform has no flock"))
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            log(_UNLOCKED.format(why=f"the filesystem refuses flock: {e.strerror or e}"))
            return None     # a filesystem without locks: train unguarded rather than refuse
        raise InputError(f"--out {path}: another process is training into this directory now "
                         "(a run that is still going?); let it finish or stop it first") from None
    return fd


def resumed_args(args: TrainArgs, resume: str, given, log) -> tuple[TrainArgs, str, dict]:
    """(the run's own arguments, with those that do not change the weights taken from `args`
    where given; its checkpoint directory; the checkpoint's trainer state)."""
    ck = _checkpoint_dir(resume)
    state = _read_state(ck)
    try:
        saved = TrainArgs(**{**state["args"], "out": args.out or resume})
        saved.validate()
    except (TypeError, InputError) as e:
        raise CheckpointError(f"{os.path.join(ck, STATE)}: the saved arguments are not usable "
                              f"({e})") from None
    given = _given(args, given)
    _check_resume_args(args, saved, given)
    for k in _NOT_TRAINING[1:]:
        if k in given:
            setattr(saved, k, getattr(args, k))
    if _model_place(args.model) != _model_place(saved.model):
        log(f"note: checkpoint was trained from {saved.model}; checking {args.model} is the same model")
    saved.model = args.model
    return saved, ck, state


def recorded_args(args: TrainArgs) -> TrainArgs:
    """The arguments as a checkpoint records them: paths absolute (a packaged model's name stays
    a name), so that the run can be resumed from any working directory."""
    return dataclasses.replace(
        args, model=os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
        data=os.path.abspath(args.data),
        eval_data=os.path.abspath(args.eval_data) if args.eval_data else None)


def resume_command(recorded: TrainArgs, out: str) -> str:
    out = os.path.abspath(out)
    return "`" + _command_line(["tailtune", "finetune", "--model", recorded.model, "--data",
                                recorded.data, "--out", out, "--resume", out]) + "`"


def _finetune(args: TrainArgs, resume, log, given, cleanup: contextlib.ExitStack) -> dict:
    state = None
    args.validate()
    if resume:
        args, ck, state = resumed_args(args, resume, given, log)
    _check_out(args, resuming=resume is not None)
    t_start = time.perf_counter()
    log(f"loading {args.model}")
    cfg, params = load_params(args.model)
    try:   # the run ends by saving the Hugging Face layout: a config none holds fails now
        config_to_hf(cfg)
    except ConfigError as e:
        raise ConfigError(f"{args.model}: a fine-tuned model of this layout could not be saved "
                          f"({e}); nothing was trained") from None
    model = Model(cfg, params)
    base_fp = fingerprint(model)
    if state and state["base_fingerprint"] != base_fp:
        raise CheckpointError(f"{resume}: the checkpoint was trained from a different model than "
                              f"{args.model} (base fingerprints differ)")
    tok = load_tokenizer(resolve_model_path(args.model), model_vocab_size=cfg.vocab_size)
    seq_len = check_seq_len(args.seq_len, cfg)
    pad = tok.batch_pad_id
    schedule = _apply_freezing(model, args)  # before tokenizing: a bad --train-last fails fast
    examples, train_idx, held, eval_idx = load_data(args, tok, seq_len, log)
    data_hashes = {"train": examples.data.file_hash, "eval": held.data.file_hash}
    if state is not None and state.get("data_hashes", data_hashes) != data_hashes:
        raise CheckpointError(f"{resume}: the data changed since the checkpoint ({args.data}"
                              f"{' or ' + args.eval_data if args.eval_data else ''} holds other "
                              "contents now); a resumed run needs the same data: start a new run")
    # the same bytes tokenized otherwise (a tailtune that reads data differently, another
    # tokenizer) are other examples: the saved batch position would not continue the run's
    data_keys = {"train": examples.data.key, "eval": held.data.key}
    if state is not None and state.get("data_keys", data_keys) != data_keys:
        raise CheckpointError(f"{resume}: the data files are unchanged, but they tokenize into other "
                              "examples than when the checkpoint was written (this tailtune reads "
                              "data differently, or the tokenizer changed), so the run cannot "
                              "continue where it stopped: start a new run")
    if state is not None and "data_keys" not in state:
        unchecked = "" if "data_hashes" in state else "the data is not checked, and "
        _warn(f"{resume}: a checkpoint written before tailtune recorded how it tokenized the data; "
              f"{unchecked}this version may tokenize it differently (12-01: text files' line ends, "
              "chat turns' loss masks; 11-30: a text file's last short window), and then the batch "
              "order differs from the run's")
    if state is not None and not state.get("trained"):   # older than the record: those it has
        state["trained"] = _optimizer_names(ck)              # optimizer state for

    def make_trainer(load=None):
        # a new run's prefix cache is made before the run directory: one with no room leaves
        # nothing behind; a resumed run's after its checkpoint is loaded (the prefix may have
        # trained)
        return Trainer(model, examples, held, train_idx=train_idx, eval_idx=eval_idx,
                       steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                       min_lr=args.min_lr, weight_decay=args.weight_decay, clip=args.clip,
                       seed=args.seed, schedule=schedule, prefix_cache=args.prefix_cache,
                       prefix_dtype=args.prefix_dtype, eval_batches=args.eval_batches,
                       telemetry_every=args.telemetry_every, pad_id=pad, log=log, state=state,
                       load=load)

    steps = count_steps(len(train_idx), args.batch_size, args.grad_accum, args.steps, args.epochs)[1]
    log(f"{model}; {len(train_idx)} training / {len(eval_idx)} held-out examples of up to "
        f"{seq_len} tokens; {steps} steps of {min(args.batch_size * args.grad_accum, len(train_idx))} "
        "examples")
    if examples.data.kind == "examples" and examples.truncated:
        log(f"note: {examples.truncated} examples are longer than --seq-len and were truncated")

    if state is None:
        trainer = make_trainer()
        cleanup.callback(trainer.close)
    recorded = recorded_args(args)
    run = {"args": dataclasses.asdict(recorded), "base_fingerprint": base_fp,
           "trainable": model.trainable}
    resume_cmd = resume_command(recorded, args.out)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    sample_ids = _sample_prompt(args, tok, held, eval_idx, cfg.context_length)

    def held_out_loss():  # None without a held-out set (--eval-fraction 0)
        return trainer.evaluate(progress=EvalProgress())

    created = not os.path.exists(args.out)
    _make_out(args.out)
    fd = _lock_out(args.out, log)
    if fd is not None:
        cleanup.callback(os.close, fd)

    def discard_unstarted():
        """A new run stopped before its first update and before any checkpoint (Ctrl-C in the
        first evaluation, a float16 cache out of range in step 1): nothing to resume, so leave
        nothing that would make the same command, or a corrected one, refuse this --out."""
        if any(os.path.exists(os.path.join(args.out, d)) for d in ("checkpoint", "checkpoint.old")):
            return
        if created:
            shutil.rmtree(args.out, ignore_errors=True)
        else:   # an empty directory given as --out
            for f in ("run.json", "metrics.jsonl"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(args.out, f))

    if state is None:
        try:
            write_json(os.path.join(args.out, "run.json"), run)
            before = held_out_loss()
            sample_before = _sample(model, tok, sample_ids, args)
            start = 0
            _log_metric(metrics_path, {"step": 0, "eval_loss": before}, truncate=True)
        except BaseException:
            discard_unstarted()
            raise
    else:
        run_json = os.path.join(args.out, "run.json")
        if os.path.exists(run_json):
            try:
                with open(run_json) as f:
                    old_fp = json.load(f).get("base_fingerprint")
            except (ValueError, AttributeError) as e:
                raise CheckpointError(f"{run_json}: not a run description ({e}); "
                                      f"resume into another --out") from None
            if old_fp != base_fp:
                raise CheckpointError(f"{args.out}: run.json belongs to another base model")
        else:  # continuing into a new directory
            write_json(run_json, run)
        loaded = {}
        trainer = make_trainer(load=lambda m, o: loaded.update(load_checkpoint(ck, m, o)))
        cleanup.callback(trainer.close)
        before, sample_before = loaded.get("eval_before"), loaded.get("sample_before")
        start = trainer.step_no
        if start > steps:
            why = ("damaged checkpoint" if "data_keys" in state else "a damaged checkpoint, or "
                   "one from a tailtune that tokenized the data into more examples")
            raise CheckpointError(f"{resume}: the checkpoint is at step {start}, past the run's "
                                  f"{steps} steps ({why})")
        _truncate_metrics(metrics_path, start)
        log(f"resumed at step {start} of {steps}")
    if before is None:
        log("no held-out set (--eval-fraction 0 and no --eval-data): no held-out loss")
    else:
        log(f"held-out loss before: {before:.4f} (perplexity {_ppl(before):.2f})")

    stop, restore_handlers = on_signals()
    progress = Progress(steps)

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "checkpoint"), model, tok, trainer.opt,
                        {**trainer.state(), "args": run["args"], "base_fingerprint": base_fp,
                         "eval_before": before, "sample_before": sample_before,
                         "data_hashes": data_hashes, "data_keys": data_keys})

    try:
        unlogged = None
        try:
            while trainer.step_no < steps:
                if stop["signal"] is not None:
                    break
                trainer.record = None
                rec = unlogged = trainer.step()
                step = trainer.step_no
                if args.eval_every and step % args.eval_every == 0 and step < steps and len(eval_idx):
                    progress.newline()
                    rec["eval_loss"] = held_out_loss()
                    log(f"step {step}: held-out loss {rec['eval_loss']:.4f}")
                _log_metric(metrics_path, rec)
                unlogged = trainer.record = None   # logged: a failure after this adds no line
                progress.update(step - 1, rec["loss"], rec["tokens_per_s"])
                if args.save_every and step % args.save_every == 0 and step < steps:
                    checkpoint()
        except Exception as e:   # not a second Ctrl-C (stop now) nor a divergence (no model)
            step = trainer.step_no
            if isinstance(e, DivergedError) or trainer.updating or step == start:
                raise
            progress.newline()
            unlogged = unlogged or trainer.record   # the last step's line, as far as it got
            if unlogged is not None:                # (a resume does not redo that step)
                with contextlib.suppress(Exception):
                    _log_metric(metrics_path, unlogged)
            if trainer.changing:   # failed while the trainable set changed
                log(f"training stopped after step {step} (the error follows), while the trainable "
                    "set was changing: no checkpoint of it; an earlier one, if any, is unchanged")
                raise
            try:   # the steps done so far are whole: keep them
                checkpoint()
                log(f"training stopped after step {step} (the error follows); the steps done are "
                    f"in a checkpoint: continue with {resume_cmd}")
            except Exception as e2:   # the disk that failed may fail this too
                log(f"training stopped after step {step} (the error follows), and no checkpoint of "
                    f"it could be written ({e2}); an earlier one, if any, is unchanged")
            raise
        step = trainer.step_no
        if step < steps:
            progress.newline()
            checkpoint()
            log(f"interrupted at step {step}: checkpoint saved; continue with {resume_cmd}")
            return {"status": "interrupted", "step": step, "out": args.out,
                    "signal": int(stop["signal"])}
        # Every step is done. The handlers stay until model/ is written: a first Ctrl-C now
        # lets the final evaluation and save finish; a failure (a second Ctrl-C, a full disk)
        # leaves a checkpoint of the last step, so --resume redoes only this final part.
        try:
            after = held_out_loss()
            sample_after = _sample(model, tok, sample_ids, args)
            cache_report = trainer.prefix_cache_report()
            final = _save_final(model, tok, args.out)
            _log_metric(metrics_path, {"step": steps, "eval_loss": after})
        except BaseException:
            try:
                checkpoint()
                log(f"the final evaluation or save did not finish; the trained weights are in a "
                    f"checkpoint: finish with {resume_cmd}")
            except Exception as e:   # the disk that failed the save may fail this too
                log(f"no checkpoint of the last step either ({e})")
            raise
    except BaseException:
        if state is None and trainer.step_no == 0:
            discard_unstarted()
        raise
    finally:
        restore_handlers()

    trained = trainer.trained
    n_train = sum(model.params[n].size for n in trained)   # under a schedule: all that ever trained
    summary = {"status": "done", "steps": steps, "eval_loss_before": before, "eval_loss_after": after,
               "perplexity_before": _ppl(before), "perplexity_after": _ppl(after),
               "trainable_params": n_train, "total_params": model.num_params(),
               "seconds": time.perf_counter() - t_start, "model_dir": final,
               "sample_prompt": tok.decode(sample_ids) if sample_ids else None,
               "sample_before": sample_before, "sample_after": sample_after,
               "prefix_cache": cache_report}
    try:
        write_json(os.path.join(args.out, "summary.json"), summary)
    except CheckpointError as e:   # a checkpoint stays: --resume writes model/ and this again
        again = (f"; {_command_line(['--resume', args.out])} writes it" if
                 os.path.isdir(os.path.join(args.out, "checkpoint")) else "")
        raise CheckpointError(f"the fine-tuned model is in {final}, but {e}{again}") from None
    # superseded by model/ and the summary (written first: a run with neither is resumable)
    shutil.rmtree(os.path.join(args.out, "checkpoint"), ignore_errors=True)
    write_plots(metrics_path, args.out, trainer.telemetry is not None, log)
    change = ("no held-out loss" if after is None else f"held-out loss {before:.4f} -> {after:.4f} "
              f"(perplexity {_ppl(before):.2f} -> {_ppl(after):.2f})")
    log(f"{change}; {n_train:,} of {model.num_params():,} parameters trained; {summary['seconds']:.0f} s")
    if sample_ids and args.sample_tokens:
        log(f"sample before: {sample_before!r}\nsample after:  {sample_after!r}")
    log(f"fine-tuned model: {final}")
    return summary


def _save_final(model, tok, out: str, extra=None) -> str:
    """model/ written whole or not at all (extra(dir): more files into it, before it is
    renamed into place)."""
    final = os.path.join(out, "model")

    def fill(tmp):
        save_model(model, tmp)
        tok.save(tmp, token_types=model.config.type_vocab_size > 1)
        if extra is not None:
            extra(tmp)
    try:
        _write_dir(final, fill)
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"{final}: could not write the fine-tuned model "
                              f"({getattr(e, 'strerror', None) or e})") from None
    return final


def _ppl(loss):
    return None if loss is None else math.exp(min(loss, 50))


def on_signals():
    """Ctrl-C (SIGINT; SIGTERM, from a job scheduler or `kill`; SIGBREAK, a Windows console's
    Ctrl-Break) ends a run after the current step, which then checkpoints (and saves) as at its
    end; a second one stops at once (KeyboardInterrupt). Returns (stop, restore): stop["signal"]
    is the first signal's number (None before), restore() puts the handlers before back.
    Outside the main thread, where handlers cannot be set, nothing is handled."""
    import threading
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
    handled = () if threading.current_thread() is not threading.main_thread() else tuple(
        getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, n))
    prev = {s: signal.signal(s, on_signal) for s in handled}

    def restore():
        for s, h in prev.items():
            signal.signal(s, h)
    return stop, restore


def _sample_prompt(args, tok, held, eval_idx, context: int):
    """Ids to generate from before and after: --sample-prompt (chat-templated when the model
    has a template), else the prompt part of the first held-out example; context: the model's
    context_length."""
    if args.sample_prompt:
        ids = (tok.chat_ids([{"role": "user", "content": args.sample_prompt}]) if tok.chat_template
               else tok.encode(args.sample_prompt))
        if args.sample_tokens > 0 and len(ids) >= context:   # before the run directory exists
            raise InputError(f"--sample-prompt is {len(ids)} tokens, the model's context "
                             f"{context}: give a shorter one (or --sample-tokens 0)")
        return ids
    if held.data.kind != "examples" or len(eval_idx) == 0:
        return None
    ids, mask = held.data.example(int(eval_idx[0]))
    first = int(np.argmax(np.asarray(mask) > 0)) if np.asarray(mask).any() else len(ids)
    # a prompt longer than the context keeps its end: the text the completion follows
    return [int(i) for i in ids[:first][-(context - 1):]] or None


def _sample(model, tok, ids, args):
    if not ids or args.sample_tokens <= 0:
        return None
    stops = stop_ids(model, tok)
    # vocab_size: a model whose vocabulary is padded past the tokenizer's must not pick an id
    # the tokenizer cannot decode
    out = generate(model, ids, max_new_tokens=args.sample_tokens, temperature=0.0, stop=stops,
                   vocab_size=tok.vocab_size)
    return tok.decode_continuation([t for t in out if t not in stops], ids)


def _finite(v):
    """NaN and infinities as null, at any depth (strict JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _log_metric(path, rec, truncate=False):
    line = json.dumps(_finite(rec), allow_nan=False) + "\n"
    size = 0 if truncate or not os.path.exists(path) else os.path.getsize(path)
    try:
        with open(path, "w" if truncate else "a") as f:
            f.write(line)
    except OSError as e:   # a full disk: no cut-off line left (a later line would join it)
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from None


def _truncate_metrics(path, step):
    """On resume, drop metric lines written after the checkpoint (they will be redone)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):  # a write cut off by a crash: after the checkpoint
                break
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{path}:{n}: not a metrics record with a numeric 'step'; "
                                      f"fix or delete that line") from None
    with open(path, "w") as f:
        f.writelines(keep)


def _plot_telemetry(metrics_path, png, log):
    recs = [r for r in map(json.loads, open(metrics_path)) if "telemetry" in r]
    try:
        plot_telemetry(recs, png)
    except ImportError:
        log("(no telemetry plot: pip install 'tailtune[plot]' for matplotlib)")


def write_plots(metrics_path, out, telemetry: bool, log, ylabel="loss (nats/token)"):
    """loss.png (and telemetry.png) of a run's metrics.jsonl in `out`; a failure (a full disk)
    does not fail the run."""
    plots = [(lambda m, png, log: _plot(m, png, log, ylabel), "loss.png")]
    if telemetry:
        plots.append((_plot_telemetry, "telemetry.png"))
    for plot, png in plots:
        try:
            plot(metrics_path, os.path.join(out, png), log)
        except OSError as e:
            log(f"note: no {png} ({e.strerror or e})")


def _plot(metrics_path, png, log, ylabel="loss (nats/token)"):
    try:   # not pyplot: a host application's backend and figures stay as they are
        from matplotlib.figure import Figure
    except ImportError:
        log("(no loss plot: pip install 'tailtune[plot]' for matplotlib)")
        return
    recs = [json.loads(line) for line in open(metrics_path)]
    tr = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if tr:
        ax.plot(*zip(*tr), label="training loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if tr or ev:  # an empty legend only draws a warning
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
