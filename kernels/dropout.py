"""Dropout with a counter-based mask: no mask is stored, and no RNG state is shared between
threads. Element j of row r is kept when hash(key, r, j) >= threshold, so forward and backward
(and any thread, in any order) draw the same mask from the same key. A kept element is scaled by
1 / (1 - p), a dropped one is 0: the inverted dropout of torch's nn.Dropout, with another mask.

The hash is murmur3's 32-bit finalizer (fmix32), applied to the row number with the key, then to
each column number with that row's value: a few integer multiplies and shifts per element,
vectorized by LLVM. Every product stays below 2**49 (_mul32), so the same arithmetic holds in
plain Python (NUMBA_DISABLE_JIT) and in numpy's uint64 (the tests' twin).

dropout_forward and dropout_backward are one operation (multiplying by the same scaled mask); both
names exist so that callers read as every other op pair."""
import numpy as np

from .checks import floats
from .jit import jit_inline, pjit, prange

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


@jit_inline
def _mul32(h, c: int):
    """(h * c) mod 2**32 for h, c in [0, 2**32), in halves of c so that no product passes
    2**49: exact in any integer type (numpy's int64 scalars of the plain-Python path warn on
    overflow), and vectorized the same."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


@jit_inline
def _fmix32(h):
    """murmur3's finalizer over h in [0, 2**32): every input bit reaches every output bit."""
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
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
        h = _fmix32(_mul32(j, _GOLDEN) ^ rk)
        x[j] = x[j] * scale if h >= threshold else zero


@pjit
def _dropout_rows(x, C, key, threshold, scale, ids):
    """Row r of x (flat, rows of C) by the mask's row ids[r] (ids empty: r)."""
    rows = x.shape[0] // C
    for r in prange(rows):
        i = ids[r] if ids.shape[0] else np.int64(r)
        mask_row(x[r * C:(r + 1) * C], C, row_key(key, i), threshold, scale)


_ALL = np.zeros(0, np.int64)


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


def dropout_forward(x, p: float, key: int, rows=None):
    """In place: each element of x (C-contiguous float32; rows along the last axis) is scaled
    by 1 / (1 - p) or set to 0, by the mask of `key`. p = 0 leaves x as it is. rows (int64,
    one per row of x): x holds these rows of a larger array, and takes their masks (a
    layer run on some positions only drops out as it would with all of them)."""
    _dropout("dropout_forward", x, p, key, rows)


def dropout_backward(dx, p: float, key: int, rows=None):
    """In place: the gradient through dropout_forward(x, p, key, rows) (the same scaled mask)."""
    _dropout("dropout_backward", dx, p, key, rows)


def _dropout(fn, x, p, key, rows):
    name = "dx" if fn == "dropout_backward" else "x"
    floats(fn, name, x)
    if not x.flags.writeable:
        raise ValueError(f"{fn}: {name} is read-only (dropout works in place)")
    key = check_key(fn, key)
    t = threshold(p, fn)
    C = x.shape[-1] if x.ndim else 1
    n_rows = int(np.prod(x.shape[:-1])) if x.ndim else 1
    if rows is None:
        ids = _ALL
    else:
        if not (isinstance(rows, np.ndarray) and rows.dtype == np.int64 and rows.shape == (n_rows,)):
            raise ValueError(f"{fn}: rows must be an int64 array of shape ({n_rows},) (one per "
                             f"row of x), got {getattr(rows, 'dtype', type(rows).__name__)} of "
                             f"shape {getattr(rows, 'shape', None)}")
        if n_rows and rows.min() < 0:
            raise ValueError(f"{fn}: rows holds {rows.min()}, expected row numbers >= 0")
        ids = np.ascontiguousarray(rows)
    if t == 0 or x.size == 0:
        return
    _dropout_rows(x.reshape(-1), C, key, t, np.float32(1.0 / (1.0 - p)), ids)
