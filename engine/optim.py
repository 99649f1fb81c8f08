"""Optimizers with state only for trainable parameters, gradient clipping, LR schedules.

An optimizer follows its model's trainable set: state is created when a parameter is unfrozen
and dropped when it is frozen (the model calls `_sync` on every change). Each parameter's state
counts its own steps (as torch's per-parameter state['step']): a block a schedule unfreezes late
starts its Adam bias correction at step 1, not at the run's step.
"""
from __future__ import annotations

import math
import numbers
from time import perf_counter

import numpy as np

from kernels import stats
from kernels.adamw import adamw_step
from kernels.sgd import sgd_step

from .errors import InputError, is_int


def _number(what: str, v, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    """v as a float in [lo, hi] (or [lo, hi) with hi_open); an InputError naming `what` if not."""
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
          and lo <= v and (v < hi if hi_open else v <= hi))
    if not ok:
        rng = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise InputError(f"{what} must be a number {rng}, got {v!r}")
    return float(v)


class Optimizer:
    def __init__(self, model, lr: float):
        if not (hasattr(model, "grads") and hasattr(model, "_optimizers")):
            raise InputError(f"an optimizer needs an engine Model, got {type(model).__name__}")
        self.lr = _number("learning rate", lr)
        self.model = model
        self.lr_scale: dict[str, float] = {}  # per-parameter multipliers (schedules set them)
        self.state: dict[str, dict] = {}
        self.t = 0  # steps taken
        model._optimizers.add(self)
        self._sync()

    def _sync(self):
        live = self.model.grads
        # made before any is dropped: out of memory here leaves the state as it was
        new = {n: self._new_state(self.model.params[n]) for n in live if n not in self.state}
        for n in list(self.state):
            if n not in live:
                del self.state[n]
        self.state.update(new)

    def _new_state(self, p) -> dict:
        raise NotImplementedError

    def step(self):
        from . import layers
        self._sync()
        self.t += 1
        for n in self.state:   # updated in place: name the parameter a kernel could not write
            p = self.model.params[n]
            if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.flags.c_contiguous
                    and p.flags.writeable):
                what = (f"{p.dtype}, {'C' if p.flags.c_contiguous else 'not C'}-contiguous, "
                        f"{'writable' if p.flags.writeable else 'read-only'}"
                        if isinstance(p, np.ndarray) else type(p).__name__)
                raise InputError(f"parameter {n!r} must be a writable C-contiguous float32 array to "
                                 f"be updated in place, got {what} (a memory-mapped file opened "
                                 "read-only? a transposed view?)")
        prof = layers.PROFILE
        for n, st in self.state.items():
            if n in self.model._no_grad_yet:   # no backward since unfrozen or zeroed
                continue
            t0 = perf_counter() if prof else 0.0
            self._update(n, self.model.params[n], self.model.grads[n], st)
            self.model._updated[n] = self.model._updated.get(n, 0) + 1
            if prof:
                prof.add(n, "optimizer", perf_counter() - t0)

    def __setstate__(self, state):
        """A copy (deepcopy, pickle) of a model forgets its optimizers: a copied optimizer joins
        its copied model again, so freezing there still frees its state."""
        self.__dict__.update(state)
        self.model._optimizers.add(self)

    def state_bytes(self) -> int:
        return sum(a.nbytes for st in self.state.values() for a in st.values()
                   if isinstance(a, np.ndarray))

    def state_dict(self) -> dict:
        return {"t": self.t, "lr": self.lr, "state": {n: dict(s) for n, s in self.state.items()}}

    def load_state_dict(self, d: dict):
        """State from state_dict(), checked whole before any of it is taken."""
        if not (isinstance(d, dict) and is_int(d.get("t")) and d["t"] >= 0
                and isinstance(d.get("state"), dict)):
            raise InputError("an optimizer state_dict needs 't' (an integer >= 0), 'lr' and 'state' "
                             "(a dict per parameter), as state_dict() returns")
        lr = _number("state_dict lr", d.get("lr"))
        new = {}
        for n, s in d["state"].items():
            if n not in self.state:
                raise InputError(f"optimizer state for {n!r}, which is not trainable in this model")
            if not isinstance(s, dict):
                raise InputError(f"optimizer state for {n!r} must be a dict, got {type(s).__name__}")
            # moments saved before per-parameter step counts: they share the global count (no
            # moments at all: a parameter that joins here, at step 0 of its own)
            if s and "t" in self.state[n] and "t" not in s:
                s = {**s, "t": d["t"]}
            mine = self.state[n]
            for k, a in s.items():
                want = mine.get(k)
                if k not in mine:
                    raise InputError(f"optimizer state {n}.{k}: no such entry (this optimizer "
                                     f"keeps {', '.join(mine)})")
                if isinstance(want, np.ndarray):
                    if not isinstance(a, np.ndarray) or a.shape != want.shape or not np.isfinite(a).all():
                        raise InputError(f"optimizer state {n}.{k} must be a finite array of shape "
                                         f"{want.shape}, got {getattr(a, 'shape', type(a).__name__)}")
                    if k == "v" and (a < 0).any():   # a second moment is a mean of squares
                        raise InputError(f"optimizer state {n}.v holds negative values")
                elif type(a) is not type(want) or (is_int(a) and a < 0):
                    raise InputError(f"optimizer state {n}.{k} must be of type "
                                     f"{type(want).__name__} (>= 0), got {a!r}")
            new[n] = {k: np.array(a, dtype=np.float32) if isinstance(a, np.ndarray) else a
                      for k, a in s.items()}
        self.t, self.lr = int(d["t"]), lr
        for n, s in new.items():
            self.state[n].update(s)


