"""Token (+ learned position) embedding: gather forward, scatter-add backward."""
import numpy as np

from .jit import pjit, prange

_STRIPE = 64  # backward splits columns into stripes so that no two threads add to the same row


@pjit
def embedding_forward(tokens, wte, wpe, pos0, out):
    """tokens: (B, T) int64; wte: (V, C); wpe: (P, C) or (0, C) for none; out: (B, T, C).
    out[b, t] = wte[tokens[b, t]] + wpe[pos0 + t]."""
    B, T = tokens.shape
    use_pos = wpe.shape[0] > 0
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        e = wte[tokens[b, t]]
        o = out[b, t]
        if use_pos:
            p = wpe[pos0 + t]
            for j in range(o.shape[0]):
                o[j] = e[j] + p[j]
        else:
            for j in range(o.shape[0]):
                o[j] = e[j]


@pjit
def _embedding_backward(dout, tokens, dwte, dwpe, pos0):
    B, T = tokens.shape
    C = dout.shape[2]
    use_wte = dwte.shape[0] > 0
    use_pos = dwpe.shape[0] > 0
    for s in prange((C + _STRIPE - 1) // _STRIPE):
        c0 = s * _STRIPE
        c1 = min(C, c0 + _STRIPE)
        for b in range(B):
            for t in range(T):
                g = dout[b, t]
                if use_wte:
                    w = dwte[tokens[b, t]]
                    for j in range(c0, c1):
                        w[j] += g[j]
                if use_pos:
                    p = dwpe[pos0 + t]
                    for j in range(c0, c1):
                        p[j] += g[j]


def embedding_backward(dout, tokens, dwte=None, dwpe=None, pos0=0):
    """Accumulates dout (B, T, C) into the rows of dwte (V, C) and dwpe (P, C) that were read."""
    C = dout.shape[2]
    none = np.zeros((0, C), np.float32)
    _embedding_backward(dout, tokens, none if dwte is None else dwte,
                        none if dwpe is None else dwpe, pos0)
