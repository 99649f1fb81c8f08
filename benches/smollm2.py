#!/usr/bin/env python
"""smollm2: one tail fine-tuning step of the real SmolLM2-135M-Instruct (its GGUF), tailtune vs PyTorch.

The engine loads the packaged GGUF with engine.load; transformers loads the same file with
AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (about 40 s). Both dequantize to the same
float32 weights (checked, bit for bit). Batch 4 x 256 of real text (Python's argparse source,
tokenized by engine.load_tokenizer) or random ids; the last 4 of 30 blocks and the final norm
trainable, the tied embedding frozen; AdamW on the trainable parameters.

Order of a run:
  1. verify: first step on both sides; loss and every trainable gradient must agree (fails loudly)
  2. warm-up steps (untimed), numpy.matmul rate on the step's GEMM shapes
  3. R repeats of N engine steps and N torch steps (ABBA order), each timed as one interval
  4. numpy.matmul rate again, cProfile of an engine step
  5. worker subprocesses: each side alone, peak RSS of the whole process and of the steps alone
  6. a table on stdout, JSON with --json

    python benches/smollm2.py [--steps N] [--repeats R] [--json out.json]
    tailtune bench smollm2 [options]

`run(args)` (args: None, a list of strings, or a Namespace from build_parser()) returns the result.
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
    from .gpt2_small import _gemm_backend, notes
except ImportError:         # run as a script or by `tailtune bench`: benches/ is not a package
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import common as C
    from gpt2_small import _gemm_backend, notes

NAME = "smollm2"
TEXT_MODULES = ("argparse", "json", "inspect")   # stdlib sources the real-text batch comes from


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(
        prog=C.PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1, help="training steps per timed repeat (per side)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; each runs the engine's steps and torch's, in turn first (ABBA)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per side after the verification step")
    p.add_argument("--threads", type=int, default=cores,
                   help="threads for both sides (Numba and torch intra-op)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--train-last", type=int, default=4,
                   help="trainable blocks at the top (plus the final norm)")
    p.add_argument("--data", choices=("text", "random", "claims"), default="text",
                   help="batch: real text (Python's stdlib source, the model's tokenizer), "
                        "random ids from the vocabulary, or the README's main job: the first "
                        "--batch-size chats of examples/claims/train.jsonl, loss on the answers "
                        "only, padded to the longest (at most --seq-len)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch (--data random)")
    C.add_tolerance_args(p)
    p.add_argument("--gemm-repeats", type=int, default=3,
                   help="timed numpy.matmul calls per GEMM shape, before and after the steps")
    p.add_argument("--profile-steps", type=int, default=1,
                   help="engine steps run under cProfile after the timing (0: none)")
    p.add_argument("--worker-steps", type=int, default=3,
                   help="steps after one warm-up step in each memory worker subprocess (the "
                        "'alone' tokens/s is their median)")
    p.add_argument("--no-workers", action="store_true",
                   help="skip the subprocesses (peak RSS per side)")
    p.add_argument("--cold", action="store_true",
                   help="also run an engine worker on an empty Numba cache (compile time; ~1 min)")
    C.add_output_args(p)
    p.add_argument("--worker", choices=("engine", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    return p



def model_path() -> str:
    from engine.io.resolve import resolve_model_path
    return resolve_model_path("smollm2")


def load_hf_gguf(path):
    """transformers' own load of the GGUF: what a PyTorch user of this file writes."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()     # the GGUF dequantization bar
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32)


def make_batch(path, B: int, T: int, data: str, seed: int, vocab: int):
    """tokens (B, T), targets (B, T) (targets[:, t] = the token after tokens[:, t]) and a
    description. "text": Python's own argparse (then json, inspect) source through the model's
    tokenizer, cut into B rows of T + 1 consecutive tokens."""
    if data == "claims":
        return _claims_batch(path, B, T)
    import numpy as np
    need = B * (T + 1)
    if data == "random":
        ids = np.random.default_rng(seed).integers(0, vocab, need, dtype=np.int64)
        what = f"random ids 0..{vocab - 1}, seed {seed}"
    else:
        import importlib
        import inspect
        import engine
        tok = engine.load_tokenizer(path)
        ids, used = [], []
        for m in TEXT_MODULES:
            ids += tok.encode(inspect.getsource(importlib.import_module(m)), add_special_tokens=False)
            used.append(m)
            if len(ids) >= need:
                break
        if len(ids) < need:
            raise RuntimeError(f"the text holds {len(ids)} tokens, the batch needs {need}")
        ids = np.asarray(ids[:need], dtype=np.int64)
        import platform
        what = (f"real text: source of Python {platform.python_version()}'s "
                f"{', '.join(used)} modules, first {need} tokens")
    ids = ids.reshape(B, T + 1)
    return np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:]), what


