"""Shared helpers for the side-by-side benchmarks (gpt2-small, smollm2, freeze-sweep, kernels).

What every workload needs, in one place:
  threads      set_thread_env (before numba / torch are imported) and pin_threads (after);
               openblas_threads to read or set OpenBLAS's pool size through its C API
  timing       timed, summarize (median and min-max), paired_ratios
  memory       peak_rss_mib (ru_maxrss), rss_mib (now), measured in worker subprocesses so
               each side's peak is its own
  FLOPs        Dims, step_flops: the model-FLOP count of one tail-k training step, with the
               step's GEMM shapes; gemm_rates / effective_rate: numpy.matmul fp32 FLOP/s on
               exactly those shapes, the denominator of MFU
  records      environment (library versions, CPU, threads, git commit), write_json, table,
               profile_top (cProfile of a callable), worker plumbing (run_worker / emit)

The machine is shared and noisy: absolute times move by tens of percent between runs, so
workloads alternate the two sides in one process and report ratios next to medians.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER_TAG = "TAILTUNE-BENCH-RESULT "   # prefix of the one stdout line a worker answers with


def ensure_repo_on_path() -> None:
    """Let `python benches/x.py` import engine and kernels from this checkout when the package
    is not installed."""
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)


def quiet_hf() -> None:
    """No progress bars, no network, no advisory warnings from transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- threads ----------------------------------------------------------------------------------
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS",
               "MKL_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR")


def thread_env() -> dict:
    return {k: os.environ.get(k) for k in THREAD_VARS}


def set_thread_env(n: int) -> dict:
    """Set OMP_NUM_THREADS and NUMBA_NUM_THREADS to n. Both are read when the runtime starts, so
    this must run before numba / torch are imported; returns which were already imported (for
    those only pin_threads counts)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["NUMBA_NUM_THREADS"] = str(n)
    return {m: m in sys.modules for m in ("numba", "torch")}


def pin_threads(n: int, torch: bool = True, numba: bool = True) -> dict:
    """Same thread count for both sides: Numba's pool (the engine's parallel kernels and its GEMM
    row split) and torch's intra-op pool. Returns the effective counts."""
    if numba:
        import numba as nb
        nb.set_num_threads(n)
    if torch:
        import torch as th
        th.set_num_threads(n)
    return thread_counts()


def thread_counts() -> dict:
    out = {"env": thread_env(), "cores": os.cpu_count(),
           "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    if "numba" in sys.modules:
        import numba as nb
        out["numba_threads"] = nb.get_num_threads()
        try:
            out["numba_threading_layer"] = nb.threading_layer()
        except ValueError:                  # no parallel kernel has run yet
            out["numba_threading_layer"] = None
    if "torch" in sys.modules:
        import torch as th
        out["torch_threads"] = th.get_num_threads()
        out["torch_interop_threads"] = th.get_num_interop_threads()
    out["openblas_threads"] = openblas_threads()      # numpy's
    out["openblas_all"] = openblas_all()
    return out


def _openblas_libs() -> list:
    """[(path, get, set)] of every OpenBLAS mapped into this process, numpy's first. There can be
    several: numba maps scipy's own OpenBLAS (symbols without the 64_ suffix) at its first
    compilation; only numpy's runs numpy.matmul."""
    import numpy as np
    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)   # make sure numpy's is mapped
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower()}
    except OSError:
        return []
    out = []
    for path in sorted(paths, key=lambda p: ("numpy" not in Path(p).parent.name, p)):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            get = put = None
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    break
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                out.append((path, get, put))
                break
    return out


def openblas_threads(n: int | None = None) -> int | None:
    """Thread count of numpy's OpenBLAS; with n, set it first. None when it is not found."""
    libs = _openblas_libs()
    if not libs:
        return None
    _, get, put = libs[0]
    if n is not None:
        put(int(n))
    return int(get())


def openblas_all() -> dict:
    """Thread count of every loaded OpenBLAS (file name -> threads)."""
    return {Path(p).name: int(get()) for p, get, _ in _openblas_libs()}


# ---- timing -----------------------------------------------------------------------------------
def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return time.perf_counter() - t0, r


def summarize(values) -> dict:
    """Median and min-max of a list of numbers (the values kept for the JSON)."""
    v = [float(x) for x in values]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v}


def paired_ratios(a, b) -> dict:
    """Summary of a[i] / b[i]: each pair was measured back to back, so slow phases of the shared
    machine hit both terms of a ratio alike."""
    return summarize([x / y for x, y in zip(a, b)])


# ---- memory -----------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process: VmHWM, the high-water mark of this process's own
    address space. Not ru_maxrss where VmHWM exists: on Linux a child started by fork/vfork +
    exec inherits the parent's peak in ru_maxrss (the kernel folds the pre-exec address space's
    high-water mark into it), so a worker subprocess of a 3 GB benchmark reports 3 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return ru_maxrss_mib()


