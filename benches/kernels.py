#!/usr/bin/env python
"""kernels: the engine's kernels one by one against PyTorch (and numpy.matmul), on the models' shapes.

  attention     kernels.attention forward and forward+backward vs
                torch.nn.functional.scaled_dot_product_attention(is_causal=True) with autograd;
                GPT-2 small (B=4, H=12, D=64; T=256 and 1024) and SmolLM2 (9 query / 3 kv heads)
  gemm          kernels.matmul gemm_nt / gemm_nn / gemm_tn, backend "blas" (the engine's default
                dispatch: OpenBLAS single-threaded, split over the engine's threads) and "numba",
                vs numpy.matmul (OpenBLAS with --threads threads) and torch.matmul, on one training
                step's GEMMs (forward, input gradient, weight gradient; LM head chunk)
  norm          layernorm / rmsnorm forward and forward+backward vs F.layer_norm / F.rms_norm
  loss          fused cross-entropy forward+backward (and forward) vs F.cross_entropy, (1024, 50257)

Every case is checked against PyTorch before it is timed. Timing: per case, `--rounds` rounds; in
a round every contender runs one interval of back-to-back calls (calibrated to --min-time s each)
after --gap s idle (so the previous runtime's spinning threads are parked); reported: ms per call,
median [min-max] over the rounds, the speed ratio reference/engine (> 1: the engine is faster) of
the medians, and the median of the per-round ratios.

    python benches/kernels.py [--only attention,gemm] [--rounds 5] [--json out.json]
    tailtune bench kernels [options]

`run(args)` (args: None, a list of strings, or a Namespace from build_parser()) returns the result.
"""
from __future__ import annotations

import argparse
import statistics
import os
import sys
import time
from pathlib import Path

try:
    from . import common as C
except ImportError:         # run as a script or by `tailtune bench`: benches/ is not a package
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import common as C

NAME = "kernels"
GROUPS = ("attention", "gemm", "norm", "loss")

# (label, B, T, H, Hkv, D)
ATTENTION_CASES = [
    ("gpt2 T=256", 4, 256, 12, 12, 64),
    ("gpt2 T=1024", 4, 1024, 12, 12, 64),
    ("smollm2 T=256", 4, 256, 9, 3, 64),
    ("smollm2 T=1024", 4, 1024, 9, 3, 64),
]


def gemm_cases(model: str) -> list:
    """(label, layout, M, K, N) of one training step's GEMMs, N_tok = 4 x 256 tokens. Layouts:
    nt out = a @ b.T (forward, W (out, in)); nn out = a @ b (input gradient dX = dY @ W);
    tn out = a.T @ b (weight gradient dW = dY.T @ X). The LM head runs on the row chunks a step
    uses (engine.model.head_chunk_rows): 2 x 512 rows when the head is frozen, all 1024 rows at
    once when it trains."""
    from engine.model import head_chunk_rows
    n = 1024
    if model == "gpt2":
        C_, F, V = 768, 3072, 50257
        proj = [("q/k/v/o", C_, C_), ("mlp up", C_, F), ("mlp down", F, C_)]
    else:
        C_, F, V = 576, 1536, 49152
        proj = [("q/o", C_, C_), ("k/v", C_, 192), ("mlp gate/up", C_, F), ("mlp down", F, C_)]
    R, R_dw = head_chunk_rows(n, V, need_dw=False), head_chunk_rows(n, V, need_dw=True)
    out = []
    for name, fin, fout in proj:
        out.append((f"{model} {name} fwd", "nt", n, fin, fout))
    out.append((f"{model} LM head fwd (chunk)", "nt", R, C_, V))
    for name, fin, fout in proj:
        out.append((f"{model} {name} dX", "nn", n, fout, fin))
    out.append((f"{model} LM head dX (chunk)", "nn", R, V, C_))
    for name, fin, fout in proj:
        out.append((f"{model} {name} dW", "tn", fout, n, fin))
    out.append((f"{model} LM head dW (trainable head)", "tn", V, R_dw, C_))
    return out


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(
        prog=C.PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(GROUPS),
                   help="comma-separated groups to run: " + ", ".join(GROUPS))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="seconds per timed interval (calls per interval are calibrated to it)")
    p.add_argument("--gap", type=float, default=0.05,
                   help="idle seconds before each interval")
    p.add_argument("--threads", type=int, default=cores,
                   help="threads for every contender (Numba, torch intra-op, numpy's OpenBLAS)")
    p.add_argument("--gemm-models", default="gpt2",
                   help="whose step shapes the GEMM group uses: gpt2, smollm2 or gpt2,smollm2")
    p.add_argument("--no-numba-gemm", action="store_true",
                   help="skip the Numba GEMM backend (the slowest contender on big shapes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    C.add_output_args(p)
    return p



def rel_err(got, want) -> float:
    """max|got - want| / max|want|: one scale per tensor, as the engine's tests use."""
    import numpy as np
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    return float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))


