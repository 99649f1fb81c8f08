"""LayerNorm and RMSNorm over the last axis of (N, C) rows, forward and backward.

Forward saves only per-row statistics (mean, rstd); backward recomputes the normalized input
from x and them. Parameter gradients are reduced per thread chunk, then summed, so no two
threads write the same memory.
"""
import numpy as np

from .checks import floats, optional, shaped
from .jit import num_threads, pjit, prange


def layernorm_forward(x, w, b, out, mean, rstd, eps):
    """x, out: (N, C); w, b: (C,); mean, rstd: (N,) written."""
    fn = "layernorm_forward"
    N, C = floats(fn, "x", x, ndim=2, dims="(N, C)").shape
    shaped(fn, (C,), w=w, b=b)
    shaped(fn, (N, C), out=out)
    shaped(fn, (N,), mean=mean, rstd=rstd)
    _layernorm_forward(x, w, b, out, mean, rstd, eps)


@pjit
def _layernorm_forward(x, w, b, out, mean, rstd, eps):
    N, C = x.shape
    inv_c = np.float32(1.0) / np.float32(C)  # float32 scalars: an int or float64 would promote
    eps32 = np.float32(eps)
    for i in prange(N):
        xi = x[i]
        s = np.float32(0.0)
        for j in range(C):
            s += xi[j]
        m = s * inv_c
        # Corrected two-pass: the deviations' own sum fixes the float32 rounding of the mean
        # (a constant row then normalizes to exactly 0, not to rounding error times 1/sqrt(eps)).
        v = np.float32(0.0)
        sd = np.float32(0.0)
        for j in range(C):
            d = xi[j] - m
            sd += d
            v += d * d
        sd *= inv_c
        m += sd
        r = np.float32(1.0) / np.sqrt(max(v * inv_c - sd * sd, np.float32(0.0)) + eps32)
        oi = out[i]
        for j in range(C):
            oi[j] = (xi[j] - m) * r * w[j] + b[j]
        mean[i] = m
        rstd[i] = r


@pjit
def _layernorm_backward(dout, x, w, mean, rstd, dx, dwp, dbp, nchunk):
    N, C = x.shape
    inv_c = np.float32(1.0) / np.float32(C)
    for c in prange(nchunk):
        dwc = dwp[c]
        dbc = dbp[c]
        for i in range(c * N // nchunk, (c + 1) * N // nchunk):
            xi = x[i]
            gi = dout[i]
            m = mean[i]
            r = rstd[i]
            # dxhat = dout * w; dx = r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            a = np.float32(0.0)
            bsum = np.float32(0.0)
            for j in range(C):
                xh = (xi[j] - m) * r
                dxh = gi[j] * w[j]
                a += dxh
                bsum += dxh * xh
                dwc[j] += gi[j] * xh
                dbc[j] += gi[j]
            a *= inv_c
            bsum *= inv_c
            dxi = dx[i]
            for j in range(C):
                xh = (xi[j] - m) * r
                dxi[j] += r * (gi[j] * w[j] - a - xh * bsum)


def layernorm_backward(dout, x, w, mean, rstd, dx, dw=None, db=None):
    """Accumulates into dx (N, C) (the residual stream's gradient is already there) and into dw,
    db (C,) when given."""
    fn = "layernorm_backward"
    N, C = floats(fn, "x", x, ndim=2, dims="(N, C)").shape
    shaped(fn, (C,), w=w)
    shaped(fn, (N, C), dout=dout, dx=dx)
    shaped(fn, (N,), mean=mean, rstd=rstd)
    optional(fn, (C,), dw=dw, db=db)
    nchunk = _chunks(N)
    dwp = np.zeros((nchunk, C), np.float32)
    dbp = np.zeros((nchunk, C), np.float32)
    _layernorm_backward(dout, x, w, mean, rstd, dx, dwp, dbp, nchunk)
    if dw is not None:
        dw += dwp.sum(0)
    if db is not None:
        db += dbp.sum(0)


def rmsnorm_forward(x, w, out, rstd, eps):
    """x, out: (N, C); w: (C,); rstd: (N,) written. out = x / sqrt(mean(x^2) + eps) * w."""
    fn = "rmsnorm_forward"
    N, C = floats(fn, "x", x, ndim=2, dims="(N, C)").shape
    shaped(fn, (C,), w=w)
    shaped(fn, (N, C), out=out)
    shaped(fn, (N,), rstd=rstd)
    _rmsnorm_forward(x, w, out, rstd, eps)


@pjit
def _rmsnorm_forward(x, w, out, rstd, eps):
    N, C = x.shape
    inv_c = np.float32(1.0) / np.float32(C)
    eps32 = np.float32(eps)
    for i in prange(N):
        xi = x[i]
        s = np.float32(0.0)
        for j in range(C):
            s += xi[j] * xi[j]
        r = np.float32(1.0) / np.sqrt(s * inv_c + eps32)
        oi = out[i]
        for j in range(C):
            oi[j] = xi[j] * r * w[j]
        rstd[i] = r


@pjit
def _rmsnorm_backward(dout, x, w, rstd, dx, dwp, nchunk):
    N, C = x.shape
    inv_c = np.float32(1.0) / np.float32(C)
    for c in prange(nchunk):
        dwc = dwp[c]
        for i in range(c * N // nchunk, (c + 1) * N // nchunk):
            xi = x[i]
            gi = dout[i]
            r = rstd[i]
            # dx = r * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * w, xhat = x * r
            bsum = np.float32(0.0)
            for j in range(C):
                xh = xi[j] * r
                bsum += gi[j] * w[j] * xh
                dwc[j] += gi[j] * xh
            bsum *= inv_c
            dxi = dx[i]
            for j in range(C):
                dxi[j] += r * (gi[j] * w[j] - xi[j] * r * bsum)


def rmsnorm_backward(dout, x, w, rstd, dx, dw=None):
    """Accumulates into dx (N, C) and into dw (C,) when given."""
    fn = "rmsnorm_backward"
    N, C = floats(fn, "x", x, ndim=2, dims="(N, C)").shape
    shaped(fn, (C,), w=w)
    shaped(fn, (N, C), dout=dout, dx=dx)
    shaped(fn, (N,), rstd=rstd)
    optional(fn, (C,), dw=dw)
    nchunk = _chunks(N)
    dwp = np.zeros((nchunk, C), np.float32)
    _rmsnorm_backward(dout, x, w, rstd, dx, dwp, nchunk)
    if dw is not None:
        dw += dwp.sum(0)


def _chunks(n):
    return max(1, min(n, 4 * num_threads()))
