"""The OpenMP wait policy, set before any library loads OpenMP. No heavy imports here, so that
`import engine` runs it first at no cost.

Numba's OpenMP workers would otherwise spin after every parallel kernel and steal the cores
from the GEMM that follows (measured: a GEMM + layernorm pair 9 ms instead of 0.8 ms). libgomp
reads the policy once, when it is loaded. If another library (torch) loaded it earlier without
the policy, Numba shares that runtime and its spinning threads (measured: steps 15-25% slower
next to torch); that cannot be changed afterwards, so it is said.
"""
import os
import sys


def _openmp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


# Only where Numba can pick OpenMP: its workqueue and TBB layers start no OpenMP threads.
_NOT_OMP = ("workqueue", "tbb", "safe")
LATE = (os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
        and os.environ.get("NUMBA_THREADING_LAYER", "").lower() not in _NOT_OMP
        and _openmp_loaded())
if LATE:   # printed, like the compile notice: other libraries' warning filters can hide warnings
    print("tailtune: an OpenMP runtime (torch's?) was loaded before tailtune without "
          "OMP_WAIT_POLICY=PASSIVE; its spinning threads slow tailtune's steps by 15-25% in this "
          "process. Import engine first, or set OMP_WAIT_POLICY=PASSIVE before Python starts.",
          file=sys.stderr, flush=True)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