def check(label: str, errs: dict, tol: float) -> dict:
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AssertionError(f"{NAME}: {label}: engine differs from torch (tol {tol}): "
                             + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
    return {"max_rel_err": errs, "tol": tol}


class Bench:
    """Runs cases: verify, calibrate, alternate, summarize."""

    def __init__(self, args, say):
        self.args, self.say = args, say
        self.cases = []

    def time(self, group, label, contenders: dict, engines, refs: list, verify: dict,
             flops: float | None = None, setup: dict | None = None, calls: dict | None = None,
             extra: dict | None = None):
        """Calibrate, alternate, summarize one case. engines: the engine's contender name(s);
        refs: the references; speed[e][r] = ms of r / ms of e (> 1: engine e is faster)."""
        a = self.args
        engines = [engines] if isinstance(engines, str) else list(engines)
        if calls is None:
            calls = {}
            for name, fn in contenders.items():
                if setup and name in setup:
                    setup[name]()
                calls[name] = C.calibrate(fn, a.min_time)
        times = C.alternate(contenders, a.rounds, calls, a.gap, setup)
        res = {"group": group, "case": label, "engines": engines, "references": refs,
               "verify": verify, "calls_per_interval": calls, "flops": flops,
               "ms": {n: C.summarize([1e3 * t for t in v]) for n, v in times.items()},
               "speed": {e: {r: {"ratio_of_medians": (statistics.median(times[r])
                                                      / statistics.median(times[e])),
                                 "paired": C.paired_ratios(times[r], times[e])} for r in refs}
                         for e in engines}}
        if flops:
            res["gflops"] = {n: flops / (res["ms"][n]["median"] / 1e3) / 1e9 for n in times}
        if extra:
            res.update(extra)
        self.cases.append(res)
        e0 = engines[0]
        sp = ", ".join(f"{r} {res['ms'][r]['median']:.2f} ms ({res['speed'][e0][r]['ratio_of_medians']:.2f}x)"
                       for r in refs)
        self.say(f"{group}: {label}: {e0} {res['ms'][e0]['median']:.2f} ms; {sp}")
        return res


# ---- attention --------------------------------------------------------------------------------
def bench_attention(b: Bench, rng):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from kernels.attention import attention_backward, attention_forward
    for label, B, T, H, Hkv, D in ATTENTION_CASES:
        q = rng.standard_normal((B, T, H, D), dtype=np.float32)
        k = rng.standard_normal((B, T, Hkv, D), dtype=np.float32)
        v = rng.standard_normal((B, T, Hkv, D), dtype=np.float32)
        dout = rng.standard_normal((B, T, H, D), dtype=np.float32)
        out = np.empty_like(q)
        lse = np.empty((B, H, T), np.float32)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        gqa = H != Hkv

        # torch in its own layout (B, heads, T, D), contiguous: what SDPA is fastest on
        def tl(x, grad=False):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).clone().requires_grad_(grad)
        qt, kt, vt = tl(q, True), tl(k, True), tl(v, True)
        dot = tl(dout)

        def e_fwd():
            attention_forward(q, k, v, out, lse, 0)

        def e_fwd_bwd():
            attention_forward(q, k, v, out, lse, 0)
            attention_backward(dout, q, k, v, out, lse, dq, dk, dv)

        def t_fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)

        def t_fwd_bwd():
            qt.grad = kt.grad = vt.grad = None
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
            o.backward(dot)
            return o

        # verify: the engine's (B, T, H, D) results against torch's, transposed back
        e_fwd_bwd()
        o = t_fwd_bwd()

        def back(x):
            return x.detach().numpy().transpose(0, 2, 1, 3)
        errs = {"out": rel_err(out, back(o)), "dq": rel_err(dq, back(qt.grad)),
                "dk": rel_err(dk, back(kt.grad)), "dv": rel_err(dv, back(vt.grad))}
        # lse against log-sum-exp of the scaled, masked scores, from torch in float64
        s = torch.from_numpy(q).double().permute(0, 2, 1, 3) @ \
            torch.from_numpy(k).double().permute(0, 2, 3, 1).repeat_interleave(H // Hkv, 1)
        s = s / D ** 0.5 + torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
        errs["lse"] = rel_err(lse, torch.logsumexp(s, -1).numpy())
        del s
        ver = check(f"attention {label}", errs, 2e-4)
        # model FLOPs: QK^T and PV over T(T+1)/2 pairs; backward is twice that (dQ, dK, dV, dP)
        f = 2.0 * B * H * D * T * (T + 1)
        b.time("attention", f"{label} (B={B}, H={H}/{Hkv}, D={D}) forward",
               {"engine": e_fwd, "torch sdpa": t_fwd}, "engine", ["torch sdpa"], ver, f,
               extra={"shape": {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D}})
        b.time("attention", f"{label} (B={B}, H={H}/{Hkv}, D={D}) fwd+bwd",
               {"engine": e_fwd_bwd, "torch sdpa": t_fwd_bwd}, "engine", ["torch sdpa"], ver, 3 * f,
               extra={"shape": {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D}})


# ---- GEMM -------------------------------------------------------------------------------------
def bench_gemm(b: Bench, rng):
    import numpy as np
    import torch
    from kernels import matmul as km
    a_ = b.args
    n = a_.threads
    models = [m.strip() for m in a_.gemm_models.split(",") if m.strip()]
    for model in models:
        for label, layout, M, K, N in gemm_cases(model):
            if layout == "nt":
                a = rng.standard_normal((M, K), dtype=np.float32)
                w = rng.standard_normal((N, K), dtype=np.float32)
                fn = km.gemm_nt
                def np_op(x, y, o): return np.matmul(x, y.T, out=o)      # noqa: E704
                def t_op(x, y, o): return torch.matmul(x, y.T, out=o)    # noqa: E704
            elif layout == "nn":
                a = rng.standard_normal((M, K), dtype=np.float32)
                w = rng.standard_normal((K, N), dtype=np.float32)
                fn = km.gemm_nn
                def np_op(x, y, o): return np.matmul(x, y, out=o)        # noqa: E704
                def t_op(x, y, o): return torch.matmul(x, y, out=o)      # noqa: E704
            else:
                a = rng.standard_normal((K, M), dtype=np.float32)
                w = rng.standard_normal((K, N), dtype=np.float32)
                fn = km.gemm_tn
                def np_op(x, y, o): return np.matmul(x.T, y, out=o)      # noqa: E704
                def t_op(x, y, o): return torch.matmul(x.T, y, out=o)    # noqa: E704
            outs = {c: np.empty((M, N), np.float32) for c in ("blas", "numba", "numpy", "torch")}
            # torch's operands in torch's own (64-byte aligned) memory: numpy's 16-byte aligned
            # arrays cost torch.mm 1.1-1.5x here, a handicap no torch user has
            at, wt, ot = torch.from_numpy(a).clone(), torch.from_numpy(w).clone(), torch.empty((M, N))
            outs["torch"] = ot.numpy()
            contenders = {
                "engine blas": lambda: fn(a, w, outs["blas"], backend="blas"),
                "engine numba": lambda: fn(a, w, outs["numba"], backend="numba"),
                "numpy.matmul": lambda: np_op(a, w, outs["numpy"]),
                "torch.matmul": lambda: t_op(at, wt, ot),
            }
            if a_.no_numba_gemm:
                del contenders["engine numba"]
            # numpy.matmul gets numpy's OpenBLAS at n threads; the engine's dispatch runs every
            # OpenBLAS single-threaded under its own split (kernels.blas.one_thread)
            setup = {"numpy.matmul": lambda: C.openblas_threads(n),
                     "engine blas": lambda: C.openblas_threads(1),
                     "engine numba": lambda: C.openblas_threads(1),
                     "torch.matmul": lambda: C.openblas_threads(1)}
            for name, f in contenders.items():
                setup[name]()
                f()
            C.openblas_threads(1)
            ref = outs["numpy"].astype(np.float64)
            errs = {name: rel_err(outs[key], ref) for name, key in
                    (("engine blas", "blas"), ("engine numba", "numba"), ("torch.matmul", "torch"))
                    if name in contenders}
            # one float64 product for the scale of float32 rounding at this K
            exact = (a.astype(np.float64).T if layout == "tn" else a.astype(np.float64))[:64] @ (
                w.astype(np.float64).T if layout == "nt" else w.astype(np.float64))
            errs["numpy.matmul (first 64 rows vs float64)"] = rel_err(outs["numpy"][:64], exact)
            ver = check(f"gemm {label}", errs, 1e-4)
            shape = f"{M}x{K}x{N}"
            b.time("gemm", f"{label} {layout} {shape}", contenders,
                   [x for x in ("engine blas", "engine numba") if x in contenders],
                   ["numpy.matmul", "torch.matmul"], ver, 2.0 * M * K * N, setup=setup,
                   extra={"layout": layout, "M": M, "K": K, "N": N})
            del a, w, outs, at, wt, ot
    C.openblas_threads(1)


# ---- norms ------------------------------------------------------------------------------------
def bench_norm(b: Bench, rng):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from kernels.norm import (layernorm_backward, layernorm_forward, rmsnorm_backward,
                              rmsnorm_forward)
    for kind, Cn, eps in (("layernorm", 768, 1e-5), ("rmsnorm", 576, 1e-5)):
        for N in (1024, 4096):
            x = rng.standard_normal((N, Cn), dtype=np.float32) * 3 + 0.5
            w = (1 + 0.1 * rng.standard_normal(Cn, dtype=np.float32)).astype(np.float32)
            bias = (0.1 * rng.standard_normal(Cn, dtype=np.float32)).astype(np.float32)
            dout = rng.standard_normal((N, Cn), dtype=np.float32)
            out = np.empty_like(x)
            mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
            dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros_like(bias)
            xt = torch.from_numpy(x).clone().requires_grad_(True)   # torch's own memory
            wt = torch.from_numpy(w).clone().requires_grad_(True)
            bt = torch.from_numpy(bias).clone().requires_grad_(True)
            dot = torch.from_numpy(dout).clone()
            if kind == "layernorm":
                def e_fwd():
                    layernorm_forward(x, w, bias, out, mean, rstd, eps)

                def e_fwd_bwd():
                    # dx, dw, db accumulate (+=), as in a step where the residual gradient is
                    # already in dx; the values grow over calls, the work does not change
                    layernorm_forward(x, w, bias, out, mean, rstd, eps)
                    layernorm_backward(dout, x, w, mean, rstd, dx, dw, db)

                def t_call():
                    return F.layer_norm(xt, (Cn,), wt, bt, eps)
                tparams = (xt, wt, bt)
            else:
                def e_fwd():
                    rmsnorm_forward(x, w, out, rstd, eps)

                def e_fwd_bwd():
                    rmsnorm_forward(x, w, out, rstd, eps)
                    rmsnorm_backward(dout, x, w, rstd, dx, dw)

                def t_call():
                    return F.rms_norm(xt, (Cn,), wt, eps)
                tparams = (xt, wt)

            def t_fwd():
                with torch.no_grad():
                    return t_call()

            def t_fwd_bwd():
                for p in tparams:
                    p.grad = None
                y = t_call()
                y.backward(dot)
                return y

            e_fwd_bwd()
            y = t_fwd_bwd()
            errs = {"out": rel_err(out, y.detach().numpy()), "dx": rel_err(dx, xt.grad.numpy()),
                    "dw": rel_err(dw, wt.grad.numpy())}
            if kind == "layernorm":
                errs["db"] = rel_err(db, bt.grad.numpy())
            ver = check(f"{kind} N={N}", errs, 1e-4)
            ref = f"torch F.{'layer_norm' if kind == 'layernorm' else 'rms_norm'}"
            b.time("norm", f"{kind} ({N}, {Cn}) forward", {"engine": e_fwd, ref: t_fwd}, "engine",
                   [ref], ver, extra={"N": N, "C": Cn})
            b.time("norm", f"{kind} ({N}, {Cn}) fwd+bwd", {"engine": e_fwd_bwd, ref: t_fwd_bwd},
                   "engine", [ref], ver, extra={"N": N, "C": Cn})


# ---- cross-entropy ----------------------------------------------------------------------------
def bench_loss(b: Bench, rng):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from kernels.loss import crossentropy_forward, crossentropy_forward_backward
    R, V = 1024, 50257
    logits = (rng.standard_normal((R, V), dtype=np.float32) * 2.0).astype(np.float32)
    targets = rng.integers(0, V, R, dtype=np.int64)
    work = np.empty_like(logits)
    losses, lse = np.empty(R, np.float32), np.empty(R, np.float32)
    lt = torch.from_numpy(logits).clone().requires_grad_(True)   # torch's own memory
    tt = torch.from_numpy(targets).clone()

    def e_fwd():
        crossentropy_forward(logits, targets, losses, lse)

    def e_fwd_bwd():   # overwrites `work` (the logits) with their gradient
        crossentropy_forward_backward(work, targets, losses, lse, 1.0 / R)

    def t_fwd():
        with torch.no_grad():
            return F.cross_entropy(lt, tt)

    def t_fwd_bwd():
        loss = F.cross_entropy(lt, tt)
        loss.backward()
        return loss

    def refill():
        np.copyto(work, logits)

    def drop_grad():
        lt.grad = None

    refill()
    e_fwd_bwd()
    drop_grad()
    loss = t_fwd_bwd()
    errs = {"loss (mean)": abs(float(losses.mean(dtype=np.float64)) - loss.item()) / loss.item(),
            "dlogits": rel_err(work, lt.grad.numpy())}
    e_fwd()
    errs["lse"] = rel_err(lse, torch.logsumexp(torch.from_numpy(logits).double(), 1).numpy())
    ver = check(f"cross-entropy ({R}, {V})", errs, 1e-4)
    b.time("loss", f"cross-entropy ({R}, {V}) forward", {"engine": e_fwd, "torch F.cross_entropy": t_fwd},
           "engine", ["torch F.cross_entropy"], ver, extra={"R": R, "V": V})
    # one call per interval: the engine's input must be refilled (untimed) before each call,
    # and torch's gradient dropped (as zero_grad(set_to_none=True) does in a step)
    b.time("loss", f"cross-entropy ({R}, {V}) fwd+bwd", {"engine": e_fwd_bwd,
           "torch F.cross_entropy": t_fwd_bwd}, "engine", ["torch F.cross_entropy"], ver,
           setup={"engine": refill, "torch F.cross_entropy": drop_grad},
           calls={"engine": 1, "torch F.cross_entropy": 1}, extra={"R": R, "V": V})


# ---- the run ----------------------------------------------------------------------------------
def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args, ("torch",))
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise SystemExit(f"kernels: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    imported_early = C.set_thread_env(args.threads)
    # torch first, as in the other workloads: kernels.jit sets OMP_WAIT_POLICY=PASSIVE for
    # Numba's OpenMP pool, and torch's OpenMP reads it when it loads
    omp_wait_at_torch = os.environ.get("OMP_WAIT_POLICY")
    import numpy as np
    import torch  # noqa: F401
    C.ensure_repo_on_path()
    from engine.warmup import ensure_compiled
    ensure_compiled()    # every process runs cached kernels (engine/warmup.py says why)
    import kernels.jit  # noqa: F401
    threads = C.pin_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    b = Bench(args, say)
    for g in groups:
        say(f"{g} ...")
        {"attention": bench_attention, "gemm": bench_gemm, "norm": bench_norm,
         "loss": bench_loss}[g](b, rng)
    result = {
        "workload": NAME,
        "setup": {"groups": groups, "rounds": args.rounds, "min_time_s": args.min_time,
                  "gap_s": args.gap, "threads": args.threads, "seed": args.seed,
                  "gemm_models": args.gemm_models},
        "cases": b.cases,
        "env": {**C.environment(), "threads": C.thread_counts(), "threads_at_start": threads,
                "thread_env_set_before_import": {m: not v for m, v in imported_early.items()},
                "omp_wait_policy_at_torch_import": omp_wait_at_torch,
                "torch_blas": _torch_blas(), "load_average_start": load_start},
        "elapsed_s": time.perf_counter() - t_start,
    }
    return C.finish(args, result, report)


def _torch_blas() -> str | None:
    try:
        import torch
        cfg = torch.__config__.show()
        for line in cfg.splitlines():
            if "BLAS_INFO" in line or "USE_MKL" in line:
                return line.strip()
    except Exception:       # noqa: BLE001
        pass
    return None


def report(r: dict) -> str:
    lines = [f"{NAME}: ms per call, median [min-max] over {r['setup']['rounds']} rounds; "
             "speed = reference ms / engine ms (> 1: the engine is faster), ratio of the medians "
             "(paired: median of the per-round ratios)", ""]
    for g in r["setup"]["groups"]:
        cases = [x for x in r["cases"] if x["group"] == g]
        if g == "gemm":
            lines.append(_gemm_table(cases))
            lines.append("")
            continue
        rows = []
        for c in cases:
            eng = c["engines"][0]
            for i, ref in enumerate(c["references"]):
                sv = c["speed"][eng][ref]
                gf = c.get("gflops")
                rows.append([c["case"] if i == 0 else "",
                             C.fmt_range(c["ms"][eng], "{:.3f}") if i == 0 else "",
                             f"{gf[eng]:.0f}" if gf and i == 0 else ("" if i else "-"),
                             ref, C.fmt_range(c["ms"][ref], "{:.3f}"),
                             f"{gf[ref]:.0f}" if gf else "-",
                             f"{sv['ratio_of_medians']:.2f}x ({sv['paired']['median']:.2f}x)"])
        lines.append(C.table([g, "engine ms", "GFLOP/s", "reference", "ref ms", "GFLOP/s",
                              "speed (paired)"], rows))
        lines.append("")
    env = r["env"]
    lines.append(f"python {env['python']}, numpy {env['numpy']} ({env['numpy_blas'].get('name')} "
                 f"{env['numpy_blas'].get('version')}), numba {env['numba']}, torch {env['torch']}; "
                 f"threads {r['setup']['threads']} (numba {env['threads'].get('numba_threads')}, "
                 f"torch {env['threads'].get('torch_threads')}); {env['cpu']} ({env['cores']} cores, "
                 f"load {(env['load_average_start'] or [float('nan')])[0]:.1f} at start); commit "
                 f"{str(env['git']['commit'])[:10]}; {env['date']}; {r['elapsed_s']:.0f} s")
    return "\n".join(lines)


def _gemm_table(cases) -> str:
    """One row per GEMM: ms and GFLOP/s of every contender, then each engine backend's speed
    against numpy.matmul and torch.matmul."""
    names = ["engine blas", "engine numba", "numpy.matmul", "torch.matmul"]
    rows = []
    for c in cases:
        row = [c["case"]]
        for n in names:
            row.append(f"{c['ms'][n]['median']:.2f} ({c['gflops'][n]:.0f})" if n in c["ms"] else "-")
        for e in ("engine blas", "engine numba"):
            for ref in ("numpy.matmul", "torch.matmul"):
                row.append(f"{c['speed'][e][ref]['ratio_of_medians']:.2f}x" if e in c["speed"] else "-")
        rows.append(row)
    return C.table(["gemm: ms (GFLOP/s), median", "blas", "numba", "numpy", "torch",
                    "blas/np", "blas/torch", "numba/np", "numba/torch"], rows)


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