def _claims_batch(path, B: int, T: int):
    """The main job's batch: chats through the model's chat template, prompts and padding -100
    (both sides: F.cross_entropy ignores -100 by default)."""
    import numpy as np
    import engine
    from engine import data as D
    tok = engine.load_tokenizer(path)
    src = Path(__file__).resolve().parent.parent / "examples" / "claims" / "train.jsonl"
    ex = D.Examples(D.tokenize_file(str(src), tok), T)
    pad = tok.batch_pad_id
    x, y = D.make_batch(ex, np.arange(B), pad)
    what = (f"examples/claims/train.jsonl, chats 0..{B - 1} padded to {x.shape[1]}: "
            f"{int((y >= 0).sum())} of {y.size} positions carry a loss (the answers)")
    return x, y, what


def torch_trainable_prefixes(n_layer: int, k: int) -> tuple:
    return tuple(f"model.layers.{i}." for i in range(n_layer - k, n_layer)) + ("model.norm.",)


def engine_side(model, k, lr, tokens, targets):
    """(optimizer, step) of the engine on a loaded model; step() returns the loss."""
    import engine
    model.train_last(k)
    opt = engine.AdamW(model, lr=lr)
    return opt, C.engine_step(model, opt, tokens, targets)


def torch_side(hf, k, lr, tokens, targets):
    """What a user writes: requires_grad=False outside the last k blocks and the final norm (the
    tied embedding / LM head stays frozen), torch.optim.AdamW over the trainable ones (weight
    decay 0 as the engine's default), logits + F.cross_entropy on the engine's targets. When
    some positions carry no loss (chat data), the LM head runs on the others only, as the
    engine's does: three lines a torch user can write too, so the comparison is of equal work
    there (computing every position's logits made torch ~1.45x slower on the claims batch)."""
    import torch
    import torch.nn.functional as F
    pre = torch_trainable_prefixes(hf.config.num_hidden_layers, k)
    for n, p in hf.named_parameters():
        p.requires_grad_(n.startswith(pre))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    X = torch.from_numpy(tokens)
    Y = torch.from_numpy(targets).reshape(-1)
    rows = Y >= 0

    def forward_backward():
        if bool(rows.all()):
            logits = hf(input_ids=X, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y)
        else:
            h = hf.model(input_ids=X, use_cache=False).last_hidden_state
            loss = F.cross_entropy(hf.lm_head(h.reshape(-1, h.shape[-1])[rows]), Y[rows])
        loss.backward()
        return loss

    def step():
        opt.zero_grad()
        loss = forward_backward()
        opt.step()
        return loss.item()
    return opt, step, forward_backward


