"""Log-softmax + cross-entropy over rows of logits (a chunk of tokens x the whole vocabulary).

The model feeds row chunks, so the full (B, T, V) logits never exist. Training uses the fused
forward_backward: one exp pass gives the loss and overwrites the logits with their gradient.
Rows whose target is negative (-100) are ignored: loss 0, gradient 0.
"""
import numpy as np

from .jit import pjit, prange
from .vexp import exp_inplace


@pjit
def crossentropy_forward(logits, targets, losses, lse):
    """logits: (R, V) read only; targets: (R,) int64; losses, lse: (R,) written."""
    R, V = logits.shape
    for i in prange(R):
        row = logits[i]
        m = row[0]
        for j in range(V):
            m = max(m, row[j])
        t = np.empty(V, np.float32)
        bits = np.empty(V, np.int32)
        for j in range(V):
            t[j] = row[j] - m
        s = exp_inplace(t, bits)
        lse[i] = m + np.log(s)
        tg = targets[i]
        losses[i] = lse[i] - row[tg] if tg >= 0 else np.float32(0.0)


@pjit
def crossentropy_forward_backward(logits, targets, losses, lse, scale):
    """As crossentropy_forward, then logits (R, V) is overwritten with d(scale * sum of
    losses)/d(logits) = scale * (softmax - onehot(target))."""
    R, V = logits.shape
    sc = np.float32(scale)
    for i in prange(R):
        row = logits[i]
        tg = targets[i]
        if tg < 0:
            for j in range(V):
                row[j] = np.float32(0.0)
            losses[i] = np.float32(0.0)
            lse[i] = np.float32(0.0)
            continue
        m = row[0]
        for j in range(V):
            m = max(m, row[j])
        target_logit = row[tg]
        bits = np.empty(V, np.int32)
        for j in range(V):
            row[j] = row[j] - m
        s = exp_inplace(row, bits)
        lse[i] = m + np.log(s)
        losses[i] = lse[i] - target_logit
        f = sc / s
        for j in range(V):
            row[j] *= f
        row[tg] -= sc
