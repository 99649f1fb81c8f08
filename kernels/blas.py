"""numpy's own OpenBLAS, reached from Python and from inside Numba kernels.

- `single_threaded()`: OpenBLAS runs one thread per call; the engine splits work over its own
  threads (one threading runtime at a time, see matmul.py).
- `SGEMM`: the address of an ILP64 `cblas_sgemm` from the loaded OpenBLAS libraries, numpy's own
  first (scipy-openblas64, what numpy >= 2 wheels ship), or 0 when there is none (numpy linked to
  MKL or Accelerate, or NUMBA_DISABLE_JIT); kernels then use their Numba fallback.
- `sgemm(addr, ...)`: a Numba intrinsic that calls that address. The address is a run-time
  argument, not a constant baked into the code, so kernels that use it stay in the on-disk cache.
  Pointers are byte addresses (`array.ctypes.data + offset * 4`); row-major throughout.
"""
import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

NOTRANS = 111   # CBLAS_TRANSPOSE values
TRANS = 112
_ROW_MAJOR = 101


def _loaded_openblas() -> list:
    """Paths of the OpenBLAS libraries loaded in this process (numpy loads its own on import)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    except OSError:
        return []


def _numpy_blas_dirs() -> list:
    """Where numpy's wheel keeps its OpenBLAS (for systems without /proc)."""
    base = os.path.dirname(os.path.dirname(np.__file__))
    return [os.path.join(base, d) for d in ("numpy.libs", "numpy/.dylibs", "scipy_openblas64/lib")]


def _libs():
    paths = sorted(_loaded_openblas(), key=lambda p: "numpy" not in p)   # numpy's own first
    if not paths:
        for d in _numpy_blas_dirs():
            if os.path.isdir(d):
                paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if "openblas" in f.lower()]
    out = []
    for p in paths:
        try:
            out.append(ctypes.CDLL(p))
        except OSError:
            continue
    return out


def _find_sgemm() -> int:
    from numba import config
    if config.DISABLE_JIT:
        return 0   # the intrinsic needs compiled code
    for lib in _libs():
        for sym in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):   # 64-bit integer interfaces only
            fn = getattr(lib, sym, None)
            if fn is not None:
                return ctypes.cast(fn, ctypes.c_void_p).value or 0
    return 0


SGEMM = _find_sgemm()


_single = False


def single_threaded():
    """Set every OpenBLAS loaded now to one thread through its C API (as threadpoolctl does),
    once per process: the first GEMM or attention call does it, after `import engine` has loaded
    numpy and Numba (and with it scipy's OpenBLAS, when scipy is installed). Missing numpy's one
    leaves its threads spinning inside our pool (measured: 1.3x to 3x slower steps)."""
    global _single
    if _single:
        return
    for lib in _libs():
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(1)
                break
    _single = True


@intrinsic
def sgemm(typingctx, addr, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """C (m x n, leading dim ldc) = alpha op(A) op(B) + beta C, by cblas_sgemm at addr."""
    sig = types.void(addr, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, sig, args):
        i32, i64, f32, vp = ir.IntType(32), ir.IntType(64), ir.FloatType(), cgutils.voidptr_t
        fnty = ir.FunctionType(ir.VoidType(),
                               [i32, i32, i32, i64, i64, i64, f32, vp, i64, vp, i64, f32, vp, i64])

        def val(i, ty):
            return context.cast(builder, args[i], sig.args[i], ty)

        def int_(i):
            return val(i, types.int64)

        def ptr(i):
            return builder.inttoptr(int_(i), vp)

        fn = builder.inttoptr(int_(0), fnty.as_pointer())
        builder.call(fn, [ir.Constant(i32, _ROW_MAJOR), builder.trunc(int_(1), i32),
                          builder.trunc(int_(2), i32), int_(3), int_(4), int_(5),
                          val(6, types.float32), ptr(7), int_(8), ptr(9), int_(10),
                          val(11, types.float32), ptr(12), int_(13)])
        return context.get_dummy_value()

    return sig, codegen
