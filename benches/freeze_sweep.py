#!/usr/bin/env python
"""freeze-sweep: step time and peak memory against k, the number of trainable top blocks, tailtune vs PyTorch.

For each k (ascending), both sides train the last k blocks and the final norm (k = 0: the final
norm alone; the tied embedding / LM head stays frozen) with AdamW on the same batch, each k
from the weights as loaded (restored in place before it). GPT-2 124M
shapes (random init, as gpt2-small) by default, or the real SmolLM2-135M with --model smollm2.

Each side runs in its own persistent worker subprocess, so each has its own peak RSS; the main
process drives the two step by step (engine step, torch step, engine step, ...), so the sides
alternate as in the other workloads and the idle one waits on a pipe. Per k: `--warmup` untimed
steps, then `--steps` timed steps per side; the peak RSS of the k (VmHWM reset before its first
step) covers both. Then: a least-squares line of step time against k per side (slope, intercept,
R^2), t(L)/t(1) against the FLOP model's prediction, and a PNG (--png).

Order of a run:
  1. verify at one k (default: the largest): loss and every trainable gradient, both sides
  2. the sweep in the workers
  3. the fits, a table on stdout, JSON with --json, the plot with --png

    python benches/freeze_sweep.py [--ks 0,1,2,4,12] [--steps N] [--png sweep.png] [--json out.json]
    tailtune bench freeze-sweep [options]

`run(args)` (args: None, a list of strings, or a Namespace from build_parser()) returns the result.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    from . import common as C
except ImportError:         # run as a script or by `tailtune bench`: benches/ is not a package
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import common as C

NAME = "freeze-sweep"
DEFAULT_KS = {"gpt2": "0,1,2,3,4,6,8,10,12", "smollm2": "0,1,2,4,8,12,16,22,30"}


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(
        prog=C.PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("gpt2", "smollm2"), default="gpt2",
                   help="gpt2: GPT-2 124M shapes, random init; smollm2: the packaged GGUF "
                        "(transformers takes ~40 s to load it, in this process and in the torch worker)")
    p.add_argument("--ks", help="trainable top blocks to measure, comma-separated (default: "
                                + "; ".join(f"{m}: {k}" for m, k in DEFAULT_KS.items()) + ")")
    p.add_argument("--steps", type=int, default=1, help="timed steps per k and side")
    p.add_argument("--passes", type=int, default=1,
                   help="sweeps over the ks, alternately ascending and descending; each k's time "
                        "is the median of its timed steps over all passes, so a slow stretch of a "
                        "shared machine lands on different ks in different passes (peak RSS: "
                        "first, ascending pass only)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per k and side before the timed ones (the first step at a k "
                        "allocates the optimizer state, so the peak needs one more step)")
    p.add_argument("--threads", type=int, default=cores,
                   help="threads for both sides (Numba and torch intra-op)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights (gpt2) and the batch")
    p.add_argument("--verify-k", type=int,
                   help="k at which the gradients are verified in this process (default: the largest)")
    p.add_argument("--no-verify", action="store_true", help="skip the gradient verification")
    C.add_tolerance_args(p)
    p.add_argument("--track-tol", type=float, default=1e-3,
                   help="relative tolerance of engine vs torch loss at every step of the sweep "
                        "(the sides take the same steps; a wrong trainable set shows up here)")
    p.add_argument("--fresh-workers", action="store_true",
                   help="a new pair of worker processes for every k (slower; peak RSS with "
                        "nothing left over from smaller k)")
    p.add_argument("--png", metavar="PATH", help="plot step time and peak RSS against k here")
    C.add_output_args(p)
    p.add_argument("--worker", choices=("engine", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    return p



def _ks(args, n_layer):
    if args.passes < 1 or args.steps < 1:
        raise SystemExit(f"freeze-sweep: --passes and --steps must be >= 1, got {args.passes}, {args.steps}")
    ks = sorted({int(x) for x in (args.ks or DEFAULT_KS[args.model]).split(",") if x.strip()})
    bad = [k for k in ks if not 0 <= k <= n_layer]
    if bad:
        raise SystemExit(f"freeze-sweep: k must be in 0..{n_layer}, got {bad}")
    return ks


def torch_prefixes(model: str, n_layer: int, k: int) -> tuple:
    if model == "gpt2":
        return tuple(f"transformer.h.{i}." for i in range(n_layer - k, n_layer)) + ("transformer.ln_f.",)
    return tuple(f"model.layers.{i}." for i in range(n_layer - k, n_layer)) + ("model.norm.",)


def load_torch(model: str, model_dir: str):
    import torch
    if model == "gpt2":
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(model_dir)
    else:
        from smollm2 import load_hf_gguf
        hf = load_hf_gguf(model_dir)
    if next(hf.parameters()).dtype != torch.float32:
        hf = hf.float()
    hf.train()
    return hf


# ---- the workers ------------------------------------------------------------------------------
class _Snapshot:
    """The weights as loaded, in a file, read back in place before every k: each k (and pass)
    trains from the same weights, so the two sides' losses stay comparable however many steps
    the sweep takes (AdamW on one batch makes float32 rounding differences grow step by step).
    Written and read through the arrays' own memory, so it adds nothing to the process's RSS."""

    def __init__(self, arrays, path):
        self.arrays, self.path = arrays, path
        with open(path, "wb") as f:
            for a in arrays:
                f.write(memoryview(a).cast("B"))

    def restore(self):
        with open(self.path, "rb") as f:
            for a in self.arrays:
                if f.readinto(memoryview(a).cast("B")) != a.nbytes:
                    raise RuntimeError(f"{self.path}: weight snapshot is short")


class _EngineSide:
    def __init__(self, args):
        import engine
        self.engine = engine
        self.model = engine.load(args.model_dir)
        self.n_layer = self.model.config.n_layer
        self.lr = args.lr
        self.opt = None

    def arrays(self):
        return [self.model.params[n] for n in sorted(self.model.params)]

    def prepare(self, k):
        self.opt = None
        self.model.train_last(k)      # frees the buffers of blocks leaving, makes the new ones
        gc.collect()
        self.opt = self.engine.AdamW(self.model, lr=self.lr)
        return {"trainable_params": self.model.num_params(trainable_only=True)}

    def step(self, tokens, targets, measure=False):
        m = self.model
        m.zero_grad()
        loss = m.forward(tokens, targets)
        saved = m.saved_bytes() if measure else None
        m.backward()
        self.opt.step()
        return loss, saved

    def sizes(self):
        return {"grad_bytes": sum(g.nbytes for g in self.model.grads.values()),
                "optimizer_state_bytes": self.opt.state_bytes()}


class _TorchSide:
    def __init__(self, args):
        import torch
        import torch.nn.functional as F
        self.torch, self.F = torch, F
        self.kind = args.model
        self.hf = load_torch(args.model, args.model_dir)
        cfg = self.hf.config
        self.n_layer = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
        self.lr = args.lr
        self.opt = None

    def arrays(self):
        return [p.detach().numpy() for p in self.hf.parameters()]   # a tied weight once

    def prepare(self, k):
        pre = torch_prefixes(self.kind, self.n_layer, k)
        self.opt = None
        for n, p in self.hf.named_parameters():
            p.grad = None
            p.requires_grad_(n.startswith(pre))
        gc.collect()
        params = [p for p in self.hf.parameters() if p.requires_grad]
        self.opt = self.torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        return {"trainable_params": sum(p.numel() for p in params)}

    def step(self, tokens, targets, measure=False):
        X = self.torch.from_numpy(tokens)
        Y = self.torch.from_numpy(targets).reshape(-1)
        self.opt.zero_grad()
        logits = self.hf(input_ids=X, use_cache=False).logits
        loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y)
        loss.backward()
        self.opt.step()
        return loss.item(), None

    def sizes(self):
        g = sum(p.grad.numel() * 4 for p in self.hf.parameters() if p.grad is not None)
        st = sum(v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values()
                 if hasattr(v, "numel") and v.dim() > 0)
        return {"grad_bytes": g, "optimizer_state_bytes": st}


def _worker(args) -> None:
    """Serve {"cmd": "load" | "prepare" (k) | "step" | "finish"} until "exit" (common.serve)."""
    t0 = time.perf_counter()
    C.quiet_hf()
    C.set_thread_env(args.threads)
    C.ensure_repo_on_path()
    import numpy as np
    if args.worker == "engine":
        import engine  # noqa: F401
        import kernels.jit  # noqa: F401
        C.pin_threads(args.threads, torch=False)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        C.pin_threads(args.threads, numba=False)
    t_import = time.perf_counter() - t0
    batch = np.load(args.batch_file)
    tokens, targets = np.ascontiguousarray(batch[0]), np.ascontiguousarray(batch[1])
    st = {"side": None, "k": None, "times": [], "losses": [], "saved": None}

    def handle(req):
        cmd = req["cmd"]
        if cmd == "load":
            t1 = time.perf_counter()
            st["side"] = (_EngineSide if args.worker == "engine" else _TorchSide)(args)
            st["snapshot"] = _Snapshot(st["side"].arrays(), os.path.join(
                os.path.dirname(args.batch_file), f"{args.worker}-weights.bin"))
            return {"import_s": t_import, "load_s": time.perf_counter() - t1,
                    "rss_after_load_mib": C.rss_mib(), "peak_rss_load_mib": C.peak_rss_mib(),
                    "threads": C.thread_counts()}
        side = st["side"]
        if cmd == "prepare":
            st.update(k=req["k"], times=[], losses=[], saved=None)
            st["snapshot"].restore()
            info = side.prepare(req["k"])
            gc.collect()
            C.malloc_trim()
            info["rss_before_mib"] = C.rss_mib()
            info["peak_reset"] = C.reset_peak_rss()
            return info
        if cmd == "step":
            t, (loss, saved) = C.timed(side.step, tokens, targets, not st["times"])
            st["times"].append(t)
            st["losses"].append(float(loss))
            if saved is not None:
                st["saved"] = saved
            return {"s": t, "loss": float(loss)}
        if cmd == "finish":
            return {"k": st["k"], "step_s": st["times"], "losses": st["losses"],
                    "peak_rss_mib": C.peak_rss_mib(), "rss_end_mib": C.rss_mib(),
                    "saved_activation_bytes": st["saved"], **side.sizes()}
        raise ValueError(f"unknown command {cmd!r}")

    C.serve(handle)


def _start(args, side, model_dir, batch_file, env):
    argv = [Path(__file__).resolve(), "--worker", side, "--model", args.model, "--model-dir",
            model_dir, "--batch-file", batch_file, "--threads", args.threads, "--lr", args.lr]
    return C.Worker(argv, env)


# ---- the run ----------------------------------------------------------------------------------
def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args)
    if args.worker:
        _worker(args)
        return {}
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    C.quiet_hf()
    imported_early = C.set_thread_env(args.threads)
    worker_env = dict(os.environ)
    import numpy as np
    import torch
    C.ensure_repo_on_path()
    import engine
    threads = C.pin_threads(args.threads)
    B, T = args.batch_size, args.seq_len

    tmp = tempfile.mkdtemp(prefix="tailtune-bench-sweep-")
    workers = {}
    try:
        # the model both workers load, and the batch
        if args.model == "gpt2":
            from gpt2_small import GPT2_SMALL, make_batch
            from transformers import GPT2Config, GPT2LMHeadModel
            model_dir = os.path.join(tmp, "model")
            say(f"building GPT-2 124M (seed {args.seed}) in {model_dir}")
            torch.manual_seed(args.seed)
            hf = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0)).float()
            hf.save_pretrained(model_dir)
            tokens, targets = make_batch(GPT2_SMALL["vocab_size"], B, T, args.seed)
            data_what = f"random ids, seed {args.seed}"
            hf_dir = model_dir
        else:
            import smollm2
            model_dir = hf_dir = smollm2.model_path()
            hf = None
            tokens, targets, data_what = smollm2.make_batch(model_dir, B, T, "text", args.seed, 49152)
        batch_file = os.path.join(tmp, "batch.npy")
        np.save(batch_file, np.stack([tokens, targets]))

        # the workers load while this process verifies (nothing is timed meanwhile)
        def start_pair():
            pair = {s: _start(args, s, model_dir if s == "engine" else hf_dir, batch_file, worker_env)
                    for s in ("engine", "torch")}
            for w in pair.values():
                w.send(cmd="load")
            return pair
        if not args.fresh_workers:
            workers = start_pair()

        model = engine.load(model_dir)
        L = model.config.n_layer
        ks = _ks(args, L)
        dims = C.Dims.from_config(model.config)
        check = None
        if not args.no_verify:
            vk = args.verify_k if args.verify_k is not None else max(ks)
            say(f"verify at k = {vk}: first step on both sides")
            if hf is None:
                from smollm2 import load_hf_gguf
                hf = load_hf_gguf(hf_dir)
            check = _verify(args, model, hf, vk, tokens, targets)
            say(f"verify OK at k = {vk}: loss rel err {check['loss_rel_err']:.1e}, grads max rel err "
                f"{check['grad_max_rel_err']:.1e} ({check['grad_worst_tensor']})"
                + (f"; vs float64: engine {check['grad_max_rel_err_vs_f64']['engine']:.1e}, torch "
                   f"{check['grad_max_rel_err_vs_f64']['torch']:.1e}" if "grad_max_rel_err_vs_f64"
                   in check else ""))
        del model, hf
        gc.collect()

        loads = {}
        if workers:
            for s, w in workers.items():
                loads[s] = w.receive()
        rows = {}
        for p in range(args.passes):
            for k in (ks if p % 2 == 0 else ks[::-1]):
                if args.fresh_workers:
                    workers = start_pair()
                    loads = {s: w.receive() for s, w in workers.items()}
                prep = {s: w.request(cmd="prepare", k=k) for s, w in workers.items()}
                if prep["engine"]["trainable_params"] != prep["torch"]["trainable_params"]:
                    raise AssertionError(f"{NAME}: k={k}: trainable parameters differ: {prep}")
                for i in range(args.warmup + args.steps):
                    for w in workers.values():
                        w.request(cmd="step")
                fin = {s: w.request(cmd="finish") for s, w in workers.items()}
                if k in rows:          # a later pass: its timed steps join the first pass's
                    row = _add_pass(args, rows[k], fin)
                else:
                    row = rows[k] = _row(args, k, prep, fin, loads if args.fresh_workers or not rows
                                         else None, dims, B, T)
                say(f"{'pass ' + str(p + 1) + ', ' if args.passes > 1 else ''}k = {k:2d}: engine "
                    f"{row['engine']['step_s']['median']:.2f} s/step, "
                    f"{row['engine']['peak_rss_mib']:.0f} MiB; torch {row['torch']['step_s']['median']:.2f} "
                    f"s/step, {row['torch']['peak_rss_mib']:.0f} MiB; loss diff "
                    f"{row['loss_max_rel_diff']:.1e}")
                if not row["loss_max_rel_diff"] <= args.track_tol:
                    raise AssertionError(f"{NAME}: k={k}: engine and torch losses drifted apart "
                                         f"(rel {row['loss_max_rel_diff']:.3g} > {args.track_tol}): "
                                         f"{fin['engine']['losses']} vs {fin['torch']['losses']}")
                if args.fresh_workers:
                    for w in workers.values():
                        w.close()
                    workers = {}
        per_k = [rows[k] for k in ks]
        threads = {"main": C.thread_counts(), **{f"{s}_worker": x["threads"] for s, x in loads.items()}}
    finally:
        for w in workers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    result = analyze(args, per_k, dims, L, ks, B, T)
    result.update({
        "workload": NAME,
        "setup": {"model": ("GPT-2 124M shapes, random init (transformers, seed)" if args.model == "gpt2"
                            else "SmolLM2-135M-Instruct GGUF (dequantized to float32)"),
                  "n_layer": L, "batch_size": B, "seq_len": T, "tokens_per_step": B * T, "ks": ks,
                  "data": data_what,
                  "trainable": "the last k blocks + the final norm (tied embedding frozen)",
                  "optimizer": f"AdamW lr={args.lr} betas=(0.9, 0.999) eps=1e-8 weight_decay=0",
                  "warmup_steps_per_k": args.warmup, "timed_steps_per_k": args.steps,
                  "passes": args.passes,
                  "threads": args.threads,
                  "workers": "a new pair per k" if args.fresh_workers else
                  "one per side for all k (ascending, then alternately descending and ascending "
                  "with --passes), VmHWM reset before each k"},
        "verify": check,
        "env": {**C.environment(), "threads": threads, "thread_env_set_before_import":
                {m: not v for m, v in imported_early.items()}, "load_average_start": load_start},
        "elapsed_s": time.perf_counter() - t_start,
    })
    if args.png:
        plot(result, args.png)
        result["png"] = str(args.png)
        say(f"wrote {args.png}")
    return C.finish(args, result, report)


def _verify(args, model, hf, k, tokens, targets) -> dict:
    """One forward + backward on both sides at k, in this process (common.verify_grads); for
    SmolLM2 against a float64 copy as well (smollm2.py explains why)."""
    import torch
    import torch.nn.functional as F
    model.train_last(k)
    model.zero_grad()
    e_loss = model.forward(tokens, targets)
    model.backward()
    pre = torch_prefixes(args.model, model.config.n_layer, k)
    for n, p in hf.named_parameters():
        p.grad = None
        p.requires_grad_(n.startswith(pre))
    hf.train()
    logits = hf(input_ids=torch.from_numpy(tokens), use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    t_loss = loss.item()
    del logits, loss
    kw = {}
    if args.model == "smollm2":
        from smollm2 import torch_float64_reference
        hf64, loss64 = torch_float64_reference(hf, tokens, targets)
        kw = {"hf64": hf64, "loss64": loss64}
    out = C.verify_grads(model, hf, e_loss, t_loss, args.loss_tol, args.grad_tol,
                         f"{NAME} (k={k})", **kw)
    out["k"] = k
    return out


def _row(args, k, prep, fin, loads, dims, B, T) -> dict:
    row = {"k": k, "flops": C.step_flops(dims, B, T, k).total,
           "trainable_params": prep["engine"]["trainable_params"]}
    for s in ("engine", "torch"):
        f = fin[s]
        timed_s = f["step_s"][args.warmup:]
        row[s] = {"step_s": C.summarize(timed_s), "warmup_s": f["step_s"][:args.warmup],
                  "losses": f["losses"], "peak_rss_mib": f["peak_rss_mib"],
                  "rss_before_mib": prep[s]["rss_before_mib"], "peak_reset": prep[s]["peak_reset"],
                  "grad_bytes": f["grad_bytes"], "optimizer_state_bytes": f["optimizer_state_bytes"],
                  "saved_activation_bytes": f["saved_activation_bytes"],
                  "gflops": row["flops"] / statistics_median(timed_s) / 1e9}
        if loads:
            row[s]["load"] = loads[s]
    row["loss_max_rel_diff"] = _loss_diff(fin)
    return row


def _add_pass(args, row, fin) -> dict:
    """A later pass at the same k: its timed steps join the row's (the median is over all)."""
    for s in ("engine", "torch"):
        f = fin[s]
        r = row[s]
        r.setdefault("step_s_by_pass", [r["step_s"]["values"]])
        r["step_s_by_pass"].append(f["step_s"][args.warmup:])
        r["warmup_s"] += f["step_s"][:args.warmup]
        r["step_s"] = C.summarize([t for ts in r["step_s_by_pass"] for t in ts])
        r["gflops"] = row["flops"] / r["step_s"]["median"] / 1e9
        r["losses"] += f["losses"]
    row["loss_max_rel_diff"] = max(row["loss_max_rel_diff"], _loss_diff(fin))
    return row


