"""GELU (tanh form) and SwiGLU, forward and backward, elementwise over contiguous arrays.

Both are written through the logistic function, 0.5 * (1 + tanh(u)) = sigmoid(2u), so that one
vectorized exp serves both and nothing cancels near zero. Work is split into blocks of _BLK
elements; each thread owns its blocks and its scratch.
"""
import numpy as np

from .jit import flat, pjit, prange
from .vexp import exp_inplace

_BLK = 4096
_K0 = np.float32(0.7978845608028654)  # sqrt(2 / pi)
_K1 = np.float32(0.044715)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_THREE = np.float32(3.0)


@pjit
def _gelu_forward(x, out):
    n = x.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo = blk * _BLK
        hi = min(n, lo + _BLK)
        xs = x[lo:hi]
        os = out[lo:hi]
        t = np.empty(hi - lo, np.float32)
        bits = np.empty(hi - lo, np.int32)
        for j in range(hi - lo):
            v = xs[j]
            t[j] = -_TWO * _K0 * (v + _K1 * v * v * v)
        exp_inplace(t, bits)
        for j in range(hi - lo):
            os[j] = xs[j] / (_ONE + t[j])


@pjit
def _gelu_backward(dout, x, dx):
    n = x.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo = blk * _BLK
        hi = min(n, lo + _BLK)
        xs = x[lo:hi]
        gs = dout[lo:hi]
        ds = dx[lo:hi]
        t = np.empty(hi - lo, np.float32)
        bits = np.empty(hi - lo, np.int32)
        for j in range(hi - lo):
            v = xs[j]
            t[j] = -_TWO * _K0 * (v + _K1 * v * v * v)
        exp_inplace(t, bits)
        for j in range(hi - lo):
            v = xs[j]
            s = _ONE / (_ONE + t[j])  # sigmoid(2u)
            du = _K0 * (_ONE + _THREE * _K1 * v * v)
            ds[j] = gs[j] * (s + v * s * (_ONE - s) * _TWO * du)


@pjit
def _swiglu_forward(gate, up, out):
    n = gate.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo = blk * _BLK
        hi = min(n, lo + _BLK)
        gs = gate[lo:hi]
        us = up[lo:hi]
        os = out[lo:hi]
        t = np.empty(hi - lo, np.float32)
        bits = np.empty(hi - lo, np.int32)
        for j in range(hi - lo):
            t[j] = -gs[j]
        exp_inplace(t, bits)
        for j in range(hi - lo):
            os[j] = gs[j] / (_ONE + t[j]) * us[j]


@pjit
def _swiglu_backward(dout, gate, up, dgate, dup):
    n = gate.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo = blk * _BLK
        hi = min(n, lo + _BLK)
        gs = gate[lo:hi]
        us = up[lo:hi]
        ds = dout[lo:hi]
        dg = dgate[lo:hi]
        du = dup[lo:hi]
        t = np.empty(hi - lo, np.float32)
        bits = np.empty(hi - lo, np.int32)
        for j in range(hi - lo):
            t[j] = -gs[j]
        exp_inplace(t, bits)
        for j in range(hi - lo):
            g = gs[j]
            s = _ONE / (_ONE + t[j])
            du[j] = ds[j] * g * s
            dg[j] = ds[j] * us[j] * s * (_ONE + g * (_ONE - s))


def gelu_forward(x, out):
    """out = gelu_tanh(x); any shape, C-contiguous float32."""
    _gelu_forward(flat(x), flat(out))


def gelu_backward(dout, x, dx):
    """dx = dout * gelu_tanh'(x) (written, not accumulated)."""
    _gelu_backward(flat(dout), flat(x), flat(dx))


def swiglu_forward(gate, up, out):
    """out = silu(gate) * up."""
    _swiglu_forward(flat(gate), flat(up), flat(out))


def swiglu_backward(dout, gate, up, dgate, dup):
    """dgate, dup written (not accumulated)."""
    _swiglu_backward(flat(dout), flat(gate), flat(up), flat(dgate), flat(dup))
