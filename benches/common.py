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
  also         reset_peak_rss / malloc_trim (peak RSS of one phase), verify_grads (engine vs
               torch loss and trainable gradients), fit_line (least squares), calibrate /
               alternate / consume (micro-benchmarks), Worker / serve (persistent workers that
               take turns step by step)

The machine is shared and noisy: absolute times move by tens of percent between runs, so
workloads alternate the two sides in one process and report ratios next to medians.
"""
from __future__ import annotations

import argparse

import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the name usage lines show: `tailtune bench` sets it (runpy makes argv[0] the script's path)
PROG = None
WORKER_TAG = "TAILTUNE-BENCH-RESULT "   # prefix of the one stdout line a worker answers with


def ensure_repo_on_path() -> None:
    """Let `python benches/x.py` import engine and kernels from this checkout when the package
    is not installed. The checkout goes first on sys.path, ahead of benches/ (a script's own
    folder is sys.path[0]): otherwise `import kernels` would find benches/kernels.py, the
    benchmark, instead of the kernels package."""
    root = str(REPO)
    while root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    bad = sys.modules.get("kernels")
    if bad is not None and not hasattr(bad, "__path__"):    # the benchmark, imported as "kernels"
        del sys.modules["kernels"]
    # bind the name to the package now: a bench module imported later (gpt2_small's fallback)
    # may put benches/ first again, and the engine imports kernels.* lazily
    import kernels  # noqa: F401


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
    # One OpenMP runtime serves both sides (torch's libgomp, loaded first, is the one Numba's
    # pool then uses): without a passive wait policy its threads spin after every parallel
    # region of either side, which cost the engine 15-25% next to torch. The setting an engine
    # user next to torch needs; applied to both sides alike (torch measured within its noise).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    if "kernels.blas" in sys.modules:
        out["openblas_in_engine"] = openblas_in_engine()
    return out


def _openblas_libs() -> list:
    """[(path, get, set)] of every OpenBLAS mapped into this process, numpy's first. There can be
    several: numba maps scipy's own OpenBLAS (symbols without the 64_ suffix) at its first
    compilation; only numpy's runs numpy.matmul."""
    import numpy as np
    np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)   # make sure numpy's is mapped
    from kernels.blas import openblas_paths   # /proc, else numpy's wheel folder
    paths = openblas_paths()
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


def openblas_in_engine() -> dict:
    """openblas_all() as the engine's own calls see it: it sets every OpenBLAS to one thread
    inside them (kernels.blas.one_thread) and leaves the host's setting alone outside."""
    from kernels.blas import one_thread
    with one_thread():
        return openblas_all()


