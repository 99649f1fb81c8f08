"""GELU (tanh form) and SwiGLU, forward and backward, elementwise over contiguous arrays.

Both are written through the logistic function, 0.5 * (1 + tanh(u)) = sigmoid(2u), so that one
vectorized exp serves both and nothing cancels near zero. Work is split into blocks of _BLK
elements; each thread owns its blocks and its scratch.
"""
import numpy as np

from .checks import same
from .jit import flat, jit, pjit, prange
from .vexp import exp_inplace

_BLK = 4096
_K0 = np.float32(0.7978845608028654)  # sqrt(2 / pi)
_K1 = np.float32(0.044715)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_THREE = np.float32(3.0)


@jit
def _gelu_t(xs, t, bits):
    """t = exp(-2u), u = K0 (x + K1 x^3): then gelu(x) = x / (1 + t), sigmoid(2u) = 1 / (1 + t)."""
    for j in range(xs.shape[0]):
        v = xs[j]
        t[j] = -_TWO * _K0 * (v + _K1 * v * v * v)
    exp_inplace(t, bits)


@jit
def _silu_t(gs, t, bits):
    """t = exp(-g): then sigmoid(g) = 1 / (1 + t)."""
    for j in range(gs.shape[0]):
        t[j] = -gs[j]
    exp_inplace(t, bits)


@pjit
def _gelu_forward(x, out):
    n = x.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo, hi = blk * _BLK, min(n, (blk + 1) * _BLK)
        xs, os = x[lo:hi], out[lo:hi]
        t, bits = np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)
        _gelu_t(xs, t, bits)
        for j in range(hi - lo):
            os[j] = xs[j] / (_ONE + t[j])


@pjit
def _gelu_backward(dout, x, dx):
    n = x.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo, hi = blk * _BLK, min(n, (blk + 1) * _BLK)
        xs, gs, ds = x[lo:hi], dout[lo:hi], dx[lo:hi]
        t, bits = np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)
        _gelu_t(xs, t, bits)
        for j in range(hi - lo):
            v = xs[j]
            s = _ONE / (_ONE + t[j])  # sigmoid(2u)
            du = _K0 * (_ONE + _THREE * _K1 * v * v)
            ds[j] = gs[j] * (s + v * s * (_ONE - s) * _TWO * du)


@pjit
def _swiglu_forward(gate, up, out):
    n = gate.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo, hi = blk * _BLK, min(n, (blk + 1) * _BLK)
        gs, us, os = gate[lo:hi], up[lo:hi], out[lo:hi]
        t, bits = np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)
        _silu_t(gs, t, bits)
        for j in range(hi - lo):
            os[j] = gs[j] / (_ONE + t[j]) * us[j]


@pjit
def _swiglu_backward(dout, gate, up, dgate, dup):
    n = gate.shape[0]
    for blk in prange((n + _BLK - 1) // _BLK):
        lo, hi = blk * _BLK, min(n, (blk + 1) * _BLK)
        gs, us, ds, dg, du = gate[lo:hi], up[lo:hi], dout[lo:hi], dgate[lo:hi], dup[lo:hi]
        t, bits = np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)
        _silu_t(gs, t, bits)
        for j in range(hi - lo):
            g = gs[j]
            s = _ONE / (_ONE + t[j])
            du[j] = ds[j] * g * s
            dg[j] = ds[j] * us[j] * s * (_ONE + g * (_ONE - s))


def gelu_forward(x, out):
    """out = gelu_tanh(x); any shape, C-contiguous float32, out of x's shape."""
    same("gelu_forward", "x", x, out=out)
    _gelu_forward(flat(x), flat(out))


def gelu_backward(dout, x, dx):
    """dx = dout * gelu_tanh'(x) (written, not accumulated)."""
    same("gelu_backward", "x", x, dout=dout, dx=dx)
    _gelu_backward(flat(dout), flat(x), flat(dx))


def swiglu_forward(gate, up, out):
    """out = silu(gate) * up."""
    same("swiglu_forward", "gate", gate, up=up, out=out)
    _swiglu_forward(flat(gate), flat(up), flat(out))


def swiglu_backward(dout, gate, up, dgate, dup):
    """dgate, dup written (not accumulated)."""
    same("swiglu_backward", "gate", gate, dout=dout, up=up, dgate=dgate, dup=dup)
    _swiglu_backward(flat(dout), flat(gate), flat(up), flat(dgate), flat(dup))