def _decays(name: str, p: np.ndarray) -> bool:
    """Weight decay applies to matrices, not to norm weights and biases."""
    return p.ndim >= 2


class AdamW(Optimizer):
    """torch.optim.AdamW semantics: decoupled decay p *= 1 - lr * wd, bias-corrected moments.
    One difference in the default: weight decay applies to matrices only, not to norm weights
    and biases (GPT-2 / nanoGPT practice; torch would need two parameter groups for it).
    `decay_filter(name, array) -> bool` chooses otherwise: `lambda n, p: True` is torch's
    single-group behaviour."""

    def __init__(self, model, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decay_filter=_decays):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InputError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        # beta >= 1 never forgets (and the bias correction divides by 1 - beta^t = 0 or < 0)
        self.betas = (_number("betas[0]", betas[0], 0.0, 1.0, True),
                      _number("betas[1]", betas[1], 0.0, 1.0, True))
        self.eps = _number("eps", eps)
        self.weight_decay = _number("weight_decay", weight_decay)
        self.decay_filter = decay_filter
        super().__init__(model, lr)

    def _new_state(self, p):
        return {"m": np.zeros_like(p), "v": np.zeros_like(p), "t": 0}

    def _update(self, name, p, g, st):
        wd = self.weight_decay if self.decay_filter(name, p) else 0.0
        lr = self.lr * self.lr_scale.get(name, 1.0)
        st["t"] += 1
        adamw_step(p, g, st["m"], st["v"], lr, self.betas[0], self.betas[1], self.eps, wd, st["t"])


class SGD(Optimizer):
    """torch.optim.SGD semantics: g += wd * p; buf = momentum * buf + g (buf = g at first);
    p -= lr * buf (or lr * (g + momentum * buf) with nesterov). Weight decay, as in torch,
    applies to every parameter (AdamW's default keeps it to matrices)."""

    def __init__(self, model, lr=1e-2, momentum=0.0, weight_decay=0.0, nesterov=False):
        self.momentum = _number("momentum", momentum)
        self.weight_decay = _number("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and not self.momentum:   # torch refuses it too: it would be plain SGD
            raise InputError("SGD nesterov=True needs momentum > 0")
        super().__init__(model, lr)

    def _new_state(self, p):
        return {"buf": np.zeros_like(p), "started": False} if self.momentum else {}

    def _update(self, name, p, g, st):
        sgd_step(p, g, st.get("buf", g), np.float32(self.lr * self.lr_scale.get(name, 1.0)),
                 self.momentum, self.weight_decay, self.nesterov, st.get("started", True))
        if self.momentum:
            st["started"] = True


def grad_norm(model) -> float:
    """Global L2 norm of the trainable gradients (float64 accumulation, a Numba kernel: no
    float64 copy of each gradient, and no call into OpenBLAS's threads between steps)."""
    return math.sqrt(sum(stats.sum_sq(g) for g in model.grads.values()))


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale the gradients so their global norm is at most max_norm (as torch's
    clip_grad_norm_); returns the norm before clipping. A NaN norm leaves the gradients as they
    are (torch turns them all NaN): check the returned norm, as the training loop does."""
    # a negative max_norm would give a negative coef: every gradient flipped, no error
    max_norm = _number("clip_grad_norm max_norm", max_norm)
    total = grad_norm(model)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in model.grads.values():
            g *= np.float32(coef)
    return total


class CosineSchedule:
    """Linear warmup, step s < warmup at lr (s + 1) / warmup (no step at 0: it would only move
    Adam's moments), then cosine decay from lr, reached at step `warmup`, towards min_lr, reached
    at step `total` (just past the last step, 0-based total - 1)."""

    def __init__(self, lr: float, total: int, warmup: int = 0, min_lr: float = 0.0):
        if not (is_int(total) and total > 0 and is_int(warmup) and warmup >= 0):
            raise InputError(f"schedule needs integers total > 0 and warmup >= 0, got {total!r}, {warmup!r}")
        self.lr, self.min_lr = _number("schedule lr", lr), _number("schedule min_lr", min_lr)
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        """LR for step (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))
