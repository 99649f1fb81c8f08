"""Bias of a linear layer added to every row. numpy's `y += b` runs on one thread: 1.7 ms on a
(1024, 3072) GPT-2 MLP output against 0.8 ms here (2 threads)."""

from .checks import floats
from .jit import pjit, prange

_ROWS = 16   # rows per parallel task


def bias_add(y, b):
    """y (N, M) += b (M,), in place."""
    M = floats("bias_add", "y", y, ndim=2, dims="(N, M)").shape[1]
    floats("bias_add", "b", b, (M,))
    _bias_add(y, b)


@pjit
def _bias_add(y, b):
    N, M = y.shape
    for t in prange((N + _ROWS - 1) // _ROWS):
        for i in range(t * _ROWS, min(N, (t + 1) * _ROWS)):
            row = y[i]
            for j in range(M):
                row[j] += b[j]
