"""Token (+ learned position) embedding: gather forward, scatter-add backward."""
import numpy as np

from .checks import floats, indices, position
from .jit import pjit, prange

_STRIPE = 64  # backward splits columns into stripes so that no two threads add to the same row


def _positions(fn, name, wpe, C, pos0, T):
    """wpe (P, C), C-contiguous float32, P = 0 (none) or P >= pos0 + T."""
    P = floats(fn, name, wpe, ndim=2, dims="(P, C)").shape[0]
    if wpe.shape[1] != C or 0 < P < pos0 + T:
        raise ValueError(f"{fn}: {name} has shape {wpe.shape}, expected (P, {C}) with P = 0 or "
                         f"P >= pos0 + T = {pos0 + T}")


def embedding_forward(tokens, wte, wpe, pos0, out):
    """tokens: (B, T) integers in [0, V); wte: (V, C); wpe: (P, C), P >= pos0 + T, or (0, C) for
    none; out: (B, T, C). out[b, t] = wte[tokens[b, t]] + wpe[pos0 + t]."""
    fn = "embedding_forward"
    pos0 = position(fn, "pos0", pos0)
    V, C = floats(fn, "wte", wte, ndim=2, dims="(V, C)").shape
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 2:
        raise ValueError(f"{fn}: tokens has shape {np.shape(tokens)}, expected (B, T)")
    B, T = tokens.shape
    tokens = indices(fn, "tokens", tokens, (B, T), V)
    _positions(fn, "wpe", wpe, C, pos0, T)
    floats(fn, "out", out, (B, T, C))
    _embedding_forward(tokens, wte, wpe, pos0, out)


@pjit
def _embedding_forward(tokens, wte, wpe, pos0, out):
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
def _embedding_backward(dout, tokens, dwte, dwpe, pos0, padding_idx):
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
                if use_wte and tokens[b, t] != padding_idx:
                    w = dwte[tokens[b, t]]
                    for j in range(c0, c1):
                        w[j] += g[j]
                if use_pos:
                    p = dwpe[pos0 + t]
                    for j in range(c0, c1):
                        p[j] += g[j]


def embedding_backward(dout, tokens, dwte=None, dwpe=None, pos0=0, padding_idx=None):
    """Accumulates dout (B, T, C) into the rows of dwte (V, C) and dwpe (P, C) that were read;
    not into dwte's row padding_idx (torch's nn.Embedding(padding_idx=...)), when given."""
    fn = "embedding_backward"
    pos0 = position(fn, "pos0", pos0)
    B, T, C = floats(fn, "dout", dout, ndim=3, dims="(B, T, C)").shape
    if dwte is None:
        tokens = indices(fn, "tokens", tokens, (B, T), np.iinfo(np.int64).max)   # never indexed
    else:
        V = floats(fn, "dwte", dwte, ndim=2, dims="(V, C)").shape[0]
        if dwte.shape[1] != C:
            raise ValueError(f"{fn}: dwte has shape {dwte.shape}, expected (V, {C})")
        tokens = indices(fn, "tokens", tokens, (B, T), V)
    if dwpe is not None:
        _positions(fn, "dwpe", dwpe, C, pos0, T)
    pad = -1 if padding_idx is None else position(fn, "padding_idx", padding_idx)
    none = np.zeros((0, C), np.float32)
    _embedding_backward(dout, tokens, none if dwte is None else dwte,
                        none if dwpe is None else dwpe, pos0, pad)
