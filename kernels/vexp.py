"""exp over a 1-D slice that LLVM can vectorize.

`math.exp` / `np.exp` in a Numba loop are scalar libm calls and stop vectorization. This is the
Cephes expf polynomial (about 1 ulp) with 2^k built from int32 bits viewed as float32, done in
two passes so that both loops vectorize.
"""
import numpy as np

from .jit import jit

_LO = np.float32(-87.33654)
_HI = np.float32(88.37626)
_LOG2E = np.float32(1.44269504088896341)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_C1 = np.float32(0.693359375)
_C2 = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)


@jit
def exp_inplace(x, bits):
    """x[j] = exp(x[j]) for the float32 (n,) slice x; returns the sum. bits: int32 scratch of
    length >= n. Inputs below -87.3 give ~1e-38, not 0.
    In place on purpose: with separate input and output LLVM must guard against overlap, and
    callers that pass the same array twice would get the scalar fallback loop (4x slower)."""
    n = x.shape[0]
    for j in range(n):
        v = min(max(x[j], _LO), _HI)
        k = np.floor(v * _LOG2E + _HALF)
        r = v - k * _C1 - k * _C2
        p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
        x[j] = p
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits[:n].view(np.float32)
    s = np.float32(0.0)
    for j in range(n):
        e = x[j] * scale[j]
        x[j] = e
        s += e
    return s