def ru_maxrss_mib() -> float:
    """getrusage(RUSAGE_SELF).ru_maxrss in MiB (KiB on Linux, bytes on macOS)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2 ** 20


def rss_mib() -> float:
    """Resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


# ---- model FLOPs ------------------------------------------------------------------------------
@dataclass
class Dims:
    """The shapes that decide a decoder-only transformer's FLOPs."""
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int
    vocab_size: int
    mlp: str = "gelu"           # "gelu": up, down; "swiglu": gate, up, down

    @classmethod
    def from_config(cls, c) -> "Dims":
        """From an engine.Config."""
        return cls(c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size,
                   c.mlp)


@dataclass
class StepFlops:
    total: float                                  # model FLOPs of one step
    parts: dict                                   # name -> FLOPs (the terms of the sum)
    gemms: dict = field(default_factory=dict)     # (M, K, N) -> FLOPs spent on that GEMM shape
    attention: float = 0.0                        # causal attention products (not a plain GEMM)

    def to_json(self) -> dict:
        return {"total": self.total, "parts": self.parts, "attention": self.attention,
                "gemms": [{"shape": list(s), "flops": f} for s, f in self.gemms.items()]}


def step_flops(d: Dims, B: int, T: int, k: int, final_norm_trainable: bool = True,
               head_trainable: bool = False) -> StepFlops:
    """Model FLOPs of one training step of a tail-k model (see benches/README.md, "FLOP model").

    Counted: matmuls only, one multiply-add = 2 FLOPs; causal attention counts the T(T+1)/2
    unmasked query-key pairs; recomputation (flash attention's backward) is not model work and
    is not counted. Not counted: norms, activations, softmax, residual adds, embedding lookups,
    the optimizer (all O(B T C) or O(params), well under 1% here).
      forward    every block + the LM head (frozen blocks must run forward too)
      backward   the head's input gradient when anything below the head is trainable; the head's
                 weight gradient only when the head weight is trainable; the last k blocks at
                 2x their forward (an input- and a weight-gradient product per matmul; dQ, dK,
                 dV, dP in attention); nothing for the frozen blocks below.
    Inside the lowest trainable block, q/k/v's input gradient is still needed (ln1 is
    trainable), so 2x is exact for train_last(k); only the O(B T C) layernorm dX is skipped.
    """
    N = B * T
    C, H, Hkv, D, F, V, L = d.d_model, d.n_head, d.n_kv_head, d.head_dim, d.d_ff, d.vocab_size, d.n_layer
    block = [(N, C, H * D), (N, C, Hkv * D), (N, C, Hkv * D), (N, H * D, C)]   # q, k, v, o
    block += [(N, C, F)] * (2 if d.mlp == "swiglu" else 1) + [(N, F, C)]      # (gate,) up, down
    head = (N, C, V)
    attn = 2.0 * B * H * D * T * (T + 1)   # QK^T and PV over T(T+1)/2 pairs each, 2 FLOPs a MAC

    gemms: dict = {}

    def add(shape, times=1):
        M, K, Nn = shape
        gemms[shape] = gemms.get(shape, 0.0) + times * 2.0 * M * K * Nn

    def backward_of(shape):
        M, K, Nn = shape
        add((M, Nn, K))     # dX (M, K) = dY (M, N) @ W (N, K)
        add((Nn, M, K))     # dW (N, K) = dY^T (N, M) @ X (M, K)

    for s in block:
        add(s, L)
    add(head)
    fwd_blocks = L * (sum(2.0 * a * b * c for a, b, c in block) + attn)
    fwd_head = 2.0 * N * C * V
    need_below_head = k > 0 or final_norm_trainable
    bwd_head_dx = fwd_head if need_below_head else 0.0
    bwd_head_dw = fwd_head if head_trainable else 0.0
    if bwd_head_dx:
        add((N, V, C))
    if bwd_head_dw:
        add((V, N, C))
    for _ in range(k):
        for s in block:
            backward_of(s)
    bwd_blocks = 2.0 * k * (fwd_blocks / L)
    parts = {"forward_blocks": fwd_blocks, "forward_head": fwd_head,
             "backward_head_dx": bwd_head_dx, "backward_head_dw": bwd_head_dw,
             "backward_blocks": bwd_blocks}
    total = sum(parts.values())
    return StepFlops(total, parts, gemms, attention=attn * (L + 2 * k))


