"""instruments: what the freezing research instruments cost and save, on gpt2-small shapes.

    python benches/instruments.py [--epochs 3] [--sequences 16] [--json out.json]

1. Frozen-prefix cache: the same 3-epoch run of the last 2 blocks (batch 4 x 256) with and
   without the cache: wall time of the training loop and the difference of the final weights.
   FLOP bound: with the cache, epochs after the first cost only the tail (2 blocks and the LM
   head, whose 2 x 79 GFLOP per step no cache can skip). Whatever the model, n epochs with the
   cache cost at least the first (uncached) epoch, so the speedup is below n by construction.
2. Telemetry: its own wall time when recorded every step, as a share of a step without it.
3. Per-layer cost (engine.probes.measured_costs): predicted from FLOPs and bytes over kernel
   rates measured in the same run, against the median of 9 measured steps, per layer and phase.
Engine only (no PyTorch); same process; medians where repeated.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args)
    start = time.perf_counter()
    C.set_thread_env(args.threads)
    C.quiet_hf()
    C.ensure_repo_on_path()
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import engine
    from engine import data as D
    from engine.prefix_cache import PrefixCache
    from engine.probes import Telemetry, measured_costs
    C.pin_threads(args.threads, torch=False)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    GPT2LMHeadModel(GPT2Config(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).save_pretrained(tmp)
    import inspect
    import json as json_mod
    text = (inspect.getsource(json_mod) + inspect.getsource(json_mod.decoder)) * 4
    with open(os.path.join(tmp, "data.txt"), "w") as f:
        f.write(text[:args.sequences * 257 + 1])
    tok = engine.ByteTokenizer()
    ex = D.Examples(D.tokenize_file(os.path.join(tmp, "data.txt"), tok, cache_dir=tmp), 256)
    idx = np.arange(min(len(ex), args.sequences))
    result = {"workload": "instruments", "sequences": len(idx), "epochs": args.epochs}

    def train(cache: bool):
        model = engine.load(tmp).train_last(2)
        opt = engine.AdamW(model, lr=1e-4)
        batches = D.Batches(ex, idx, 4, 0, 0)
        pc = PrefixCache(model, ex, 10) if cache else None
        t0 = time.perf_counter()
        for _ in range(args.epochs * batches.steps_per_epoch()):
            x, y, i = batches.next()
            model.zero_grad()
            if pc is None:
                model.forward(x, y)
            else:
                model.forward(x, y, hidden=pc.hidden(i, x), start=pc.start)
            model.backward()
            opt.step()
        return time.perf_counter() - t0, model.params, pc

    base = engine.load(tmp).params
    t_plain, w_plain, _ = train(False)
    t_cache, w_cache, pc = train(True)
    # the update each run made, compared over all trainable tensors together: per tensor, those
    # whose gradient is zero in exact arithmetic (the key biases: softmax ignores a constant
    # shift) get rounding noise, which Adam's normalization turns into updates of full size
    names = [n for n in w_plain if np.any(w_plain[n] != base[n])]
    d_plain = np.concatenate([(w_plain[n] - base[n]).ravel() for n in names]).astype(np.float64)
    d_cache = np.concatenate([(w_cache[n] - base[n]).ravel() for n in names]).astype(np.float64)
    worst = float(np.linalg.norm(d_cache - d_plain) / np.linalg.norm(d_plain))
    per_tensor = {n: float(np.linalg.norm((w_cache[n] - w_plain[n]).astype(np.float64))
                           / np.linalg.norm((w_plain[n] - base[n]).astype(np.float64))) for n in names}
    result["prefix_cache_update_difference_per_tensor"] = per_tensor
    steps_total = args.epochs * -(-len(idx) // 4)
    f_full, f_tail = 396.5, 396.5 - 149.0        # GFLOP per step (common.step_flops, k=2)
    bound = steps_total * f_full / (steps_total / args.epochs * f_full + (steps_total - steps_total / args.epochs) * f_tail)
    result["prefix_cache"] = {"seconds_without": t_plain, "seconds_with": t_cache,
                              "speedup": t_plain / t_cache, "flop_bound_speedup": bound,
                              "relative_update_difference": worst, **pc.report()}

    # telemetry overhead
    model = engine.load(tmp).train_last(2)
    opt = engine.AdamW(model, lr=1e-4)
    x, y, _ = D.Batches(ex, idx, 4, 0, 0).next()
    times = {"off": [], "every step": []}
    tel_s = []                         # telemetry's own wall time inside the "every step" steps
    tel = Telemetry(model, x[:2, :64], every=1)
    for rep in range(args.repeats):
        for mode in times:
            t0 = time.perf_counter()
            model.zero_grad()
            model.forward(x, y)
            model.backward()
            t1 = time.perf_counter()
            if mode != "off":
                tel.before_update(0)
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if mode != "off":
                tel.record(0, opt)
            t4 = time.perf_counter()
            times[mode].append(t4 - t0)
            if mode != "off":
                tel_s.append((t2 - t1) + (t4 - t3))
    # telemetry's own time is the figure: the difference of two noisy step medians moved
    # between 3% and 19% from run to run on this shared machine
    off = np.median(times["off"])
    share = float(np.median(tel_s)) / off
    result["telemetry"] = {"step_s_off": C.summarize(times["off"]),
                           "step_s_every_step": C.summarize(times["every step"]),
                           "telemetry_s": C.summarize(tel_s),
                           "overhead_every_step": share, "overhead_every_10": share / 10,
                           "step_difference": (np.median(times["every step"]) - off) / off}

    costs = measured_costs(model, 4, 256, steps=9)
    dev = {}
    for r in costs["rows"]:
        for ph in ("fwd", "bwd", "opt"):
            if r[f"{ph}_pred"] >= 1.0:     # ms; below, per-call overhead is all there is
                dev[f"{r['layer']} {ph}"] = r[f"{ph}_meas"] / r[f"{ph}_pred"] - 1
    worst = max(dev, key=lambda n: abs(dev[n]))
    result["cost"] = {**costs, "deviation": dev, "worst": worst}
    result["environment"] = C.environment(("numpy", "numba"))
    result["elapsed_s"] = time.perf_counter() - start
    return C.finish(args, result, report)


def report(result: dict) -> str:
    C.ensure_repo_on_path()
    from engine.probes import measured_table
    p, t, c = result["prefix_cache"], result["telemetry"], result["cost"]
    dev = c["deviation"]
    lines = [C.table(["", "without cache", "with cache", "speedup", "FLOP bound", "update diff"],
                     [[f"{result['epochs']} epochs x {result['sequences']} seq", f"{p['seconds_without']:.1f} s",
                       f"{p['seconds_with']:.1f} s", f"{p['speedup']:.2f}x", f"{p['flop_bound_speedup']:.2f}x",
                       f"{p['relative_update_difference']:.1e}"]]),
             f"prefix: computed at {p['compute_ms_per_example']:.1f} ms per sequence, read at "
             f"{p['read_ms_per_example']:.3f} ms ({p['compute_ms_per_example'] / p['read_ms_per_example']:.0f}x cheaper)",
             f"telemetry: {100 * t['overhead_every_step']:.1f}% of a step when recorded every step "
             f"({1e3 * t['telemetry_s']['median']:.0f} ms of {t['step_s_off']['median']:.2f} s), "
             f"{100 * t['overhead_every_10']:.1f}% every 10 steps, 0 when off (difference of the step "
             f"medians: {100 * t['step_difference']:+.1f}%)",
             measured_table(None, 4, 256, costs=c),
             f"measured / predicted - 1 per layer and phase (predicted >= 1 ms): median "
             f"{statistics.median(dev.values()):+.0%}, worst {dev[c['worst']]:+.0%} ({c['worst']}); "
             f"step {c['step_meas'] / c['step_pred'] - 1:+.0%}"]
    if "elapsed_s" in result:
        lines.append(f"({result['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=C.PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=16, help="training sequences of 256 tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    C.add_output_args(ap)
    return ap


if __name__ == "__main__":
    run(sys.argv[1:])
