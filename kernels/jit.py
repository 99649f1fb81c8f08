"""The one place where Numba compile options are set."""
import numba

# Reassociation and contraction let LLVM vectorize reductions and fuse multiply-adds. No-NaN and
# no-Inf are left out on purpose: attention masks and softmax maxima rely on -inf behaving.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

prange = numba.prange


def jit(fn):
    """Serial kernel, compiled once and cached on disk."""
    return numba.njit(cache=True, fastmath=FASTMATH)(fn)


def pjit(fn):
    """Parallel kernel: `prange` loops split across threads; each thread writes only its own rows."""
    return numba.njit(cache=True, fastmath=FASTMATH, parallel=True)(fn)


def num_threads() -> int:
    return numba.get_num_threads()


def flat(a):
    """A 1-D view of a C-contiguous array. Refuses to copy: a copy would silently drop writes."""
    if not a.flags.c_contiguous:
        raise ValueError("kernel arrays must be C-contiguous")
    return a.reshape(-1)