# ---- timing -----------------------------------------------------------------------------------
def engine_step(model, opt, tokens, targets):
    """The engine's training step as a user writes it; returns the loss."""
    def step():
        model.zero_grad()
        loss = model.forward(tokens, targets)
        model.backward()
        opt.step()
        return loss
    return step


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
    import resource   # Unix only: imported here so the other benches run without it
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
               head_trainable: bool = False, head_rows: int | None = None) -> StepFlops:
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
    head_rows: positions that have a target (default all B T); outputs at the others are no
    model work (they add nothing to the loss), so the head, and the top block after its
    attention, count these rows only (as engine.Model.forward runs them).
    """
    N = B * T
    C, H, Hkv, D, F, V, L = d.d_model, d.n_head, d.n_kv_head, d.head_dim, d.d_ff, d.vocab_size, d.n_layer
    block = [(N, C, H * D), (N, C, Hkv * D), (N, C, Hkv * D), (N, H * D, C)]   # q, k, v, o
    block += [(N, C, F)] * (2 if d.mlp == "swiglu" else 1) + [(N, F, C)]      # (gate,) up, down
    M = N if head_rows is None else head_rows   # rows with a target
    head = (M, C, V)
    attn = 2.0 * B * H * D * T * (T + 1)   # QK^T and PV over T(T+1)/2 pairs each, 2 FLOPs a MAC

    gemms: dict = {}

    def add(shape, times=1):
        M, K, Nn = shape
        gemms[shape] = gemms.get(shape, 0.0) + times * 2.0 * M * K * Nn

    def backward_of(shape):
        M, K, Nn = shape
        add((M, Nn, K))     # dX (M, K) = dY (M, N) @ W (N, K)
        add((Nn, M, K))     # dW (N, K) = dY^T (N, M) @ X (M, K)

    # with fewer target rows the top block also runs its output projection and MLP on those
    # alone (engine.Model.forward): its other rows' outputs are no model work either
    top = block[:3] + [(M, K, Nn) for _, K, Nn in block[3:]] if 0 < M < N else block
    if L > 1:
        for s in block:
            add(s, L - 1)
    for s in top:
        add(s, 1)
    if M:
        add(head)
    fwd_block = sum(2.0 * a * b * c for a, b, c in block) + attn
    fwd_top = sum(2.0 * a * b * c for a, b, c in top) + attn
    fwd_blocks = (L - 1) * fwd_block + fwd_top
    fwd_head = 2.0 * M * C * V
    need_below_head = k > 0 or final_norm_trainable
    bwd_head_dx = fwd_head if need_below_head else 0.0
    bwd_head_dw = fwd_head if head_trainable else 0.0
    if bwd_head_dx and M:
        add((M, V, C))
    if bwd_head_dw and M:
        add((V, M, C))
    for i in range(k):
        for s in (top if i == 0 else block):
            backward_of(s)
    bwd_blocks = 2.0 * (fwd_top + (k - 1) * fwd_block) if k else 0.0
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


def add_tolerance_args(p: argparse.ArgumentParser) -> None:
    """How close the engine's first step must be to torch's before anything is timed."""
    p.add_argument("--loss-tol", type=float, default=1e-4,
                   help="relative tolerance of engine vs torch loss at the verification")
    p.add_argument("--grad-tol", type=float, default=1e-3,
                   help="tolerance of the max over tensors of max|dg| / max|g_torch|")


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no table, no progress lines on stderr")


def footer(r: dict) -> str:
    """The last line of every report: versions, machine, load, commit, date, duration."""
    env = r["env"]
    load = (env.get("load_average_start") or [float("nan")])[0]
    return (f"python {env['python']}, numpy {env['numpy']}, numba {env['numba']}, torch {env['torch']}, "
            f"transformers {env.get('transformers')}; {env['cpu']} ({env['cores']} cores, load {load:.1f} "
            f"at start); commit {str(env['git']['commit'])[:10]}; {env['date']}; {r['elapsed_s']:.0f} s")


REFERENCE = ("torch", "transformers")   # what every workload but `kernels` compares against


def parse_args(parser: argparse.ArgumentParser, args, needs=REFERENCE):
    """A workload's run(args) takes None (defaults), a list of strings, or a parsed Namespace.
    Then the reference libraries it `needs` are checked (after parsing, so --help works without
    them): a user without them gets one line naming what to install, not an ImportError from
    the middle of a run."""
    if args is None or isinstance(args, (list, tuple)):
        args = parser.parse_args(list(args or []))
    require(parser.prog, needs)
    return args


def require(prog: str, needs) -> None:
    import importlib.util
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"{prog}: compares against {', '.join(needs)}; not installed: "
                         f"{', '.join(missing)}. Install the pinned references with "
                         f"pip install -e '.[bench]' (from the source checkout).")


def finish(args, result: dict, report) -> dict:
    """The end of every workload: the table on stdout (unless --quiet), JSON with --json."""
    if not args.quiet:
        print(report(result))
    if args.json:
        write_json(args.json, result)
        if not args.quiet:
            log(f"wrote {args.json}")
    return result


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


# ---- the side-by-side timing of a training step ---------------------------------------------------
def time_alternating(args, config, B: int, T: int, k: int, engine_step, torch_step,
                     losses_e: list, losses_t: list, say, head_rows: int | None = None,
                     flops: "StepFlops | None" = None) -> dict:
    """Warm-up, numpy.matmul's rate on the step's GEMM shapes, `args.repeats` rounds of
    `args.steps` engine steps and as many torch steps, in ABBA order (each step's loss appended
    to losses_e / losses_t), the matmul rate again (the machine drifts), and a cProfile of engine
    steps. flops: the step's FLOP model, when not a decoder's (step_flops of the config)."""
    for i in range(args.warmup):
        say(f"warm-up {i + 1}/{args.warmup}")
        losses_e.append(engine_step())
        losses_t.append(torch_step())
    blas_in_engine_steps = openblas_in_engine()    # before gemm_rates touches the count
    if flops is None:
        flops = step_flops(Dims.from_config(config), B, T, k, head_rows=head_rows)
    shapes = list(flops.gemms)
    say(f"numpy.matmul rate on {len(shapes)} GEMM shapes ({args.threads} threads)")
    rates_before = gemm_rates(shapes, args.threads, args.gemm_repeats)
    e_times, t_times = [], []
    for r in range(args.repeats):
        sides = ((engine_step, losses_e, e_times), (torch_step, losses_t, t_times))
        # ABBA: the order flips every round, so a machine slowing or speeding up through the
        # run favours neither side
        for step, losses, times in sides if r % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                losses.append(step())
            times.append((time.perf_counter() - t0) / args.steps)
        say(f"repeat {r + 1}/{args.repeats}: engine {e_times[-1]:.3f} s/step, "
            f"torch {t_times[-1]:.3f} s/step")
    rates_after = gemm_rates(shapes, args.threads, args.gemm_repeats, seed=1)
    rates = {s: rates_before[s] + rates_after[s] for s in shapes}
    prof = None
    if args.profile_steps > 0:
        say(f"cProfile of {args.profile_steps} engine step(s)")
        prof = profile_top(engine_step, args.profile_steps, top=15)
    return {"blas_in_engine_steps": blas_in_engine_steps, "flops": flops, "shapes": shapes,
            "rates_before": rates_before, "rates_after": rates_after, "rates": rates,
            "gemm_eff": effective_rate(flops, rates), "e_times": e_times, "t_times": t_times,
            "prof": prof}


def timing_fields(tm: dict, eng: dict, tor: dict) -> dict:
    """The result's ratio, FLOP and matmul-rate entries from time_alternating()'s answer and
    the two sides' summaries."""
    flops, rates = tm["flops"], tm["rates"]
    return {"ratio_engine_over_torch": {"tokens_per_s": eng["tokens_per_s"]["median"]
                                        / tor["tokens_per_s"]["median"],
                                        "paired": paired_ratios(tm["t_times"], tm["e_times"])},
            "flops": {**flops.to_json(), "model": "see benches/README.md"},
            "matmul": {"what": "numpy.matmul fp32 (M,K)@(K,N), OpenBLAS threads = threads",
                       "effective_gflops": tm["gemm_eff"],
                       "effective_gflops_before": effective_rate(flops, tm["rates_before"]),
                       "effective_gflops_after": effective_rate(flops, tm["rates_after"]),
                       "per_shape": [{"shape": list(s), "gflops": summarize(rates[s])}
                                     for s in tm["shapes"]]}}


