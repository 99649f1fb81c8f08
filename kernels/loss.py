"""Log-softmax + cross-entropy over rows of logits (a chunk of tokens x the whole vocabulary).

The model feeds row chunks, so the full (B, T, V) logits never exist. Training uses the fused
forward_backward: one exp pass gives the loss and overwrites the logits with their gradient.
Rows whose target is negative (-100) are ignored: loss 0, gradient 0.
The per-row work is a plain jit function called from the parallel loop: compiled on its own it
vectorizes better than as the loop's body.
"""
import numpy as np

from .jit import jit, pjit, prange
from .vexp import exp_inplace


@jit
def _row_lse(row, t, bits):
    """log-sum-exp of row (V,), using t (V,) as scratch for exp(row - max)."""
    m = row[0]
    for j in range(row.shape[0]):
        m = max(m, row[j])
    for j in range(row.shape[0]):
        t[j] = row[j] - m
    return m + np.log(exp_inplace(t, bits))


@jit
def _row_grad(row, tg, sc, bits):
    """row <- sc * (softmax(row) - onehot(tg)); returns the row's log-sum-exp."""
    m = row[0]
    for j in range(row.shape[0]):
        m = max(m, row[j])
    for j in range(row.shape[0]):
        row[j] = row[j] - m
    s = exp_inplace(row, bits)
    f = sc / s
    for j in range(row.shape[0]):
        row[j] *= f
    row[tg] -= sc
    return m + np.log(s)


@pjit
def crossentropy_forward(logits, targets, losses, lse):
    """logits: (R, V) read only; targets: (R,) int64; losses, lse: (R,) written."""
    R, V = logits.shape
    for i in prange(R):
        t = np.empty(V, np.float32)
        bits = np.empty(V, np.int32)
        lse[i] = _row_lse(logits[i], t, bits)
        tg = targets[i]
        losses[i] = lse[i] - logits[i, tg] if tg >= 0 else np.float32(0.0)


@pjit
def crossentropy_forward_backward(logits, targets, losses, lse, scale):
    """As crossentropy_forward, then logits (R, V) is overwritten with d(scale * sum of
    losses)/d(logits) = scale * (softmax - onehot(target))."""
    R, V = logits.shape
    sc = np.float32(scale)
    for i in prange(R):
        tg = targets[i]
        if tg < 0:
            logits[i, :] = np.float32(0.0)
            losses[i] = np.float32(0.0)
            lse[i] = np.float32(0.0)
            continue
        target_logit = logits[i, tg]
        bits = np.empty(V, np.int32)
        lse[i] = _row_grad(logits[i], tg, sc, bits)
        losses[i] = lse[i] - target_logit
