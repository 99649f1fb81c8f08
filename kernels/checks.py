"""Argument checks for the public kernel functions, run in Python before any compiled kernel
touches the arrays: the kernels index without bounds checks, so a wrong shape or an index out of
range would read or write outside an array (wrong results, or a crash) instead of raising.

Each check is O(1) Python work, except `indices`, which does one vectorized min / max over the
index array. Errors are ValueError naming the function, the argument, what it is and what was
expected: "layernorm_forward: w has shape (3,), expected (8,)".
"""
import numpy as np

_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)


def _array(fn, name, a):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{fn}: {name} must be a numpy array, got {type(a).__name__}")


def floats(fn, name, a, shape=None, ndim=None, dims=None, contiguous=True):
    """a is a float32 ndarray, of exactly `shape` when given, else of `ndim` dimensions when
    given (dims names the axes in the message, e.g. "(N, C)"), C-contiguous unless
    contiguous=False (kernels that index any strides, or copy what they need)."""
    _array(fn, name, a)
    if a.dtype != _F32:
        raise ValueError(f"{fn}: {name} has dtype {a.dtype}, expected float32")
    if shape is not None:
        if a.shape != shape:
            raise ValueError(f"{fn}: {name} has shape {a.shape}, expected {shape}")
    elif ndim is not None and a.ndim != ndim:
        raise ValueError(f"{fn}: {name} has shape {a.shape}, expected {dims or f'{ndim}-D'}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} (shape {a.shape}, strides {a.strides}) is not C-contiguous")
    return a


def shaped(fn, shape, **arrays):
    """Each of arrays (name=array) is a C-contiguous float32 array of `shape`."""
    for name, a in arrays.items():
        floats(fn, name, a, shape)


def optional(fn, shape, **arrays):
    """Each of arrays is None (not given) or a float32 array of `shape`, any strides: gradients
    that numpy, not a kernel, adds into."""
    for name, a in arrays.items():
        if a is not None:
            floats(fn, name, a, shape, contiguous=False)


def same(fn, ref_name, ref, **arrays):
    """ref and every one of arrays are C-contiguous float32 arrays of ref's shape (elementwise
    kernels)."""
    floats(fn, ref_name, ref)
    shaped(fn, ref.shape, **arrays)


def indices(fn, name, a, shape, high, ignore=None):
    """a is an integer array of `shape` whose values lie in [0, high), or equal `ignore` when
    given. Returns it as the C-contiguous int64 array the kernels are compiled for (a itself when
    it is one already; any other integer dtype is converted, a copy of a small index array)."""
    _array(fn, name, a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{fn}: {name} has dtype {a.dtype}, expected an integer dtype")
    if a.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {a.shape}, expected {shape}")
    if a.size:
        lo, hi = a.min(), a.max()
        if hi >= high:
            raise ValueError(f"{fn}: {name} holds {hi}, expected values in [0, {high})"
                             + (f" or {ignore}" if ignore is not None else ""))
        if lo < 0 and ignore is not None:
            other = a[(a < 0) & (a != ignore)]   # a second pass only when some index is negative
            lo = other[0] if other.size else 0
        if lo < 0:
            raise ValueError(f"{fn}: {name} holds {lo}, expected values in [0, {high})"
                             + (f" or {ignore}" if ignore is not None else ""))
    if a.dtype == _I64 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, _I64)


def position(fn, name, pos0):
    """A starting position: a Python or numpy integer >= 0, returned as a Python int (one
    compiled version for every integer type)."""
    if isinstance(pos0, (bool, np.bool_)) or not isinstance(pos0, (int, np.integer)):
        raise ValueError(f"{fn}: {name} must be an integer, got {type(pos0).__name__}")
    if pos0 < 0:
        raise ValueError(f"{fn}: {name} is {pos0}, expected >= 0")
    return int(pos0)
