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

from .blas import one_thread
from .checks import floats
from .jit import in_forked_child, num_threads, pjit, prange
from .tiles import dots4x2

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
                    c00, c01, c10, c11, c20, c21, c30, c31 = dots4x2(
                        a0, a1, a2, a3, b[j, k0:k1], b[j + 1, k0:k1], k1 - k0)
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


_BACKENDS = ("blas", "numba")


def _check(fn, a, b, out, ka, kb, dims, backend):
    """a, b 2-D float32 sharing the inner dimension K (a's axis ka, b's axis kb); out float32
    (M, N) from their other axes; a known backend, which is returned. Any strides: the Numba path
    packs its operands, the BLAS path takes strided views."""
    floats(fn, "a", a, ndim=2, dims=dims[0], contiguous=False)
    floats(fn, "b", b, ndim=2, dims=dims[1], contiguous=False)
    K = a.shape[ka]
    if b.shape[kb] != K:
        raise ValueError(f"{fn}: b has shape {b.shape}, expected {dims[1]} with K = {K} "
                         f"(a has shape {a.shape}, {dims[0]})")
    floats(fn, "out", out, (a.shape[1 - ka], b.shape[1 - kb]), contiguous=False)
    backend = backend or BACKEND
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: unknown backend {backend!r}, expected one of {_BACKENDS}")
    return backend


def gemm_nt(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (M, K) @ b (N, K).T, or += with accumulate."""
    if _check("gemm_nt", a, b, out, 1, 1, ("(M, K)", "(N, K)"), backend) == "numba":
        _gemm_nt(np.ascontiguousarray(a), np.ascontiguousarray(b), out, accumulate)
    else:
        _blas(lambda r: (a[r], b.T), lambda c: (a, b[c].T), out, accumulate)


def gemm_nn(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (M, K) @ b (K, N), or += with accumulate."""
    if _check("gemm_nn", a, b, out, 1, 0, ("(M, K)", "(K, N)"), backend) == "numba":
        _gemm_nt(np.ascontiguousarray(a), np.ascontiguousarray(b.T), out, accumulate)
    else:
        _blas(lambda r: (a[r], b), lambda c: (a, b[:, c]), out, accumulate)


def gemm_tn(a, b, out, accumulate=False, backend=None):
    """out (M, N) = a (K, M).T @ b (K, N), or += with accumulate."""
    if _check("gemm_tn", a, b, out, 0, 0, ("(K, M)", "(K, N)"), backend) == "numba":
        _gemm_nt(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), out, accumulate)
    else:
        _blas(lambda r: (a[:, r].T, b), lambda c: (a.T, b[:, c]), out, accumulate)


# ---- BLAS on our own threads ------------------------------------------------------------------
# OpenBLAS worker threads spin for a long time after each call; interleaved with Numba's
# parallel kernels they fight over the cores (measured here: 8 ms instead of 0.75 ms for a
# GEMM + layernorm pair). So OpenBLAS runs single-threaded and a GEMM is split by output rows
# over a small pool of Python threads (numpy releases the GIL inside BLAS): one threading
# runtime at a time, and the same GEMM throughput as OpenBLAS's own threads.

_MIN_SPLIT_FLOPS = 1 << 22   # below this, one thread: the pool hand-off costs more than it saves
_pool = None


def _forget_pool():
    global _pool     # a forked child inherits the pool but not its threads: parts would never run
    _pool = None


in_forked_child(_forget_pool)


def _blas(by_rows, by_cols, out, accumulate):
    """out (+)= x @ y, split over the threads by rows of out, or by columns when there are few
    rows (decoding: M = 1; a short batch). by_rows(slice) / by_cols(slice) give the operands of
    a part."""
    with one_thread():
        _blas_split(by_rows, by_cols, out, accumulate)


def _blas_split(by_rows, by_cols, out, accumulate):
    M, N = out.shape
    K = by_rows(slice(0, 1))[0].shape[1]
    n = _threads_for(M, N, K)
    if n == 1:
        _blas_part(by_rows, out, accumulate, slice(0, M), None)
        return
    # few rows against many columns (the LM head over a short batch, decoding): split the
    # columns, so that each thread streams half of the weight instead of all of it (measured
    # 10-20% faster at 32-64 rows, the head 5% at 128-256; at 512 rows it makes no difference)
    rows = M >= 4 * n and not ((M <= 64 and N >= 2 * M) or (M <= 256 and N >= 16 * M))
    size = M if rows else N
    bounds = [size * i // n for i in range(n + 1)]
    parts = [slice(bounds[i], bounds[i + 1]) for i in range(n)]
    fn, axis = (by_rows, 0) if rows else (by_cols, 1)
    futures = [_pool.submit(_blas_part, fn, out, accumulate, p, axis) for p in parts[1:]]
    _blas_part(fn, out, accumulate, parts[0], axis)
    for f in futures:
        f.result()


def _blas_part(operands, out, accumulate, part, axis):
    x, y = operands(part)
    dst = out if axis is None else (out[part] if axis == 0 else out[:, part])
    if accumulate:
        dst += x @ y
    elif dst.flags.c_contiguous:
        np.matmul(x, y, out=dst)
    else:
        dst[...] = x @ y


def _threads_for(M, N, K):
    global _pool
    n = num_threads()
    if n <= 1 or 2 * M * N * K < _MIN_SPLIT_FLOPS or max(M, N) < 4 * n:
        return 1
    if _pool is None or _pool._max_workers != n - 1:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(n - 1, thread_name_prefix="tailtune-gemm")
    return n
