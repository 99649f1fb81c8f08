"""The register tile shared by the GEMM and attention kernels."""
import numpy as np

from .jit import jit_inline


@jit_inline
def dots4x2(y0, y1, y2, y3, x0, x1, n):
    """Eight dot products of length n: four rows y with two rows x (contiguous 1-D slices, so
    that each of the eight accumulators vectorizes)."""
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = np.float32(0.0)
    for t in range(n):
        a = x0[t]
        b = x1[t]
        c00 += y0[t] * a
        c01 += y0[t] * b
        c10 += y1[t] * a
        c11 += y1[t] * b
        c20 += y2[t] * a
        c21 += y2[t] * b
        c30 += y3[t] * a
        c31 += y3[t] * b
    return c00, c01, c10, c11, c20, c21, c30, c31
