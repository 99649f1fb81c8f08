"""Reductions for training telemetry: one pass over a parameter and its companions, float64
accumulators, no temporaries (float64 copies of a 14M-parameter tail cost more than a step's
optimizer update)."""
import numpy as np

from .jit import pjit, prange

_BLK = 1 << 16

# columns of param_sums' result
GRAD_SQ, W_SQ, W0_SQ, DIFF_SQ, DOT_W0, UPD_SQ = range(6)


@pjit
def _param_partials(p, w0, before, g, part):
    n = p.shape[0]
    has_before = before.shape[0] == n
    for c in prange(part.shape[0]):
        gg = 0.0
        ww = 0.0
        w00 = 0.0
        dd = 0.0
        dw = 0.0
        uu = 0.0
        for i in range(c * _BLK, min(n, (c + 1) * _BLK)):
            pi = np.float64(p[i])
            oi = np.float64(w0[i])
            gi = np.float64(g[i])
            gg += gi * gi
            ww += pi * pi
            w00 += oi * oi
            dd += (pi - oi) * (pi - oi)
            dw += pi * oi
        if has_before:
            for i in range(c * _BLK, min(n, (c + 1) * _BLK)):
                u = np.float64(p[i]) - np.float64(before[i])
                uu += u * u
        part[c, 0] = gg
        part[c, 1] = ww
        part[c, 2] = w00
        part[c, 3] = dd
        part[c, 4] = dw
        part[c, 5] = uu


def param_sums(p, w0, g, before=None):
    """float64 (6,): sum g², sum p², sum w0², sum (p - w0)², sum p·w0, sum (p - before)² (0
    without `before`), over float32 arrays of one shape."""
    for name, x in (("w0", w0), ("g", g), ("before", before)):
        if x is not None and np.shape(x) != np.shape(p):
            raise ValueError(f"param_sums: {name} has shape {np.shape(x)}, expected {np.shape(p)} (p's shape)")
    p, w0, g = (np.ascontiguousarray(a, np.float32).ravel() for a in (p, w0, g))
    b = np.empty(0, np.float32) if before is None else np.ascontiguousarray(before, np.float32).ravel()
    part = np.zeros(((p.size + _BLK - 1) // _BLK, 6), np.float64)
    _param_partials(p, w0, b, g, part)
    return part.sum(0)


@pjit
def _sq_partials(x, part):
    n = x.shape[0]
    for c in prange(part.shape[0]):
        s = 0.0
        for i in range(c * _BLK, min(n, (c + 1) * _BLK)):
            v = np.float64(x[i])
            s += v * v
        part[c] = s


def sum_sq(x) -> float:
    """sum x² of a float32 array, accumulated in float64."""
    x = np.ascontiguousarray(x, np.float32).ravel()
    part = np.zeros((x.size + _BLK - 1) // _BLK, np.float64)
    _sq_partials(x, part)
    return float(part.sum())
