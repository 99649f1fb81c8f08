#!/usr/bin/env python
"""gpt2-small: one tail fine-tuning step of GPT-2 124M shapes, tailtune vs PyTorch, side by side.

Both sides train the same random-init weights (a transformers GPT2LMHeadModel saved with
save_pretrained and read back by engine.load) on the same batch, with the last k blocks and the
final norm trainable (the tied embedding / LM head frozen), AdamW over the trainable parameters.
One step = zero_grad, forward with loss, backward, optimizer step.

Order of a run:
  1. verify: first step on both sides; loss and every trainable gradient must agree (fails loudly)
  2. warm-up steps (untimed), numpy.matmul rate on the step's GEMM shapes
  3. R repeats of N engine steps and N torch steps (ABBA order), each timed as one interval
  4. numpy.matmul rate again, cProfile of engine steps
  5. worker subprocesses: peak RSS of each side alone; engine cold start with an empty Numba cache
  6. a table on stdout, JSON with --json

    python benches/gpt2_small.py [--steps N] [--repeats R] [--json out.json]

`run(args)` does the same for `tailtune bench gpt2-small` (args: None, a list of strings, or a
Namespace from build_parser()) and returns the result dict.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    from . import common as C
except ImportError:         # run as a script: benches/ is not a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common as C

NAME = "gpt2-small"
GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(
        prog=C.PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1,
                   help="training steps per timed repeat (per side)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; each runs the engine's steps and torch's, in turn first (ABBA)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per side after the verification step")
    p.add_argument("--threads", type=int, default=cores,
                   help="threads for both sides (Numba and torch intra-op)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--train-last", type=int, default=2,
                   help="trainable blocks at the top (plus the final norm)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batch")
    C.add_tolerance_args(p)
    p.add_argument("--gemm-repeats", type=int, default=3,
                   help="timed numpy.matmul calls per GEMM shape, before and after the steps")
    p.add_argument("--profile-steps", type=int, default=1,
                   help="engine steps run under cProfile after the timing (0: none)")
    p.add_argument("--worker-steps", type=int, default=3,
                   help="steps after one warm-up step in each memory worker subprocess (the "
                        "'alone' tokens/s is their median)")
    p.add_argument("--no-workers", action="store_true",
                   help="skip the subprocesses (peak RSS per side, cold start)")
    p.add_argument("--no-cold", action="store_true",
                   help="skip the cold-start subprocess (empty Numba cache; compiles everything)")
    C.add_output_args(p)
    p.add_argument("--worker", choices=("engine", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p



def make_batch(vocab: int, B: int, T: int, seed: int):
    """tokens (B, T) and targets (B, T) with the engine's convention: targets[:, t] is the token
    after tokens[:, t] (one random (B, T + 1) sequence, shifted)."""
    import numpy as np
    ids = np.random.default_rng(seed).integers(0, vocab, (B, T + 1), dtype=np.int64)
    return np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])


def torch_trainable_prefixes(n_layer: int, k: int) -> tuple:
    return tuple(f"transformer.h.{i}." for i in range(n_layer - k, n_layer)) + ("transformer.ln_f.",)


# ---- the two sides' steps ---------------------------------------------------------------------
def engine_side(model_dir, k, lr, tokens, targets):
    """(model, optimizer, step function) of the engine; step() returns the loss."""
    import engine
    model = engine.load(model_dir)
    model.train_last(k)
    opt = engine.AdamW(model, lr=lr)
    return model, opt, C.engine_step(model, opt, tokens, targets)


def torch_side(hf, k, lr, tokens, targets, optimizer="adamw"):
    """What a user writes: requires_grad=False on the frozen parameters, torch.optim.AdamW (or
    SGD) over the trainable ones, transformers' logits and F.cross_entropy on the engine's targets
    (transformers' labels= would shift them once more). use_cache=False: a training step keeps
    no KV cache. weight_decay=0.0 as the engine's default (torch's default is 0.01)."""
    import torch
    import torch.nn.functional as F
    L = hf.config.n_layer
    pre = torch_trainable_prefixes(L, k)
    for n, p in hf.named_parameters():
        p.requires_grad_(n.startswith(pre))
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    X = torch.from_numpy(tokens)
    Y = torch.from_numpy(targets).reshape(-1)

    def forward_backward():
        logits = hf(input_ids=X, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y)
        loss.backward()
        return loss

    def step():
        opt.zero_grad()
        loss = forward_backward()
        opt.step()
        return loss.item()
    return opt, step, forward_backward


# ---- verification -----------------------------------------------------------------------------
def verify(model, hf, e_loss, t_loss, loss_tol, grad_tol) -> dict:
    """Engine vs torch after one forward + backward (common.verify_grads, torch float32 as the
    reference). Raises AssertionError with the figures when they differ."""
    return C.verify_grads(model, hf, e_loss, t_loss, loss_tol, grad_tol, NAME)


# ---- worker subprocesses ----------------------------------------------------------------------
def _worker(args) -> dict:
    """One side alone in a fresh process: load, one warm-up step, `worker_steps` steps; the peak
    RSS of the whole process (imports, weights, step). Emits its result on stdout."""
    t0 = time.perf_counter()
    C.quiet_hf()
    C.set_thread_env(args.threads)
    C.ensure_repo_on_path()
    import numpy as np  # noqa: F401  -- imported by both sides anyway; counted in both RSS figures
    vocab = GPT2_SMALL["vocab_size"]
    tokens, targets = make_batch(vocab, args.batch_size, args.seq_len, args.seed)
    if args.worker == "engine":
        import engine  # noqa: F401
        import kernels.jit  # noqa: F401  -- where the engine sets its Numba options
        C.pin_threads(args.threads, torch=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        _, _, step = engine_side(args.model_dir, args.train_last, args.lr, tokens, targets)
    else:
        import torch
        from transformers import GPT2LMHeadModel
        C.pin_threads(args.threads, numba=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        hf = GPT2LMHeadModel.from_pretrained(args.model_dir)
        if next(hf.parameters()).dtype != torch.float32:
            hf = hf.float()
        _, step, _ = torch_side(hf, args.train_last, args.lr, tokens, targets)
    t_load = time.perf_counter() - t1
    rss_load = C.rss_mib()
    times, losses = [], []
    for _ in range(1 + args.worker_steps):
        t, loss = C.timed(step)
        times.append(t)
        losses.append(float(loss))
    res = {"side": args.worker, "import_s": t_import, "load_s": t_load, "step_s": times,
           "losses": losses, "rss_after_load_mib": rss_load, "rss_end_mib": C.rss_mib(),
           "peak_rss_mib": C.peak_rss_mib(), "ru_maxrss_mib": C.ru_maxrss_mib(),
           "threads": C.thread_counts(),
           "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR")}
    C.emit(res)
    return res


def _worker_argv(args, side):
    return [Path(__file__).resolve(), "--worker", side, "--model-dir", args.model_dir,
            "--threads", args.threads, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
            "--train-last", args.train_last, "--lr", args.lr, "--seed", args.seed,
            "--worker-steps", args.worker_steps]


# ---- the run ----------------------------------------------------------------------------------
def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args)
    if args.worker:
        return _worker(args)
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    C.quiet_hf()
    imported_early = C.set_thread_env(args.threads)
    worker_env = dict(os.environ)   # the user's environment + thread counts, before the engine's
    # OMP_WAIT_POLICY=PASSIVE is set (set_thread_env, above) before torch loads, so both sides
    # run with it: one OpenMP runtime serves both, and spinning threads cost the engine 15-25%;
    # torch's steps with and without it differ within the noise (benches/README.md)
    omp_wait_at_torch = os.environ.get("OMP_WAIT_POLICY")
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    C.ensure_repo_on_path()
    import engine  # noqa: F401
    threads = C.pin_threads(args.threads)

    B, T, k = args.batch_size, args.seq_len, args.train_last
    ntok = B * T
    tmp = tempfile.mkdtemp(prefix="tailtune-bench-gpt2-")
    try:
        say(f"building GPT-2 124M (seed {args.seed}) in {tmp}")
        torch.manual_seed(args.seed)
        hf_cfg = GPT2Config(**GPT2_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = GPT2LMHeadModel(hf_cfg).float()
        hf.save_pretrained(tmp)
        tokens, targets = make_batch(hf_cfg.vocab_size, B, T, args.seed)

        t_load, (model, eopt, engine_step) = C.timed(engine_side, tmp, k, args.lr, tokens, targets)
        topt, torch_step, torch_fwd_bwd = torch_side(hf, k, args.lr, tokens, targets)
        say(f"{model}; engine load {t_load:.1f} s")

        # 1. verification on the first step; its engine half is the first (compiling) call
        say("verify: first step on both sides (the engine's compiles or loads Numba kernels)")
        t0 = time.perf_counter()
        model.zero_grad()
        e_loss = model.forward(tokens, targets)
        t_fwd = time.perf_counter() - t0
        model.backward()
        t_fb = time.perf_counter() - t0
        topt.zero_grad()
        t_first_torch, t_loss = C.timed(torch_fwd_bwd)
        t_loss = t_loss.item()
        check = verify(model, hf, e_loss, t_loss, args.loss_tol, args.grad_tol)
        say(f"verify OK: loss {e_loss:.6f} vs {t_loss:.6f} (rel {check['loss_rel_err']:.2g}); "
            f"grads max rel err {check['grad_max_rel_err']:.2g} ({check['grad_worst_tensor']})")
        t_opt_first, _ = C.timed(eopt.step)     # its first call compiles the AdamW kernel
        topt.step()
        losses_e, losses_t = [e_loss], [t_loss]
        first = {"engine_forward_s": t_fwd, "engine_forward_backward_s": t_fb,
                 "engine_optimizer_s": t_opt_first, "engine_step_s": t_fb + t_opt_first,
                 "torch_forward_backward_s": t_first_torch}

        # 2. warm-up, matmul rate, alternating timed repeats, matmul rate again, profile
        tm = C.time_alternating(args, model.config, B, T, k, engine_step, torch_step, losses_e, losses_t, say)
        blas_in_engine_steps, flops = tm["blas_in_engine_steps"], tm["flops"]
        gemm_eff, e_times, t_times, prof = tm["gemm_eff"], tm["e_times"], tm["t_times"], tm["prof"]
        threads = C.thread_counts()      # now Numba's threading layer is known

        # 3. each side alone: peak RSS; the engine from an empty Numba cache
        workers = {}
        if not args.no_workers:
            args.model_dir = tmp
            for side in ("engine", "torch"):
                say(f"{side} alone in a subprocess (peak RSS)")
                workers[side] = C.run_worker(_worker_argv(args, side), worker_env)
            if not args.no_cold:
                cache = tempfile.mkdtemp(prefix="tailtune-bench-numba-cache-")
                try:
                    say("engine cold start in a subprocess with an empty Numba cache")
                    workers["engine_cold"] = C.run_worker(
                        _worker_argv(args, "engine"), {**worker_env, "NUMBA_CACHE_DIR": cache})
                finally:
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 4. figures
    def side(times, peak_worker):
        tps = [ntok / t for t in times]
        med_t = float(np.median(times))
        w = workers.get(peak_worker) or {}
        iso = [ntok / t for t in w.get("step_s", [])[1:]]
        return {"tokens_per_s": C.summarize(tps), "step_s": C.summarize(times),
                "mfu": flops.total / (med_t * gemm_eff * 1e9),
                "achieved_gflops": flops.total / med_t / 1e9,
                "peak_rss_mib": w.get("peak_rss_mib"), "rss_after_load_mib": w.get("rss_after_load_mib"),
                "alone_tokens_per_s": C.summarize(iso) if iso else None}
    eng, tor = side(e_times, "engine"), side(t_times, "torch")
    n_common = min(len(losses_e), len(losses_t))
    loss_dev = max(abs(a - b) / abs(b) for a, b in zip(losses_e[:n_common], losses_t[:n_common]))
    cold = None
    if "engine_cold" in workers:
        cold = C.cold_start(workers["engine_cold"], workers["engine"])
    for w in workers.values():   # the workers ran the same model on the same batch
        if abs(w["losses"][0] - t_loss) > args.loss_tol * abs(t_loss):
            raise AssertionError(f"{NAME}: a {w['side']} worker's first loss {w['losses'][0]} "
                                 f"differs from {t_loss}")
    result = {
        "workload": NAME,
        "setup": {"model": "GPT-2 124M shapes, random init (transformers, seed)", **GPT2_SMALL,
                  "batch_size": B, "seq_len": T, "tokens_per_step": ntok, "train_last": k,
                  "trainable": f"blocks {GPT2_SMALL['n_layer'] - k}..{GPT2_SMALL['n_layer'] - 1} "
                               "+ final norm (tied embedding frozen)",
                  "optimizer": f"AdamW lr={args.lr} betas=(0.9, 0.999) eps=1e-8 weight_decay=0",
                  "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads, "seed": args.seed,
                  "torch_attn_implementation": getattr(hf.config, "_attn_implementation", None),
                  "engine_gemm_backend": _gemm_backend()},
        "verify": check,
        "engine": eng,
        "torch": tor,
        **C.timing_fields(tm, eng, tor),
        "first_step_in_process": first,
        "cold_start": cold,
        "workers": workers,
        "loss_tracking": {"steps_compared": n_common, "max_rel_diff": loss_dev,
                          "engine_last": losses_e[n_common - 1], "torch_last": losses_t[n_common - 1]},
        "profile_engine": prof,
        "main_process_peak_rss_mib": C.peak_rss_mib(),
        "openblas_during_engine_steps": blas_in_engine_steps,
        "notes": notes(args, threads, blas_in_engine_steps, workers, load_start),
        "env": {**C.environment(), "threads": threads, "thread_env_set_before_import":
                {m: not v for m, v in imported_early.items()},
                "omp_wait_policy_at_torch_import": omp_wait_at_torch,
                "load_average_start": load_start},
        "elapsed_s": time.perf_counter() - t_start,
    }
    return C.finish(args, result, report)


def notes(args, threads, blas_main, workers, load_start) -> list:
    """Conditions that bend the figures, detected in this run."""
    out = []
    if load_start and load_start[0] > 0.5:
        out.append(f"the machine was busy: 1-minute load average {load_start[0]:.1f} at the start "
                   f"(other jobs, or runs just before this one) on {os.cpu_count()} cores; "
                   "compare ratios, not times")
    n = threads.get("numba_threads") or 1
    for where, blas in [("main process", blas_main)] + [
            (f"{k} worker", w["threads"].get("openblas_in_engine") or {}) for k, w in workers.items()
            if k.startswith("engine")]:
        numpy_blas = next((v for lib, v in blas.items() if lib.startswith("libscipy_openblas64")
                           or "numpy" in lib), None)
        if numpy_blas is None and blas:
            numpy_blas = next(iter(blas.values()))
        if n > 1 and numpy_blas and numpy_blas > 1:
            out.append(f"WARNING {where}: numpy's OpenBLAS kept {numpy_blas} threads inside the "
                       f"engine's calls, where it splits each GEMM over {n} threads of its own "
                       f"({n} x {numpy_blas} threads "
                       f"on {os.cpu_count()} cores); loaded OpenBLAS libraries and their thread "
                       f"counts: {blas}")
    return out


def _gemm_backend():
    try:
        import kernels.matmul as km
        return getattr(km, "BACKEND", None)
    except ImportError:
        return None


# ---- the human table --------------------------------------------------------------------------
def report(r: dict) -> str:
    s, v, e, t = r["setup"], r["verify"], r["engine"], r["torch"]
    th = r["env"]["threads"]
    lines = [
        f"{NAME}: B={s['batch_size']} x T={s['seq_len']} ({s['tokens_per_step']} tokens/step), "
        f"{s['trainable']}, {s['optimizer']}",
        f"threads: numba {th.get('numba_threads')} ({th.get('numba_threading_layer')}), "
        f"torch {th.get('torch_threads')}, NUMBA_NUM_THREADS={th['env']['NUMBA_NUM_THREADS']}, "
        f"OMP_NUM_THREADS={th['env']['OMP_NUM_THREADS']}; {s['steps_per_repeat']} step(s) x "
        f"{s['repeats']} alternating repeats after {s['warmup']} warm-up",
        f"verify: loss engine {v['loss_engine']:.6f} torch {v['loss_torch']:.6f} "
        f"(rel {v['loss_rel_err']:.1e}); grads max rel err {v['grad_max_rel_err']:.1e} "
        f"({v['grad_worst_tensor']}, {v['grad_tensors']} tensors, "
        f"{v['trainable_params'] / 1e6:.1f}M params): OK",
        "",
    ]

    def rss(x):
        return "-" if x is None else f"{x:.0f}"

    def alone(x):
        return "-" if not x else f"{x['median']:.0f}"
    rows = [[name, C.fmt_range(d["tokens_per_s"], "{:.0f}"), C.fmt_range(d["step_s"], "{:.2f}"),
             f"{100 * d['mfu']:.1f}%", f"{d['achieved_gflops']:.0f}", rss(d["peak_rss_mib"]),
             alone(d["alone_tokens_per_s"])]
            for name, d in (("tailtune", e), ("torch", t))]
    lines.append(C.table(["", "tokens/s median [min-max]", "s/step", "MFU", "GFLOP/s",
                          "peak RSS MiB", "alone tok/s"], rows))
    lines += C.ratio_and_flops_lines(r)
    fs = r["first_step_in_process"]
    lines.append(f"first engine step in this process {fs['engine_step_s']:.1f} s (Numba cache as "
                 f"found; forward {fs['engine_forward_s']:.1f} s); first torch forward+backward "
                 f"{fs['torch_forward_backward_s']:.1f} s")
    c = r["cold_start"]
    if c:
        lines.append(C.cold_start_line(c))
    lt = r["loss_tracking"]
    lines.append(f"loss after {lt['steps_compared']} steps: engine {lt['engine_last']:.5f}, torch "
                 f"{lt['torch_last']:.5f} (max rel diff over steps {lt['max_rel_diff']:.1e})")
    if r["profile_engine"]:
        lines += C.profile_lines(r["profile_engine"], cumulative=True)
    if r["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in r["notes"]]
    lines += ["", C.footer(r)]
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
