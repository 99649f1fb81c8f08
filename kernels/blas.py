"""numpy's own OpenBLAS, reached from Python and from inside Numba kernels.

- `one_thread()`: OpenBLAS runs one thread per call inside it; the engine splits work over its
  own threads (one threading runtime at a time, see matmul.py).
- `SGEMM`: the address of an ILP64 `cblas_sgemm` from the loaded OpenBLAS libraries, numpy's own
  first (scipy-openblas64, what numpy >= 2 wheels ship), or 0 when there is none (numpy linked to
  MKL or Accelerate, or NUMBA_DISABLE_JIT); kernels then use their Numba fallback.
- `sgemm(addr, ...)`: a Numba intrinsic that calls that address. The address is a run-time
  argument, not a constant baked into the code, so kernels that use it stay in the on-disk cache.
  Pointers are byte addresses (`array.ctypes.data + offset * 4`); row-major throughout.
"""
import contextlib
import ctypes
import os
import threading

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import in_forked_child

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


def openblas_paths() -> list:
    """The OpenBLAS libraries of this process (from /proc), else numpy's wheel's (no /proc:
    macOS, Windows); numpy's own first. The benches read the same list."""
    paths = sorted(_loaded_openblas(), key=lambda p: "numpy" not in p)
    if not paths:
        for d in _numpy_blas_dirs():
            if os.path.isdir(d):
                paths += [os.path.join(d, f) for f in sorted(os.listdir(d)) if "openblas" in f.lower()]
    return paths


def _libs():
    out = []
    for p in openblas_paths():
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


_controls = None        # per OpenBLAS library: (set_num_threads, get_num_threads)
_lock = threading.Lock()
_depth = 0              # callers inside one_thread(), over all Python threads
_saved: list = []


def _after_fork_in_child():
    global _lock, _depth      # the child has only the forking thread: no caller is inside
    if _depth:                # another thread of the parent was: the host's setting back
        for set_fn, n in _saved:
            set_fn(n)
    _lock, _depth = threading.Lock(), 0


in_forked_child(_after_fork_in_child)


_THREAD_API = [(f"{p}_set_num_threads{x}", f"{p}_get_num_threads{x}")
               for p in ("scipy_openblas", "openblas") for x in ("64_", "")]


def _thread_controls() -> list:
    global _controls
    if _controls is None:   # looked up once: after `import engine` has loaded numpy and Numba
        _controls = []      # (and with it scipy's OpenBLAS, when scipy is installed)
        for lib in _libs():
            for set_name, get_name in _THREAD_API:
                set_fn, get_fn = getattr(lib, set_name, None), getattr(lib, get_name, None)
                if set_fn is not None and get_fn is not None:
                    set_fn.argtypes, get_fn.restype = [ctypes.c_int], ctypes.c_int
                    _controls.append((set_fn, get_fn))
                    break
    return _controls


@contextlib.contextmanager
def one_thread():
    """Every loaded OpenBLAS at one thread inside this block (through its C API, as
    threadpoolctl does), and back to its own setting after: the engine splits work over its own
    threads, and numpy's OpenBLAS threads left spinning inside that pool cost 1.3x to 3x. The
    host application's numpy keeps its threads outside. Nests, and holds across Python threads
    until the last one leaves."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = [(set_fn, get_fn()) for set_fn, get_fn in _thread_controls()]
            for set_fn, _ in _saved:
                set_fn(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for set_fn, n in _saved:
                    set_fn(n)


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
