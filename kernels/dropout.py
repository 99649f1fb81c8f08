"""Dropout with a counter-based mask: no mask is stored, and no RNG state is shared between
threads. Element j of row r is kept when hash(key, r, j) >= threshold, so forward and backward
(and any thread, in any order) draw the same mask from the same key. A kept element is scaled by
1 / (1 - p), a dropped one is 0: the inverted dropout of torch's nn.Dropout, with another mask.

The hash is murmur3's 32-bit finalizer (fmix32), applied to the row number with the key, then to
each column number with that row's value: a few integer multiplies and shifts per element,
vectorized by LLVM. Every value stays below 2**32 after a mask, so the same arithmetic holds in
plain Python (NUMBA_DISABLE_JIT) and in numpy's uint64 (the tests' twin).

dropout_forward and dropout_backward are one operation (multiplying by the same scaled mask); both
names exist so that callers read as every other op pair."""
import numpy as np

from .checks import floats
from .jit import jit, jit_inline, pjit, prange

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@jit_inline
def _fmix32(h):
    """murmur3's finalizer over h in [0, 2**32): every input bit reaches every output bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


@jit_inline
def row_key(key, row):
    """The hash state of row `row` under `key` (both integers in [0, 2**32))."""
    return _fmix32(_fmix32(row & _M32) ^ key)


@jit_inline
def mask_row(x, n, rk, threshold, scale):
    """x[:n] *= scale where hash(rk, j) >= threshold, else 0 (one row of a dropout)."""
    zero = np.float32(0.0)
    for j in range(n):
        h = _fmix32(((j * _GOLDEN) & _M32) ^ rk)
        x[j] = x[j] * scale if h >= threshold else zero


@pjit
def _dropout_rows(x, C, key, threshold, scale):
    rows = x.shape[0] // C
    for r in prange(rows):
        mask_row(x[r * C:(r + 1) * C], C, row_key(key, r), threshold, scale)


@jit
def _dropout_serial(x, C, key, threshold, scale):
    for r in range(x.shape[0] // C):
        mask_row(x[r * C:(r + 1) * C], C, row_key(key, r), threshold, scale)


def threshold(p: float, fn: str = "dropout_forward", name: str = "p") -> int:
    """The hash value below which an element is dropped: round(p * 2**32), 0 for p = 0."""
    if isinstance(p, (bool, np.bool_)) or not (isinstance(p, (int, float, np.integer, np.floating))
                                               and 0.0 <= p < 1.0):
        raise ValueError(f"{fn}: {name} must be a number in [0, 1), got {p!r}")
    return min(int(round(float(p) * 2.0 ** 32)), _M32)


def check_key(fn, key) -> int:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) \
            or not 0 <= key <= _M32:
        raise ValueError(f"{fn}: key must be an integer in [0, 2**32), got {key!r}")
    return int(key)


def dropout_forward(x, p: float, key: int):
    """In place: each element of x (C-contiguous float32; rows along the last axis) is scaled
    by 1 / (1 - p) or set to 0, by the mask of `key`. p = 0 leaves x as it is."""
    floats("dropout_forward", "x", x)
    key = check_key("dropout_forward", key)
    t = threshold(p)
    if t == 0 or x.size == 0:
        return
    C = x.shape[-1] if x.ndim else 1
    scale = np.float32(1.0 / (1.0 - p))
    flat_x = x.reshape(-1)
    # a handful of rows (a classifier's input) is not worth waking the threads
    (_dropout_rows if x.size >= 1 << 15 else _dropout_serial)(flat_x, C, key, t, scale)


def dropout_backward(dx, p: float, key: int):
    """In place: the gradient through dropout_forward(x, p, key) (the same scaled mask)."""
    floats("dropout_backward", "dx", dx)
    check_key("dropout_backward", key)
    threshold(p, "dropout_backward")
    dropout_forward(dx, p, key)