def _loss_diff(fin) -> float:
    """Largest relative difference between the two sides' losses, step by step."""
    return max(abs(a - b) / abs(b) for a, b in zip(fin["engine"]["losses"], fin["torch"]["losses"]))


def statistics_median(v):
    import statistics
    return statistics.median(v)


# ---- analysis ---------------------------------------------------------------------------------
def analyze(args, per_k, dims, L, ks, B, T) -> dict:
    """Line fits of step time and peak RSS against k, and the FLOP model's view of them."""
    F = {k: C.step_flops(dims, B, T, k).total for k in range(L + 1)}
    f_block = F[1] - F[0]          # the FLOP model is linear in k: F(k) = F(0) + k * f_block
    out = {"per_k": per_k,
           "flop_model": {"F0": F[0], "per_block": f_block, "F_all": F[L], "F1": F[1],
                          "t_all_over_t1": F[L] / F[1], "slope_over_intercept": f_block / F[0],
                          "F_by_k": {str(k): F[k] for k in ks}}}
    xs = [r["k"] for r in per_k]
    for s in ("engine", "torch"):
        ts = [r[s]["step_s"]["median"] for r in per_k]
        mem = [r[s]["peak_rss_mib"] for r in per_k]
        fit_t = C.fit_line(xs, ts)
        fit_m = C.fit_line(xs, mem)
        by_k = dict(zip(xs, ts))

        def t_at(k):
            return by_k[k] if k in by_k else fit_t["intercept"] + fit_t["slope"] * k
        ratio_src = "measured" if (L in by_k and 1 in by_k) else "fitted line"
        # the fastest step per k as well: other tenants only ever add time, so with several
        # steps per k the minimum estimates the step's own cost (reported beside the medians')
        fit_min = C.fit_line(xs, [r[s]["step_s"]["min"] for r in per_k])
        d = {"time_fit": fit_t, "time_fit_min": fit_min, "memory_fit_mib": fit_m,
             "t_all_over_t1": t_at(L) / t_at(1), "t_all_over_t1_from": ratio_src,
             "slope_over_intercept": (fit_t["slope"] / fit_t["intercept"]
                                      if fit_t["intercept"] else None),
             "backward_gflops_per_block": f_block / fit_t["slope"] / 1e9 if fit_t["slope"] else None,
             "k0_gflops": F[0] / fit_t["intercept"] / 1e9 if fit_t["intercept"] else None}
        out[s] = d
    e = {r["k"]: r["engine"]["step_s"]["median"] for r in per_k}
    t = {r["k"]: r["torch"]["step_s"]["median"] for r in per_k}
    out["ratio_torch_over_engine_time"] = {str(k): t[k] / e[k] for k in e}
    return out