# ---- numpy.matmul throughput (the MFU denominator) --------------------------------------------
def gemm_rates(shapes, threads: int, repeats: int = 3, seed: int = 0) -> dict:
    """GFLOP/s of numpy.matmul (OpenBLAS, fp32, `threads` threads) per (M, K, N) shape:
    (M, K) @ (K, N), contiguous, into a preallocated output; one untimed call per shape first.
    Returns shape -> list of GFLOP/s. OpenBLAS's thread count is restored afterwards (the engine
    runs OpenBLAS single-threaded and splits GEMMs over its own threads)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    before = openblas_threads()
    out = {}
    try:
        openblas_threads(threads)
        for M, K, N in shapes:
            a = rng.standard_normal((M, K), dtype=np.float32)
            b = rng.standard_normal((K, N), dtype=np.float32)
            c = np.empty((M, N), np.float32)
            np.matmul(a, b, out=c)
            rates = []
            for _ in range(repeats):
                t, _ = timed(np.matmul, a, b, out=c)
                rates.append(2.0 * M * K * N / t / 1e9)
            if not np.isfinite(c[0, 0]):    # consume the result
                raise RuntimeError("matmul produced a non-finite value")
            out[(M, K, N)] = rates
            del a, b, c
    finally:
        if before is not None:
            openblas_threads(before)
    return out


def effective_rate(flops: StepFlops, rates: dict) -> float:
    """GFLOP/s at which numpy.matmul would run this step's GEMM mix: sum of FLOPs over the sum
    of per-shape times at the per-shape median rate. Attention FLOPs are charged at the rate of
    the q projection's shape (the nearest plain GEMM)."""
    med = {s: statistics.median(r) for s, r in rates.items()}
    tot = 0.0
    sec = 0.0
    for s, f in flops.gemms.items():
        tot += f
        sec += f / (med[s] * 1e9)
    if flops.attention:
        q = next(iter(flops.gemms))
        tot += flops.attention
        sec += flops.attention / (med[q] * 1e9)
    return tot / sec / 1e9


# ---- records ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The SIMD flags that matter for fp32 GEMM speed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                            if x in have]
    except OSError:
        pass
    return []


def git_commit() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty_files": len([ln for ln in git("status", "--porcelain").splitlines()
                                    if ln and not ln.startswith("??")])}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_files": None}


def _version(mod):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:       # noqa: BLE001 -- a missing or broken library is recorded, not fatal
        return None


def blas_info() -> dict:
    try:
        import numpy as np
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {"name": cfg.get("name"), "version": cfg.get("version")}
    except Exception:       # noqa: BLE001
        return {}


def environment(libs=("numpy", "numba", "torch", "transformers")) -> dict:
    """Versions, CPU, thread settings, date and commit: what a figure needs to be re-read later."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **{lib: _version(lib) for lib in libs},
        "numpy_blas": blas_info(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": thread_counts(),
        "git": git_commit(),
        "platform": platform.platform(),
    }


def write_json(path, obj) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o):
    if hasattr(o, "item"):                  # numpy scalars
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def table(headers, rows) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r):
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])


def fmt_range(s: dict, fmt: str = "{:.1f}") -> str:
    """'median [min-max]' of a summarize() dict."""
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def fmt_si(x: float, unit: str = "") -> str:
    for p, name in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.1f} {name}{unit}"
    return f"{x:.1f} {unit}"


def log(msg: str) -> None:
    """Progress to stderr, so stdout stays the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- cProfile ---------------------------------------------------------------------------------
def profile_top(fn, calls: int = 1, top: int = 15) -> dict:
    """cProfile of `calls` calls of fn(): the top functions by own time and by cumulative time.
    cProfile sees the calling thread only: work that thread hands to a pool shows up as the
    wait (lock acquire) on its result."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _callers) in st.stats.items():
        where = name if file == "~" else f"{_short(file)}:{line}({name})"
        rows.append({"function": where, "ncalls": nc, "tottime": tt, "cumtime": ct})
    by_tot = sorted(rows, key=lambda r: -r["tottime"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime"])[:top]
    return {"calls": calls, "wall_s": wall, "by_tottime": by_tot, "by_cumtime": by_cum}


def _short(file: str) -> str:
    p = Path(file)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        parts = p.parts
        return "/".join(parts[-2:]) if len(parts) >= 2 else file


# ---- worker subprocesses ----------------------------------------------------------------------
def emit(result: dict) -> None:
    """A worker's answer: one tagged JSON line on stdout."""
    sys.stdout.write(WORKER_TAG + json.dumps(result, default=_json_default) + "\n")
    sys.stdout.flush()


def run_worker(argv, env: dict | None = None, timeout: float = 900) -> dict:
    """Run `python argv...` and return the JSON it emit()s; fail loudly with its stderr."""
    full_env = dict(os.environ if env is None else env)
    p = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=str(REPO))
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(WORKER_TAG):
            return json.loads(line[len(WORKER_TAG):])
    tail = "\n".join((p.stderr or "").splitlines()[-30:])
    raise RuntimeError(f"worker {' '.join(map(str, argv))} failed (exit {p.returncode}):\n{tail}")


def fmt_gflops(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"
