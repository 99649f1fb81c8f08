"""Log-softmax + cross-entropy over rows of logits (a chunk of tokens x the whole vocabulary).

The model feeds row chunks, so the full (B, T, V) logits never exist. Training uses the fused
forward_backward: one exp pass gives the loss and overwrites the logits with their gradient.
Rows whose target is IGNORE (-100) are ignored: loss 0, gradient 0.
The per-row work is a plain jit function called from the parallel loop: compiled on its own it
vectorizes better than as the loop's body.
"""
import numpy as np

from .checks import floats, indices, shaped
from .jit import jit, pjit, prange
from .vexp import exp_inplace

IGNORE = -100   # the target of a row that carries no loss (the kernels skip any negative target)


# The loss is read from the shifted row (target - max, exact), not formed as lse - target:
# with every logit near 1e4 that difference of two large numbers keeps ~1e-3 of the loss in
# float32, and fast-math reassociation turns (max - target) + log-sum-exp back into it.
@jit
def _row_lse(row, tg, t, bits):
    """(log-sum-exp of row (V,), -log softmax of target tg or 0 when tg < 0), using t (V,) as
    scratch for exp(row - max)."""
    m = row[0]
    for j in range(row.shape[0]):
        m = max(m, row[j])
    for j in range(row.shape[0]):
        t[j] = row[j] - m
    shifted = t[tg] if tg >= 0 else np.float32(0.0)
    ls = np.log(exp_inplace(t, bits))
    return m + ls, (ls - shifted if tg >= 0 else np.float32(0.0))


@jit
def _row_grad(row, tg, sc, bits):
    """row <- sc * (softmax(row) - onehot(tg)); returns (log-sum-exp, -log softmax of tg)."""
    m = row[0]
    for j in range(row.shape[0]):
        m = max(m, row[j])
    for j in range(row.shape[0]):
        row[j] = row[j] - m
    shifted = row[tg]
    s = exp_inplace(row, bits)
    f = sc / s
    for j in range(row.shape[0]):
        row[j] *= f
    row[tg] -= sc
    ls = np.log(s)
    return m + ls, ls - shifted


def _check(fn, logits, targets, losses, lse):
    """logits (R, V) with V >= 1, losses and lse (R,): C-contiguous float32; targets (R,) in
    [0, V) or IGNORE, returned as int64."""
    R, V = floats(fn, "logits", logits, ndim=2, dims="(R, V)").shape
    if V == 0:
        raise ValueError(f"{fn}: logits has shape {logits.shape}, expected (R, V) with V >= 1")
    shaped(fn, (R,), losses=losses, lse=lse)
    return indices(fn, "targets", targets, (R,), V, IGNORE)


def crossentropy_forward(logits, targets, losses, lse):
    """logits: (R, V) read only; targets: (R,) integers in [0, V) or IGNORE (-100); losses, lse:
    (R,) written."""
    targets = _check("crossentropy_forward", logits, targets, losses, lse)
    _crossentropy_forward(logits, targets, losses, lse)


@pjit
def _crossentropy_forward(logits, targets, losses, lse):
    R, V = logits.shape
    for i in prange(R):
        t = np.empty(V, np.float32)
        bits = np.empty(V, np.int32)
        lse[i], losses[i] = _row_lse(logits[i], targets[i], t, bits)


def crossentropy_forward_backward(logits, targets, losses, lse, scale):
    """As crossentropy_forward, then logits (R, V) is overwritten with d(scale * sum of
    losses)/d(logits) = scale * (softmax - onehot(target))."""
    targets = _check("crossentropy_forward_backward", logits, targets, losses, lse)
    _crossentropy_forward_backward(logits, targets, losses, lse, scale)


@pjit
def _crossentropy_forward_backward(logits, targets, losses, lse, scale):
    R, V = logits.shape
    sc = np.float32(scale)
    for i in prange(R):
        tg = targets[i]
        if tg < 0:
            logits[i, :] = np.float32(0.0)
            losses[i] = np.float32(0.0)
            lse[i] = np.float32(0.0)
            continue
        bits = np.empty(V, np.int32)
        lse[i], losses[i] = _row_grad(logits[i], tg, sc, bits)