# ---- worker subprocesses ----------------------------------------------------------------------
def measure_worker(side: str, step, worker_steps: int, t_import: float, t_load: float) -> dict:
    """A worker's steps after its load (one warm-up, then worker_steps): times, losses, RSS
    after the load, peak RSS of the load and of the steps alone (the peak reset between them
    where the kernel allows it). Emits the result on stdout and returns it."""
    import gc
    gc.collect()
    malloc_trim()
    rss_load, peak_load, reset = rss_mib(), peak_rss_mib(), reset_peak_rss()
    times, losses = [], []
    for _ in range(1 + worker_steps):
        t, loss = timed(step)
        times.append(t)
        losses.append(float(loss))
    peak_steps = peak_rss_mib()
    res = {"side": side, "import_s": t_import, "load_s": t_load, "step_s": times,
           "losses": losses, "rss_after_load_mib": rss_load, "peak_rss_load_mib": peak_load,
           "peak_rss_steps_mib": peak_steps if reset else None,
           "peak_rss_mib": max(peak_load, peak_steps), "ru_maxrss_mib": ru_maxrss_mib(),
           "threads": thread_counts(), "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR")}
    emit(res)
    return res


def batch_worker_argv(script: str, args, side: str, batch_file: str) -> list:
    """The command line of a worker of `script` that reads its batch from batch_file."""
    return [Path(script).resolve(), "--worker", side, "--threads", args.threads,
            "--train-last", args.train_last, "--lr", args.lr, "--batch-file", batch_file,
            "--worker-steps", args.worker_steps]


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


