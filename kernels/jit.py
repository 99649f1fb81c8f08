"""The one place where Numba compile and threading options are set."""
from . import openmp  # noqa: F401  (the wait policy, before Numba starts OpenMP)

import functools  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402

import numba  # noqa: E402

# Reassociation and contraction let LLVM vectorize reductions and fuse multiply-adds. No-NaN and
# no-Inf are left out on purpose: attention masks and softmax maxima rely on -inf behaving.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

prange = numba.prange


def _check_cache_location() -> None:
    """Compiled kernels are cached on disk (cache=True): beside these files, else in Numba's
    user-wide cache directory, or in NUMBA_CACHE_DIR. With none writable (a read-only install
    and home: a service account, a container), Numba stops with "no locator available" at
    the first kernel; say what to set instead."""
    import errno
    import os
    import tempfile
    from numba.misc.appdirs import AppDirs
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    places = [d for d in (numba.config.CACHE_DIR, here,
                          AppDirs(appname="numba", appauthor=False).user_cache_dir) if d]
    for d in places:
        try:
            os.makedirs(d, exist_ok=True)
            tempfile.TemporaryFile(dir=d).close()
            return
        except OSError:
            continue
    raise PermissionError(errno.EACCES, "no writable directory for the compiled kernels (tried "
                          f"{', '.join(places)}): set NUMBA_CACHE_DIR to a writable directory")


if not numba.config.DISABLE_JIT:
    _check_cache_location()


# error_model="numpy": float division by zero gives inf/nan instead of raising; Python's model
# puts a zero test before every division, which stops vectorization (measured 4x on GELU).
_OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy")


def jit(fn):
    """Serial kernel, compiled once and cached on disk."""
    return numba.njit(**_OPTIONS)(fn)


def jit_inline(fn):
    """A small helper inlined into its callers at Numba IR level (a tile of a kernel)."""
    return numba.njit(inline="always", **_OPTIONS)(fn)


def pjit(fn):
    """Parallel kernel: `prange` loops split across threads; each thread writes only its own rows.
    Called from Python only, through a wrapper that guards the threading layer (below)."""
    return _launcher(numba.njit(parallel=True, **_OPTIONS)(fn), fn)


def num_threads() -> int:
    return numba.get_num_threads()


def flat(a):
    """A 1-D view of a C-contiguous array. Refuses to copy: a copy would silently drop writes."""
    if not a.flags.c_contiguous:
        raise ValueError("kernel arrays must be C-contiguous")
    return a.reshape(-1)


# ---- Numba's threading layer, forks and Python threads ----------------------------------------
# GNU OpenMP cannot run in a child forked after the parent used it: Numba then terminates the
# child at its first parallel kernel (SIGTERM; a multiprocessing Pool waits for it forever).
# Numba's workqueue layer aborts the process when two Python threads launch kernels at once.
# Every parallel kernel is launched through pjit's wrapper, which checks for both.
_forked_after_gnu_omp = False
_serial = threading.RLock()
_serialize = True       # until the first launch has chosen a layer that takes concurrent launches


def _after_fork_in_child():
    global _forked_after_gnu_omp, _serial
    _serial = threading.RLock()     # a lock another thread of the parent held stays held here
    try:
        layer = numba.threading_layer()
    except ValueError:      # the parent ran no parallel kernel: the child chooses its own layer
        return
    if layer == "omp":
        from numba.np.ufunc import omppool
        _forked_after_gnu_omp = omppool.openmp_vendor == "GNU"


def in_forked_child(fn):
    """Run fn in the child of every fork; a no-op where there is no fork (Windows has no
    os.register_at_fork, and `import engine` must not fail there)."""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=fn)
    return fn


in_forked_child(_after_fork_in_child)


def _refuse_forked():
    raise RuntimeError(
        "tailtune cannot run its kernels in this process: it was forked (multiprocessing's "
        "default 'fork' start method on Linux) from one that had already run them on GNU OpenMP, "
        "which does not work after a fork. Use multiprocessing.get_context('spawn') or "
        "'forkserver', or start the child processes before the parent runs the model.")


def _launcher(kernel, fn):
    @functools.wraps(fn)
    def launch(*args):
        global _serialize
        if _forked_after_gnu_omp:
            _refuse_forked()
        if not _serialize:
            return kernel(*args)
        with _serial:
            out = kernel(*args)
        try:
            _serialize = numba.threading_layer() == "workqueue"
        except ValueError:  # NUMBA_DISABLE_JIT: no layer, and no harm in the lock
            pass
        return out
    return launch
