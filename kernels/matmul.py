"""GEMM in three layouts, a Numba kernel and a BLAS path behind one dispatch.

  nt: out = a @ b.T   a (M, K), b (N, K)   forward of a linear layer, W stored (out, in)
  nn: out = a @ b     a (M, K), b (K, N)   input gradient dX = dY @ W
  tn: out = a.T @ b   a (K, M), b (K, N)   weight gradient dW = dY.T @ X

The Numba kernel computes the nt layout only: every output element is a dot product of two
contiguous rows, which LLVM vectorizes. The other layouts pack (transpose) their operands into
that form first; packing is O(K (M + N)) against O(M N K) of arithmetic.
`BACKEND` picks the implementation; "blas" (numpy.matmul on OpenBLAS) is the default until the
benches show the Numba kernel ahead on a shape (see benches/).
"""
import numpy as np

from .jit import pjit, prange

BACKEND = "blas"

_KB = 512   # k block: four rows of a and of b stay in L1 (4 * 2 * 512 * 4 bytes)
_NB = 64    # rows of b per parallel stripe


@pjit
def _gemm_nt(a, b, out, accumulate):
    M, K = a.shape
    N = b.shape[0]
    for jb in prange((N + _NB - 1) // _NB):
        j0 = jb * _NB
        j1 = min(N, j0 + _NB)
        if not accumulate:
            for i in range(M):
                for j in range(j0, j1):
                    out[i, j] = np.float32(0.0)
        for k0 in range(0, K, _KB):
            k1 = min(K, k0 + _KB)
            i = 0
            while i + 4 <= M:
                a0 = a[i, k0:k1]
                a1 = a[i + 1, k0:k1]
                a2 = a[i + 2, k0:k1]
                a3 = a[i + 3, k0:k1]
                j = j0
                while j + 2 <= j1:
                    b0 = b[j, k0:k1]
                    b1 = b[j + 1, k0:k1]
                    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = np.float32(0.0)
                    for kk in range(k1 - k0):
                        x0 = b0[kk]
                        x1 = b1[kk]
                        c00 += a0[kk] * x0
                        c01 += a0[kk] * x1
                        c10 += a1[kk] * x0
                        c11 += a1[kk] * x1
                        c20 += a2[kk] * x0
                        c21 += a2[kk] * x1
                        c30 += a3[kk] * x0
                        c31 += a3[kk] * x1
                    out[i, j] += c00
                    out[i, j + 1] += c01
                    out[i + 1, j] += c10
                    out[i + 1, j + 1] += c11
                    out[i + 2, j] += c20
                    out[i + 2, j + 1] += c21
                    out[i + 3, j] += c30
                    out[i + 3, j + 1] += c31
                    j += 2
                while j < j1:
                    b0 = b[j, k0:k1]
                    c00 = c10 = c20 = c30 = np.float32(0.0)
                    for kk in range(k1 - k0):
                        x0 = b0[kk]
                        c00 += a0[kk] * x0
                        c10 += a1[kk] * x0
                        c20 += a2[kk] * x0
                        c30 += a3[kk] * x0
                    out[i, j] += c00
                    out[i + 1, j] += c10
                    out[i + 2, j] += c20
                    out[i + 3, j] += c30
                    j += 1
                i += 4
            while i < M:
                ai = a[i, k0:k1]
                for j in range(j0, j1):
                    bj = b[j, k0:k1]
                    c = np.float32(0.0)
                    for kk in range(k1 - k0):
                        c += ai[kk] * bj[kk]
                    out[i, j] += c
                i += 1


def _check(a, b, out, shape):
    if out.shape != shape:
        raise ValueError(f"gemm: out has shape {out.shape}, expected {shape}")
    for x in (a, b, out):
        if x.dtype != np.float32:
            raise ValueError("gemm: arrays must be float32")


def gemm_nt(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (M, K) @ b (N, K).T, or += with accumulate."""
    _check(a, b, out, (a.shape[0], b.shape[0]))
    if (backend or BACKEND) == "numba":
        _gemm_nt(np.ascontiguousarray(a), np.ascontiguousarray(b), out, accumulate)
    elif accumulate:
        out += a @ b.T
    else:
        np.matmul(a, b.T, out=out)


def gemm_nn(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (M, K) @ b (K, N), or += with accumulate."""
    _check(a, b, out, (a.shape[0], b.shape[1]))
    if (backend or BACKEND) == "numba":
        _gemm_nt(np.ascontiguousarray(a), np.ascontiguousarray(b.T), out, accumulate)
    elif accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)


def gemm_tn(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (K, M).T @ b (K, N), or += with accumulate."""
    _check(a, b, out, (a.shape[1], b.shape[1]))
    if (backend or BACKEND) == "numba":
        _gemm_nt(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), out, accumulate)
    elif accumulate:
        out += a.T @ b
    else:
        np.matmul(a.T, b, out=out)