def ratio_and_flops_lines(r: dict) -> list:
    """Report lines shared by the step workloads: the tokens/s ratio, the FLOP model of the step
    and the MFU denominator."""
    ratio, p = r["ratio_engine_over_torch"], r["ratio_engine_over_torch"]["paired"]
    f, m = r["flops"]["parts"], r["matmul"]
    return [
        f"engine/torch tokens/s: {ratio['tokens_per_s']:.2f}x (per-repeat pairs: median "
        f"{p['median']:.2f}x, {p['min']:.2f}-{p['max']:.2f})",
        "",
        f"model FLOPs/step {fmt_si(r['flops']['total'], 'FLOP')}: forward blocks "
        f"{f['forward_blocks'] / 1e9:.1f} G + head {f['forward_head'] / 1e9:.1f} G, backward head dX "
        f"{f['backward_head_dx'] / 1e9:.1f} G + last {r['setup']['train_last']} blocks "
        f"{f['backward_blocks'] / 1e9:.1f} G",
        f"MFU denominator: numpy.matmul fp32 on the step's {len(m['per_shape'])} GEMM shapes, "
        f"{m['effective_gflops']:.0f} GFLOP/s (before {m['effective_gflops_before']:.0f}, after "
        f"{m['effective_gflops_after']:.0f})",
    ]


def profile_lines(pr: dict, cumulative: bool = True) -> list:
    """A profile_top() result as tables: by own time, and (cumulative) the engine's and
    kernels' functions by cumulative time."""
    def rows(xs):
        return [[x["function"], x["ncalls"], f"{x['tottime']:.3f}", f"{x['cumtime']:.3f}"] for x in xs]
    head = ["function", "calls", "own s", "cum s"]
    out = ["", f"engine cProfile ({pr['calls']} step(s), {pr['wall_s']:.2f} s, main thread; top by own time):",
           table(head, rows(pr["by_tottime"][:10]))]
    if cumulative:
        mine = [x for x in pr["by_cumtime"] if x["function"].startswith(("engine/", "kernels/"))]
        out += ["top by cumulative time (engine and kernels):", table(head, rows(mine[:10]))]
    return out


def cold_start(cold: dict, warm: dict) -> dict:
    """Two engine workers' results, on an empty and on a warm Numba cache. The engine compiles
    when the first Model is built (inside the load, in a child process) and may finish lazily
    at the first step, so compile time is the difference of both."""
    steady = min(cold["step_s"][1:])
    return {"first_step_s": cold["step_s"][0], "steady_step_s": steady,
            "compile_s": (cold["load_s"] - warm["load_s"]) + (cold["step_s"][0] - steady),
            "warm_cache_first_step_s": warm["step_s"][0], "import_s": cold["import_s"],
            "load_s": cold["load_s"], "warm_load_s": warm["load_s"], "peak_rss_mib": cold["peak_rss_mib"],
            # a new process on a warm cache: its time before the first step beyond the model load
            # and a steady step's own cost
            "warm_start_overhead_s": warm["import_s"] + warm["step_s"][0] - min(warm["step_s"][1:])}


def cold_start_line(c: dict) -> str:
    return (f"cold start (empty Numba cache, subprocess): load {c['load_s']:.1f} s vs {c['warm_load_s']:.1f} s "
            f"warm, first step {c['first_step_s']:.1f} s vs steady {c['steady_step_s']:.1f} s -> "
            f"~{c['compile_s']:.0f} s compiling (peak RSS {c['peak_rss_mib']:.0f} MiB); warm cache: import + "
            f"first-step overhead {c['warm_start_overhead_s']:.1f} s beyond the model load")


def fmt_gflops(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


# ---- added for smollm2 / freeze-sweep / kernels -----------------------------------------------
def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: "5" into
    /proc/self/clear_refs), so that a later peak_rss_mib() is the peak of what ran in between
    (on top of what was resident at the reset). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Hand freed heap memory back to the OS (glibc malloc_trim(0)): without it, memory freed by
    one phase can stay resident and count in the next phase's RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _torch_grads_in_engine_names(model, hf, label):
    import numpy as np
    from engine.io import hf_names
    sd = dict(hf.named_parameters())
    grads = {}
    for n, p in sd.items():
        if p.requires_grad:
            if p.grad is None:
                raise AssertionError(f"{label}: torch has no gradient for trainable {n}")
            grads[n] = p.grad.detach().numpy()
        else:
            if p.grad is not None:
                raise AssertionError(f"{label}: torch computed a gradient for frozen {n}")
            grads[n] = np.broadcast_to(np.float32(0.0), tuple(p.shape))
    n_torch = sum(p.numel() for p in sd.values() if p.requires_grad)
    return hf_names.to_engine(model.config, lambda n: grads[n], list(sd)), n_torch