def torch_float64_reference(hf, tokens, targets):
    """A float64 copy of the torch model (same trainable set) after one forward + backward on
    the batch: (model, loss). The exact-arithmetic stand-in both float32 sides are judged by."""
    import copy
    import torch.nn.functional as F
    import torch
    hf64 = copy.deepcopy(hf).double()
    for p in hf64.parameters():
        p.grad = None
    logits = hf64(input_ids=torch.from_numpy(tokens), use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    return hf64, loss.item()


def weights_diff(model, hf) -> float:
    """Largest |engine - transformers| over all weights, in engine names."""
    import numpy as np
    from engine.io import hf_names
    sd = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    ref = hf_names.to_engine(model.config, lambda n: sd[n], list(sd))
    return max(float(np.abs(ref[n] - model.params[n]).max()) for n in model.params)


# ---- worker subprocesses ----------------------------------------------------------------------
def _worker(args) -> dict:
    """One side alone in a fresh process: load, reset the peak, one warm-up step and
    `worker_steps` steps. Two peaks: the whole process (imports + load + steps) and the steps
    alone (VmHWM reset after the load: load paths differ between the sides)."""
    t0 = time.perf_counter()
    C.quiet_hf()
    C.set_thread_env(args.threads)
    C.ensure_repo_on_path()
    import numpy as np
    if args.worker == "engine":
        import engine
        import kernels.jit  # noqa: F401
        C.pin_threads(args.threads, torch=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        path = model_path()
        model = engine.load(path)
        vocab = model.config.vocab_size
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        C.pin_threads(args.threads, numba=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        path = model_path()
        hf = load_hf_gguf(path)
        vocab = hf.config.vocab_size
    t_load = time.perf_counter() - t1
    # the batch the main process used, from a file: tokenizing here would add the tokenizer to
    # this side's memory
    batch = np.load(args.batch_file)
    tokens, targets = batch[0], batch[1]
    if int(tokens.max()) >= vocab:
        raise ValueError("batch ids outside the vocabulary")
    if args.worker == "engine":
        _, step = engine_side(model, args.train_last, args.lr, tokens, targets)
    else:
        _, step, _ = torch_side(hf, args.train_last, args.lr, tokens, targets)
    return C.measure_worker(args.worker, step, args.worker_steps, t_import, t_load)


def _worker_argv(args, side, batch_file):
    return C.batch_worker_argv(__file__, args, side, batch_file)


# ---- the run ----------------------------------------------------------------------------------
def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args, C.REFERENCE + ("accelerate", "gguf"))
    if args.worker:
        return _worker(args)
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    C.quiet_hf()
    imported_early = C.set_thread_env(args.threads)
    worker_env = dict(os.environ)
    # OMP_WAIT_POLICY=PASSIVE is set (set_thread_env, above) before torch loads: both sides run
    # with it (one OpenMP runtime serves both; see benches/README.md)
    omp_wait_at_torch = os.environ.get("OMP_WAIT_POLICY")
    import numpy as np
    import torch  # noqa: F401
    C.ensure_repo_on_path()
    import engine
    threads = C.pin_threads(args.threads)

    B, T, k = args.batch_size, args.seq_len, args.train_last
    path = model_path()
    t_eload, model = C.timed(engine.load, path)
    L = model.config.n_layer
    tokens, targets, data_what = make_batch(path, B, T, args.data, args.seed, model.config.vocab_size)
    T = tokens.shape[1]               # claims: the longest chat of the batch
    ntok = B * T
    head_rows = int((targets >= 0).sum())
    say(f"{model}; engine.load {t_eload:.1f} s; batch: {data_what}")
    say("transformers: from_pretrained(gguf_file=...) (about 40 s)")
    t_hload, hf = C.timed(load_hf_gguf, path)
    wdiff = weights_diff(model, hf)
    say(f"transformers load {t_hload:.1f} s; weights max |engine - transformers| = {wdiff:.3g}")

    attn_impl = getattr(hf.config, "_attn_implementation", None)
    eopt, engine_step = engine_side(model, k, args.lr, tokens, targets)
    topt, torch_step, torch_fwd_bwd = torch_side(hf, k, args.lr, tokens, targets)

    # 1. verification on the first step
    say("verify: first step on both sides")
    t0 = time.perf_counter()
    model.zero_grad()
    e_loss = model.forward(tokens, targets)
    t_fwd = time.perf_counter() - t0
    model.backward()
    t_fb = time.perf_counter() - t0
    topt.zero_grad()
    t_first_torch, t_loss = C.timed(torch_fwd_bwd)
    t_loss = t_loss.item()
    say("verify: float64 copy of the torch model, forward + backward (the exact reference)")
    t_ref, (hf64, loss64) = C.timed(torch_float64_reference, hf, tokens, targets)
    check = C.verify_grads(model, hf, e_loss, t_loss, args.loss_tol, args.grad_tol, NAME,
                           hf64=hf64, loss64=loss64)
    del hf64
    check["weights_max_abs_diff"] = wdiff
    check["float64_reference_s"] = t_ref
    g64 = check["grad_max_rel_err_vs_f64"]
    say(f"verify OK: loss engine {e_loss:.6f}, torch {t_loss:.6f}, float64 {loss64:.6f}; grads vs "
        f"float64: engine {g64['engine']:.2g} ({g64['engine_worst_tensor']}), torch float32 "
        f"{g64['torch']:.2g} ({g64['torch_worst_tensor']}); engine vs torch "
        f"{check['grad_max_rel_err']:.2g}")
    t_opt_first, _ = C.timed(eopt.step)
    topt.step()
    losses_e, losses_t = [e_loss], [t_loss]
    first = {"engine_forward_s": t_fwd, "engine_forward_backward_s": t_fb,
             "engine_optimizer_s": t_opt_first, "engine_step_s": t_fb + t_opt_first,
             "torch_forward_backward_s": t_first_torch}

    # 2. warm-up, matmul rate, alternating timed repeats, matmul rate again, profile
    tm = C.time_alternating(args, model.config, B, T, k, engine_step, torch_step, losses_e, losses_t,
                            say, head_rows=head_rows)
    blas_in_engine_steps, flops = tm["blas_in_engine_steps"], tm["flops"]
    gemm_eff, e_times, t_times, prof = tm["gemm_eff"], tm["e_times"], tm["t_times"], tm["prof"]
    threads = C.thread_counts()

    # 3. each side alone
    workers = {}
    if not args.no_workers:
        tmp = tempfile.mkdtemp(prefix="tailtune-bench-smollm2-")
        try:
            batch_file = os.path.join(tmp, "batch.npy")
            np.save(batch_file, np.stack([tokens, targets]))
            for side in ("engine", "torch"):
                say(f"{side} alone in a subprocess (peak RSS)"
                    + ("; it loads the GGUF with transformers (about 40 s)" if side == "torch" else ""))
                workers[side] = C.run_worker(_worker_argv(args, side, batch_file), worker_env)
            if args.cold:
                cache = os.path.join(tmp, "numba-cache")
                say("engine cold start in a subprocess with an empty Numba cache")
                workers["engine_cold"] = C.run_worker(_worker_argv(args, "engine", batch_file),
                                                      {**worker_env, "NUMBA_CACHE_DIR": cache})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # 4. figures
    def side(times, w):
        tps = [ntok / t for t in times]
        med_t = float(np.median(times))
        w = w or {}
        iso = [ntok / t for t in w.get("step_s", [])[1:]]
        return {"tokens_per_s": C.summarize(tps), "step_s": C.summarize(times),
                "mfu": flops.total / (med_t * gemm_eff * 1e9),
                "achieved_gflops": flops.total / med_t / 1e9,
                "peak_rss_mib": w.get("peak_rss_mib"), "peak_rss_steps_mib": w.get("peak_rss_steps_mib"),
                "rss_after_load_mib": w.get("rss_after_load_mib"),
                "alone_tokens_per_s": C.summarize(iso) if iso else None}
    eng, tor = side(e_times, workers.get("engine")), side(t_times, workers.get("torch"))
    n_common = min(len(losses_e), len(losses_t))
    loss_dev = max(abs(a - b) / abs(b) for a, b in zip(losses_e[:n_common], losses_t[:n_common]))
    for w in workers.values():
        if abs(w["losses"][0] - t_loss) > args.loss_tol * abs(t_loss):
            raise AssertionError(f"{NAME}: a {w['side']} worker's first loss {w['losses'][0]} "
                                 f"differs from {t_loss}")
    cold = None
    if "engine_cold" in workers:
        cold = C.cold_start(workers["engine_cold"], workers["engine"])
    c = model.config
    result = {
        "workload": NAME,
        "setup": {"model": f"SmolLM2-135M-Instruct, {os.path.basename(path)} (dequantized to float32)",
                  "n_layer": L, "d_model": c.d_model, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                  "head_dim": c.head_dim, "d_ff": c.d_ff, "vocab_size": c.vocab_size,
                  "batch_size": B, "seq_len": T, "tokens_per_step": ntok, "train_last": k,
                  "data": data_what, "target_positions": head_rows,
                  "trainable": f"blocks {L - k}..{L - 1} + final norm (tied embedding frozen)",
                  "optimizer": f"AdamW lr={args.lr} betas=(0.9, 0.999) eps=1e-8 weight_decay=0",
                  "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads,
                  "torch_attn_implementation": attn_impl,
                  "engine_gemm_backend": _gemm_backend(),
                  "load_s": {"engine": t_eload, "transformers_gguf": t_hload}},
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
        "openblas_during_engine_steps": blas_in_engine_steps,
        "notes": notes(args, threads, blas_in_engine_steps, workers, load_start),
        "env": {**C.environment(), "threads": threads, "thread_env_set_before_import":
                {m: not v for m, v in imported_early.items()},
                "omp_wait_policy_at_torch_import": omp_wait_at_torch,
                "load_average_start": load_start},
        "elapsed_s": time.perf_counter() - t_start,
    }
    return C.finish(args, result, report)


# ---- the human table --------------------------------------------------------------------------
def report(r: dict) -> str:
    s, v, e, t = r["setup"], r["verify"], r["engine"], r["torch"]
    th = r["env"]["threads"]
    lines = [
        f"{NAME}: {s['model']}, B={s['batch_size']} x T={s['seq_len']} "
        f"({s['tokens_per_step']} tokens/step), {s['trainable']}, {s['optimizer']}",
        f"batch: {s['data']}",
        f"threads: numba {th.get('numba_threads')} ({th.get('numba_threading_layer')}), "
        f"torch {th.get('torch_threads')}; {s['steps_per_repeat']} step(s) x {s['repeats']} "
        f"alternating repeats after {s['warmup']} warm-up; load: engine "
        f"{s['load_s']['engine']:.1f} s, transformers (GGUF) {s['load_s']['transformers_gguf']:.1f} s",
        f"verify: weights identical (max diff {v['weights_max_abs_diff']:.1g}); {v['grad_tensors']} "
        f"trainable tensors, {v['trainable_params'] / 1e6:.1f}M params; against a float64 copy of "
        f"the torch model:",
        f"  loss: engine {v['loss_engine']:.6f}, torch {v['loss_torch']:.6f}, float64 "
        f"{v['loss_float64']:.6f} (rel err engine {v['loss_rel_err_vs_f64']['engine']:.1e}, torch "
        f"{v['loss_rel_err_vs_f64']['torch']:.1e})",
        f"  grads, max rel err: engine {v['grad_max_rel_err_vs_f64']['engine']:.1e} "
        f"({v['grad_max_rel_err_vs_f64']['engine_worst_tensor']}), torch float32 "
        f"{v['grad_max_rel_err_vs_f64']['torch']:.1e} "
        f"({v['grad_max_rel_err_vs_f64']['torch_worst_tensor']}); limit "
        f"{v['grad_max_rel_err_vs_f64']['limit']:.1e}; engine vs torch {v['grad_max_rel_err']:.1e}: OK",
        "",
    ]

    def mib(x):
        return "-" if x is None else f"{x:.0f}"

    def alone(x):
        return "-" if not x else f"{x['median']:.0f}"
    rows = [[name, C.fmt_range(d["tokens_per_s"], "{:.0f}"), C.fmt_range(d["step_s"], "{:.2f}"),
             f"{100 * d['mfu']:.1f}%", f"{d['achieved_gflops']:.0f}", mib(d["peak_rss_mib"]),
             mib(d["peak_rss_steps_mib"]), alone(d["alone_tokens_per_s"])]
            for name, d in (("tailtune", e), ("torch", t))]
    lines.append(C.table(["", "tokens/s median [min-max]", "s/step", "MFU", "GFLOP/s",
                          "peak RSS MiB", "steps' peak", "alone tok/s"], rows))
    lines += C.ratio_and_flops_lines(r)
    fs = r["first_step_in_process"]
    lines.append(f"first engine step in this process {fs['engine_step_s']:.1f} s (forward "
                 f"{fs['engine_forward_s']:.1f} s); first torch forward+backward "
                 f"{fs['torch_forward_backward_s']:.1f} s")
    w = r["workers"]
    if w:
        lines.append("workers (each side alone): peak RSS = whole process (imports, load, steps); "
                     "steps' peak = VmHWM reset after the load; after load "
                     + ", ".join(f"{k} {mib(x.get('rss_after_load_mib'))} MiB" for k, x in w.items())
                    )
    c = r["cold_start"]
    if c:
        lines.append(C.cold_start_line(c))
    lt = r["loss_tracking"]
    lines.append(f"loss after {lt['steps_compared']} steps: engine {lt['engine_last']:.5f}, torch "
                 f"{lt['torch_last']:.5f} (max rel diff over steps {lt['max_rel_diff']:.1e})")
    if r["profile_engine"]:
        lines += C.profile_lines(r["profile_engine"], cumulative=False)
    if r["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in r["notes"]]
    lines += ["", C.footer(r)]
    return "\n".join(lines)


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
