"""Freezing schedules: which blocks train at each step, and at what learning-rate scale.

A schedule is consulted before every optimizer step. It changes the model's trainable set with
freeze / unfreeze (the optimizer creates or frees state to match, and the step's cost follows)
and may scale the learning rate per parameter. The final norm (an encoder's classifier head)
always trains.

  static      the last k blocks throughout
  gradual     ULMFiT's gradual unfreezing: start with the last k, one more block (top down)
              every N steps
  lr-decay    the last k blocks, block i at lr * decay^(L-1-i) (discriminative rates)
  freezeout   FreezeOut: each of the last k blocks anneals its rate to 0 by a cosine at its own
              time t_i (lowest first; t_i runs from t0 to 1 of training, spaced linearly or,
              as the paper's squared and cubic strategies, closer together near t0), then
              leaves backward; `scaled` starts block i at lr / t_i (the paper's "scaled")
  autofreeze  AutoFreeze's criterion: every N steps, freeze the lowest trainable blocks whose
              gradient norm, summed over the N steps, changed by less than a threshold
              (relative) from the previous N steps' sum
  lisa        LISA: k blocks drawn at random (seeded) from all L, redrawn every N steps

Every schedule is a function of the step and the seed (autofreeze also of the gradient norms it
saw, kept in its state), so a run is reproducible and a resumed run rebuilds the same set.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import stats

from .errors import InputError, is_int, is_number
from .model import block_of

NAMES = ("static", "gradual", "lr-decay", "freezeout", "autofreeze", "lisa")
SPACINGS = {"linear": 1, "squared": 2, "cubic": 3}   # FreezeOut's t_i: the power of its spacing

# The schedules' numeric settings (train.TrainArgs checks its flags with these too). decay > 1
# or <= 0 gives growing or negative rates, t0 outside (0, 1] blocks stopping outside training
# (at 0, before their first step), a negative threshold (never met) silently disables AutoFreeze.
RANGES = {"decay": (lambda x: 0 < x <= 1, "in (0, 1]"),
          "t0": (lambda x: 0 < x <= 1, "in (0, 1]"),
          "threshold": (lambda x: 0 <= x < math.inf, ">= 0")}


def make(name: str, n_layer: int, k: int, every: int = 50, decay: float = 0.8, t0: float = 0.5,
         threshold: float = 0.05, seed: int = 0, total: int | None = None,
         spacing: str = "linear", scaled: bool = False, also: tuple = ()):
    """The schedule `name` (one of NAMES) over a model of n_layer blocks, k its block count.
    In one's own loop it is used as `tailtune finetune --schedule` uses it:

        for step in range(total):
            sched.apply(model, opt, step, total)   # the step's trainable set and block rates
            model.zero_grad(); model.forward(x, y); model.backward()
            sched.observe(model, step)             # before clipping: AutoFreeze reads the norms
            engine.clip_grad_norm(model, 1.0); opt.step()

    apply() sets exactly the schedule's blocks and the final norm (an encoder's classifier
    head) trainable (the embeddings and head of a model fresh from engine.load are frozen by
    it). With `sched.anneals` (FreezeOut) the global rate should stay constant after warmup:
    the schedule anneals each block itself. To resume, keep state_dict() (AutoFreeze's norms) and give it back with
    load_state_dict(); the trainable set follows from the next apply(). total: the run's steps,
    which FreezeOut's blocks() depend on (apply() gives it too). spacing and scaled: FreezeOut's
    strategies (Brock et al. 2017): block i leaves at t_i = (b + (1 - b) f_i)^p, f_i running from
    0 (the lowest of the k) to 1 (the top), p = 1, 2, 3 for linear, squared, cubic, b = t0^(1/p)
    so that the lowest leaves at t0 whatever the spacing (the paper gives t0 before the power);
    scaled multiplies block i's rate by 1 / t_i, so that every block travels as far. also: glob
    patterns of parameters that train throughout beside the schedule's blocks (LISA as its
    paper runs it: also=("wte.*", "lm_head.*"), the embeddings and head; a trainable embedding
    takes backward down through every block; a tied model's head is its embedding, wte). What
    `also` adds trains at the top block's rate, as the final norm does."""
    if name not in NAMES:
        raise InputError(f"unknown schedule {name!r}; choose one of {', '.join(NAMES)}")
    if not is_int(n_layer) or n_layer < 1:
        raise InputError(f"schedule {name}: n_layer must be a positive integer, got {n_layer!r}")
    if not is_int(k) or not 1 <= k <= n_layer:
        raise InputError(f"schedule {name}: k={k!r} blocks, the model has {n_layer}")
    if not is_int(every) or every < 1:
        raise InputError(f"schedule {name}: every must be an integer >= 1, got {every!r}")
    if not is_int(seed):
        raise InputError(f"schedule {name}: seed must be an integer, got {seed!r}")
    if total is not None and (not is_int(total) or total < 1):
        raise InputError(f"schedule {name}: total must be an integer >= 1, got {total!r}")
    # all checked whichever schedule is named: a bad value is a mistake either way
    for what, v in (("decay", decay), ("t0", t0), ("threshold", threshold)):
        ok, rng = RANGES[what]
        if not is_number(v) or not ok(v):
            raise InputError(f"schedule {name}: {what} must be a number {rng}, got {v!r}")
    if spacing not in SPACINGS:
        raise InputError(f"schedule {name}: spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if not isinstance(scaled, bool):
        raise InputError(f"schedule {name}: scaled must be True or False, got {scaled!r}")
    also = () if also is None else also
    if isinstance(also, str) or not isinstance(also, (list, tuple)) or not all(
            isinstance(p, str) for p in also):
        raise InputError(f"schedule {name}: also must be a list of glob patterns, got {also!r}")
    cls = {"static": Static, "gradual": Gradual, "lr-decay": LRDecay, "freezeout": FreezeOut,
           "autofreeze": AutoFreeze, "lisa": Lisa}[name]
    sched = cls(n_layer, k, every=every, decay=decay, t0=t0, threshold=threshold, seed=seed,
                spacing=spacing, scaled=scaled, also=tuple(also))
    sched.total = total
    return sched


class Schedule:
    # True when the schedule anneals each block's rate itself (FreezeOut): the run's global
    # schedule then only warms up, or each block's rate would be annealed twice
    anneals = False

    def __init__(self, n_layer, k, every=50, decay=0.8, t0=0.5, threshold=0.05, seed=0,
                 spacing="linear", scaled=False, also=()):
        self.L, self.k, self.every = n_layer, k, every
        self.decay, self.t0, self.threshold, self.seed = decay, t0, threshold, seed
        self.spacing, self.scaled, self.also = spacing, scaled, also   # see make()
        self.total: int | None = None   # the run's steps: make(total=) or apply() sets it

    def blocks(self, step: int) -> list[int]:
        """Trainable blocks before optimizer step `step` (0-based)."""
        return list(range(self.L - self.k, self.L))

    def lr_scale(self, block: int, step: int) -> float:
        return 1.0

    def apply(self, model, opt, step: int, total: int) -> bool:
        """Set the model's trainable set and the optimizer's per-parameter rate scales for
        `step`; True when the trainable set changed."""
        self.total = total
        always = set(model._match(list(self.also))) if self.also else set()
        blocks = [f"blocks.{i}.*" for i in set(self.blocks(step))]
        # the final norm (an encoder's classifier head) trains throughout, as under train_last
        want = always | set(model.top_params()) | set(model._match(blocks) if blocks else ())
        # exactly these: a model fresh from engine.load (all trainable) loses its embeddings and
        # head here unless `also` names them; blocks that stay keep their Adam state
        changed = want != set(model.grads)
        model.set_trainable(want)
        # what `also` adds trains throughout: at the top block's rate, as the final norm does
        # (FreezeOut's stop time of a block outside its k would be negative, its rate too)
        scales = {}
        for n in model.grads:
            b = block_of(n)
            s = self.lr_scale(self.L - 1 if b is None or n in always else b, step)
            if s != 1.0:
                scales[n] = s
        opt.lr_scale = scales
        return changed

    def observe(self, model, step: int) -> None:
        """Called after backward, before the update (AutoFreeze reads gradient norms)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class Static(Schedule):
    pass


class Gradual(Schedule):
    def blocks(self, step):
        n = min(self.L, self.k + step // self.every)
        return list(range(self.L - n, self.L))


class LRDecay(Schedule):
    def lr_scale(self, block, step):
        return self.decay ** (self.L - 1 - block)


class FreezeOut(Schedule):
    """Brock et al. 2017: block i's rate is 0.5 lr (1 + cos(pi t / t_i)) until it leaves at
    t_i, in place of a global decay (anneals = True); scaled: lr / t_i in place of lr."""
    anneals = True

    def _t(self, block):
        """Fraction of training at which `block` stops: t0 for the lowest of the k, 1 for the top
        (so with k = 1 the one block trains throughout, its rate annealed)."""
        lo = self.L - self.k
        frac = (block - lo) / (self.k - 1) if self.k > 1 else 1.0
        if frac == 0:   # exactly t0: its p-th root raised to p again may land a step later
            return self.t0
        p = SPACINGS[self.spacing]
        b = self.t0 ** (1.0 / p)
        return (b + (1.0 - b) * frac) ** p

    def _progress(self, step) -> float:
        if self.total is None:   # a block's time is a fraction of the run: it needs the length
            raise InputError("freezeout: which blocks train depends on the run's length; give "
                             "make(..., total=N) or call apply() first")
        return step / max(1, self.total)

    def blocks(self, step):
        f = self._progress(step)
        return [i for i in range(self.L - self.k, self.L) if f < self._t(i)]

    def lr_scale(self, block, step):
        f, t = self._progress(step), self._t(block)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, f / t))) / (t if self.scaled else 1.0)


class AutoFreeze(Schedule):
    """Each block's gradient norm is summed over every step of an interval of `every` steps
    (one step's norm is too noisy to compare: it moves by tens of percent from batch to batch);
    at the end of the interval the sums are compared with the previous interval's."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.frozen_below = self.L - self.k      # blocks below this are frozen
        self.last_norms: dict[int, float] = {}
        self.sums: dict[int, float] = {}         # this interval's summed norms so far

    def blocks(self, step):
        return list(range(self.frozen_below, self.L))

    def observe(self, model, step):
        sq: dict[int, float] = {}
        for n, g in model.grads.items():
            i = block_of(n)
            if i is not None:
                sq[i] = sq.get(i, 0.0) + stats.sum_sq(g)
        for i, v in sq.items():
            self.sums[i] = self.sums.get(i, 0.0) + math.sqrt(v)
        if (step + 1) % self.every:
            return
        norms, self.sums = self.sums, {}
        if self.last_norms:
            # freeze from the bottom while the change is small; always keep the top block
            for i in range(self.frozen_below, self.L - 1):
                prev = self.last_norms.get(i)
                if prev is None or prev == 0 or abs(norms.get(i, 0.0) - prev) / prev >= self.threshold:
                    break
                self.frozen_below = i + 1
        self.last_norms = norms

    def state_dict(self):
        return {"frozen_below": self.frozen_below,
                "last_norms": {str(i): v for i, v in self.last_norms.items()},
                "sums": {str(i): v for i, v in self.sums.items()}}

    def load_state_dict(self, d):
        self.frozen_below = int(d["frozen_below"])
        self.last_norms = {int(i): float(v) for i, v in d["last_norms"].items()}
        self.sums = {int(i): float(v) for i, v in d.get("sums", {}).items()}


class Lisa(Schedule):
    def blocks(self, step):
        rng = np.random.default_rng([self.seed, step // self.every])
        return sorted(int(i) for i in rng.choice(self.L, size=self.k, replace=False))