def verify_grads(model, hf, e_loss: float, t_loss: float, loss_tol: float, grad_tol: float,
                 label: str, hf64=None, loss64: float | None = None) -> dict:
    """Engine vs torch after one forward + backward on the same weights and batch: the loss, and
    every trainable gradient mapped to engine names through engine.io.hf_names.to_engine (GPT-2's
    Conv1D layouts and fused c_attn, llama's names). The error of a tensor is
    max|g - g_ref| / max(max|g_ref|, 1e-3 * the largest reference gradient of any tensor): the
    floor is for tensors whose exact gradient is 0 (GPT-2's attn.k.bias: softmax ignores a
    per-query constant), where both sides hold rounding noise.

    Without hf64: the reference is torch (float32); pass when the loss is within loss_tol
    (relative) and every tensor's error within grad_tol.
    With hf64 (the same torch model in float64, after its own forward + backward, loss loss64):
    both float32 sides are measured against it, and the engine passes when its largest error is
    within max(grad_tol, 2 x torch's largest), and its loss error within max(loss_tol, 2 x
    torch's) -- "as close to exact as PyTorch's own float32". For deep pretrained models the
    two float32 sides differ by their rounding through every frozen block below, more than a
    fixed tolerance allows (SmolLM2: 7e-3 on a norm weight), and float64 tells which side it is.

    Raises AssertionError with the figures when a check fails; returns them otherwise."""
    import numpy as np
    t32, n_torch = _torch_grads_in_engine_names(model, hf, label)
    trainable = model.trainable
    n_engine = model.num_params(trainable_only=True)
    if n_torch != n_engine:
        raise AssertionError(f"{label}: trainable parameters differ: engine {n_engine}, torch {n_torch}")

    def errors(ref, got):
        top = max(float(np.abs(ref[n]).max()) for n in trainable)
        out = {}
        for n in trainable:
            r = np.asarray(ref[n], np.float64)
            scale = max(float(np.abs(r).max()), 1e-3 * top)
            out[n] = float(np.abs(np.asarray(got[n], np.float64) - r).max()) / scale
        return out

    errs = errors(t32, model.grads)
    worst = max(errs, key=errs.get)
    loss_rel = abs(e_loss - t_loss) / abs(t_loss)
    out = {"loss_engine": e_loss, "loss_torch": t_loss, "loss_rel_err": loss_rel,
           "grad_max_rel_err": errs[worst], "grad_worst_tensor": worst,
           "grad_tensors": len(trainable), "trainable_params": n_engine,
           "loss_tol": loss_tol, "grad_tol": grad_tol,
           "grad_rel_err": dict(sorted(errs.items(), key=lambda kv: -kv[1]))}
    if hf64 is None:
        if not loss_rel <= loss_tol:
            raise AssertionError(f"{label}: engine loss {e_loss!r} != torch loss {t_loss!r} "
                                 f"(rel {loss_rel:.3g} > {loss_tol})")
        if not errs[worst] <= grad_tol:
            bad = [f"{n}: {e:.3g}" for n, e in errs.items() if not e <= grad_tol]
            raise AssertionError(f"{label}: gradients differ from torch (tol {grad_tol}): "
                                 + ", ".join(bad[:10]))
        out["reference"] = "torch float32"
        return out
    t64, _ = _torch_grads_in_engine_names(model, hf64, label)
    e64, tt64 = errors(t64, model.grads), errors(t64, t32)
    we, wt = max(e64, key=e64.get), max(tt64, key=tt64.get)
    le, lt = abs(e_loss - loss64) / abs(loss64), abs(t_loss - loss64) / abs(loss64)
    grad_limit = max(grad_tol, 2 * tt64[wt])
    loss_limit = max(loss_tol, 2 * lt)
    out.update({"reference": "torch float64", "loss_float64": loss64,
                "loss_rel_err_vs_f64": {"engine": le, "torch": lt, "limit": loss_limit},
                "grad_max_rel_err_vs_f64": {"engine": e64[we], "engine_worst_tensor": we,
                                            "torch": tt64[wt], "torch_worst_tensor": wt,
                                            "limit": grad_limit},
                "grad_rel_err_vs_f64": {n: {"engine": e64[n], "torch": tt64[n]} for n in
                                        sorted(e64, key=lambda n: -e64[n])}})
    if not le <= loss_limit:
        raise AssertionError(f"{label}: engine loss {e_loss!r} vs float64 {loss64!r}: rel {le:.3g} "
                             f"> {loss_limit:.3g} (torch float32: {lt:.3g})")
    if not e64[we] <= grad_limit:
        bad = [f"{n}: {e:.3g} (torch {tt64[n]:.3g})" for n, e in e64.items() if not e <= grad_limit]
        raise AssertionError(f"{label}: gradients further from float64 than torch's float32 "
                             f"(limit {grad_limit:.3g}): " + ", ".join(bad[:10]))
    return out