# ---- outputs ----------------------------------------------------------------------------------
def plot(r: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per_k = r["per_k"]
    ks = [x["k"] for x in per_k]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s, color, label in (("engine", "tab:blue", "tailtune"), ("torch", "tab:orange", "PyTorch")):
        med = [x[s]["step_s"]["median"] for x in per_k]
        lo = [x[s]["step_s"]["median"] - x[s]["step_s"]["min"] for x in per_k]
        hi = [x[s]["step_s"]["max"] - x[s]["step_s"]["median"] for x in per_k]
        ax1.errorbar(ks, med, yerr=[lo, hi], fmt="o", color=color, capsize=3, label=label)
        fit = r[s]["time_fit"]
        xs = [0, max(ks)]
        ax1.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], "-", color=color, alpha=0.6,
                 label=f"{label} fit: {fit['intercept']:.2f} s + {fit['slope']:.3f} s/block "
                       f"(R² {fit['r2']:.3f})")
        ax2.plot(ks, [x[s]["peak_rss_mib"] for x in per_k], "o-", color=color, label=label)
    # the FLOP model through each side's intercept: where a constant FLOP rate would put it
    F = r["flop_model"]
    xs = [0, max(ks)]
    for s_, color in (("engine", "tab:blue"), ("torch", "tab:orange")):
        a = r[s_]["time_fit"]["intercept"]
        ax1.plot(xs, [a * (1 + F["slope_over_intercept"] * x) for x in xs], ":", color=color,
                 label="FLOP model through each intercept" if s_ == "engine" else None)
    s = r["setup"]
    for ax in (ax1, ax2):
        ax.set_xticks(ks)
    ax1.set_xlabel("trainable top blocks k")
    ax1.set_ylabel("s / step")
    ax1.set_title(f"step time, B={s['batch_size']} x T={s['seq_len']}")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("trainable top blocks k")
    ax2.set_ylabel("peak RSS MiB (worker process)")
    ax2.set_title("peak memory")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(f"freeze-sweep: {s['model']}, {s['threads']} threads", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: dict) -> str:
    s = r["setup"]
    lines = [f"{NAME}: {s['model']}, B={s['batch_size']} x T={s['seq_len']}, {s['trainable']}, "
             f"{s['optimizer']}",
             f"batch: {s['data']}; {s['warmup_steps_per_k']} warm-up + {s['timed_steps_per_k']} timed "
             f"step(s) per k and side" + (f" in each of {s['passes']} passes" if s.get("passes", 1) > 1
                                          else "") +
             f", sides alternating step by step; workers: {s['workers']}"]
    v = r["verify"]
    if v:
        extra = ""
        if "grad_max_rel_err_vs_f64" in v:
            g = v["grad_max_rel_err_vs_f64"]
            extra = f"; vs float64: engine {g['engine']:.1e}, torch float32 {g['torch']:.1e}"
        lines.append(f"verify at k = {v['k']}: loss engine {v['loss_engine']:.6f} torch "
                     f"{v['loss_torch']:.6f}; grads max rel err {v['grad_max_rel_err']:.1e} "
                     f"({v['grad_tensors']} tensors){extra}: OK")
    lines.append("")
    rows = []
    for x in r["per_k"]:
        e, t = x["engine"], x["torch"]
        rows.append([x["k"], f"{x['trainable_params'] / 1e6:.1f}M", f"{x['flops'] / 1e9:.0f}",
                     C.fmt_range(e["step_s"], "{:.2f}"), C.fmt_range(t["step_s"], "{:.2f}"),
                     f"{t['step_s']['median'] / e['step_s']['median']:.2f}x",
                     f"{e['gflops']:.0f} / {t['gflops']:.0f}",
                     f"{e['peak_rss_mib']:.0f}", f"{t['peak_rss_mib']:.0f}",
                     "-" if e["saved_activation_bytes"] is None else
                     f"{e['saved_activation_bytes'] / 2 ** 20:.0f}",
                     f"{x['loss_max_rel_diff']:.0e}"])
    lines.append(C.table(["k", "trainable", "GFLOP", "engine s/step", "torch s/step", "torch/engine",
                          "GFLOP/s e / t", "peak MiB e", "peak MiB t", "saved act MiB e",
                          "loss diff"], rows))
    F = r["flop_model"]
    lines.append("")
    for s_, name in (("engine", "tailtune"), ("torch", "torch")):
        d = r[s_]
        f, m = d["time_fit"], d["memory_fit_mib"]
        lines.append(f"{name}: t(k) = {f['intercept']:.3f} s + {f['slope']:.4f} s x k (R² {f['r2']:.4f}); "
                     f"slope/intercept {d['slope_over_intercept']:.4f}; t(L)/t(1) "
                     f"{d['t_all_over_t1']:.3f} ({d['t_all_over_t1_from']}); per-block backward "
                     f"{d['backward_gflops_per_block']:.0f} GFLOP/s, k=0 step {d['k0_gflops']:.0f} GFLOP/s; "
                     f"peak RSS {m['intercept']:.0f} MiB + {m['slope']:.1f} MiB x k (R² {m['r2']:.4f})"
                     + (f"; fit of each k's fastest step: R² {d['time_fit_min']['r2']:.4f}"
                        if "time_fit_min" in d else ""))
    lines.append(f"FLOP model: F(k) = {F['F0'] / 1e9:.1f} G + {F['per_block'] / 1e9:.2f} G x k; "
                 f"slope/intercept {F['slope_over_intercept']:.4f}; F(L)/F(1) = {F['t_all_over_t1']:.3f}")
    lines += ["", C.footer(r)]
    return "\n".join(lines)


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