def fit_line(x, y) -> dict:
    """Least squares y = intercept + slope * x; R^2 = 1 - SS_res / SS_tot."""
    n = len(x)
    if n < 2:
        return {"slope": None, "intercept": None, "r2": None, "n": n}
    mx = sum(x) / n
    my = sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    return {"slope": slope, "intercept": intercept,
            "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0, "n": n}


def consume(x) -> float:
    """One float read from a result, so no benchmarked call can be skipped as unused."""
    import numpy as np
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "reshape") and getattr(x, "size", getattr(x, "numel", lambda: 1)) != 0:
        return float(x.reshape(-1)[0])
    return float(np.asarray(x).reshape(-1)[0])


def calibrate(fn, min_s: float = 0.05, max_calls: int = 1000) -> int:
    """Calls of fn() per timed interval so that one interval lasts about min_s (the clock and the
    Python call overhead then stay well under 1% of it). fn() has run at least twice after."""
    fn()
    t, _ = timed(fn)
    if t <= 0:
        return max_calls
    return int(max(1, min(max_calls, math.ceil(min_s / t))))


def alternate(contenders: dict, rounds: int, calls: dict, gap_s: float = 0.0,
              setup: dict | None = None) -> dict:
    """Time each contender (name -> fn) in turn, `rounds` times: per round, for each contender,
    an optional untimed setup[name]() and then calls[name] back-to-back calls timed as one
    interval. Returns name -> list of seconds per call, one per round. gap_s: idle seconds before
    each interval, so that the previous contender's runtime (OpenBLAS, OpenMP) has parked its
    spinning threads and does not steal cores from the next one."""
    out = {n: [] for n in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:   # ABBA: drift favours no one
            fn = contenders[name]
            n = calls[name]
            if setup and name in setup:
                setup[name]()
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) / n)
    return out


class Worker:
    """A persistent worker subprocess driven by one JSON request per line on its stdin; it
    answers each with one WORKER_TAG-prefixed JSON line on stdout (see serve()). Lets two
    processes (one per side, so each has its own peak RSS) take turns step by step: the one
    not working is blocked reading its stdin."""

    def __init__(self, argv, env: dict | None = None):
        self.argv = [sys.executable, *map(str, argv)]
        self.p = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=str(REPO),
                                  env=dict(os.environ if env is None else env), bufsize=1)
        self._stderr = []
        import threading
        # drain stderr in the background: a full pipe would block the worker
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        for line in self.p.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def send(self, **req) -> None:
        """Send a request without waiting (several workers can then work at once)."""
        self._last = req
        try:
            self.p.stdin.write(json.dumps(req) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass

    def receive(self) -> dict:
        """The answer to the last request; raises with the worker's stderr if it died or failed."""
        req = getattr(self, "_last", None)
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.p.wait(timeout=30)
                tail = "".join(self._stderr[-30:])
                raise RuntimeError(f"worker {' '.join(self.argv[1:])} died (exit "
                                   f"{self.p.returncode}) on {req}:\n{tail}")
            if line.startswith(WORKER_TAG):
                reply = json.loads(line[len(WORKER_TAG):])
                if "error" in reply:
                    raise RuntimeError(f"worker {' '.join(self.argv[1:])} failed on {req}: "
                                       f"{reply['error']}")
                return reply

    def request(self, **req) -> dict:
        self.send(**req)
        return self.receive()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.p.kill()
                self.p.wait()


def serve(handler) -> None:
    """The worker side of Worker: handler(request dict) -> reply dict, one per stdin line, until
    {"cmd": "exit"} or EOF. An exception becomes {"error": ...} (and the worker goes on)."""
    import traceback
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("cmd") == "exit":
            break
        try:
            reply = handler(req)
        except Exception:       # noqa: BLE001 -- reported to the driver, which raises
            reply = {"error": traceback.format_exc()}
        emit(reply)
