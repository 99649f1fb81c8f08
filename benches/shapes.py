#!/usr/bin/env python
"""shapes: the gpt2-small step at other shapes than the standard 4 x 256, tailtune vs PyTorch.

The standard workloads time one shape each; a user on a laptop tries others. Each case here
runs GPT-2 124M shapes (random init, the same weights on both sides, restored before every
case) side by side in this process: batch x sequence length, trainable blocks, AdamW or SGD,
or inference (logits, no targets). Per case:
  1. verify: the first step's loss and every trainable gradient against torch (inference: the
     logits), before anything is timed
  2. one untimed step per side, then `--repeats` rounds of engine and torch in ABBA order,
     each round as many calls as fill ~0.5 s (small shapes) or one call
  3. tokens/s of both, their ratio and the per-round paired ratios, achieved GFLOP/s

    python benches/shapes.py [--cases 1x64:k2 4x256:k12:sgd 4x256:infer ...] [--json out.json]

Case syntax: BxT[:kN][:sgd][:infer]; kN = the last N blocks + final norm trainable (default
k2; k0 = the final norm only).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    from . import common as C
    from .gpt2_small import GPT2_SMALL, make_batch, torch_side
except ImportError:         # run as a script: benches/ is not a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common as C
    from gpt2_small import GPT2_SMALL, make_batch, torch_side

NAME = "shapes"
CASES = ("1x64:k2", "1x256:k2", "1x1024:k2", "16x128:k2", "4x256:k0", "4x256:k12",
         "4x256:k2:sgd", "1x64:k12:sgd", "4x256:infer")


def case(text: str) -> dict:
    """'4x256:k12:sgd' -> {B, T, k, opt, infer}; an argparse type (errors name the case)."""
    m = re.fullmatch(r"(\d+)x(\d+)((?::k\d+|:sgd|:infer)*)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxT[:kN][:sgd][:infer], e.g. 4x256:k12:sgd")
    B, T, opts = int(m[1]), int(m[2]), m[3].split(":")[1:]
    ks = [int(o[1:]) for o in opts if o.startswith("k")]
    c = {"name": text, "B": B, "T": T, "k": ks[-1] if ks else 2,
         "opt": "sgd" if "sgd" in opts else "adamw", "infer": "infer" in opts}
    if not (1 <= B and 1 <= T <= GPT2_SMALL["n_positions"] and c["k"] <= GPT2_SMALL["n_layer"]):
        raise argparse.ArgumentTypeError(f"{text!r}: needs B >= 1, 1 <= T <= "
                                         f"{GPT2_SMALL['n_positions']}, k <= {GPT2_SMALL['n_layer']}")
    return c


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(prog=C.PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the default stays text (argparse shows it as given) and is parsed in run()
    p.add_argument("--cases", nargs="+", type=case, default=list(CASES), metavar="CASE",
                   help="BxT[:kN][:sgd][:infer]")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per case (ABBA order)")
    p.add_argument("--threads", type=int, default=cores, help="threads for both sides")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (both sides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    C.add_tolerance_args(p)
    C.add_output_args(p)
    return p


def _sides(c, model, hf, lr, tokens, targets):
    """The engine's and torch's step for case c (each returns something to consume) and, for
    training, their first forward + backward (loss) for the verification."""
    import engine
    import torch
    X = torch.from_numpy(tokens)
    if c["infer"]:
        def e_step():
            return model.forward(tokens)

        def t_step():
            with torch.no_grad():
                return hf(input_ids=X, use_cache=False).logits
        return e_step, t_step, None
    model.train_last(c["k"])
    for p in hf.parameters():   # the case before's gradients
        p.grad = None
    eopt = engine.SGD(model, lr=lr) if c["opt"] == "sgd" else engine.AdamW(model, lr=lr)
    topt, t_step, t_fwd_bwd = torch_side(hf, c["k"], lr, tokens, targets, c["opt"])
    e_step = C.engine_step(model, eopt, tokens, targets)

    def first():
        model.zero_grad()
        e_loss = model.forward(tokens, targets)
        model.backward()
        topt.zero_grad()
        t_loss = t_fwd_bwd().item()
        return e_loss, t_loss, lambda: (eopt.step(), topt.step())
    return e_step, t_step, first


def run(args=None) -> dict:
    args = C.parse_args(build_parser(), args)
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    C.quiet_hf()
    C.set_thread_env(args.threads)
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    C.ensure_repo_on_path()
    import engine
    threads = C.pin_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="tailtune-bench-shapes-")
    try:
        say(f"building GPT-2 124M (seed {args.seed})")
        torch.manual_seed(args.seed)
        hf = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0)).float()
        hf.save_pretrained(tmp)
        model = engine.load(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    e_start = {n: p.copy() for n, p in model.params.items()}
    t_start_state = {n: t.clone() for n, t in hf.state_dict().items()}
    d = C.Dims.from_config(model.config)
    rows = []
    for c in (c if isinstance(c, dict) else case(c) for c in args.cases):
        B, T, k = c["B"], c["T"], c["k"]
        for n, p in model.params.items():   # every case from the same weights
            p[...] = e_start[n]
        hf.load_state_dict(t_start_state)
        tokens, targets = make_batch(GPT2_SMALL["vocab_size"], B, T, args.seed)
        e_step, t_step, first = _sides(c, model, hf, args.lr, tokens, targets)
        say(f"{c['name']}: verify")
        if first is None:   # inference: the logits
            e, t = model.forward(tokens), hf(input_ids=torch.from_numpy(tokens)).logits.detach().numpy()
            err = float(np.abs(e - t).max() / np.abs(t).max())
            if not err <= args.grad_tol:
                raise AssertionError(f"{NAME} {c['name']}: logits differ from torch's (max rel {err:.3g})")
            check = {"logits_max_rel_err": err}
            flops = C.step_flops(d, B, T, 0, final_norm_trainable=False)
            step_flops = flops.parts["forward_blocks"] + flops.parts["forward_head"]
        else:
            e_loss, t_loss, update = first()
            check = C.verify_grads(model, hf, e_loss, t_loss, args.loss_tol, args.grad_tol,
                                   f"{NAME} {c['name']}")
            check.pop("grad_rel_err")
            update()
            step_flops = C.step_flops(d, B, T, k).total
        C.consume(e_step())
        C.consume(t_step())
        calls = C.calibrate(lambda: C.consume(e_step()), min_s=0.5)
        say(f"{c['name']}: {args.repeats} rounds of {calls} call(s) per side")
        times = C.alternate({"engine": lambda: C.consume(e_step()),
                             "torch": lambda: C.consume(t_step())},
                            args.repeats, {"engine": calls, "torch": calls})
        ntok = B * T
        eng = {"tokens_per_s": C.summarize([ntok / s for s in times["engine"]]),
               "achieved_gflops": step_flops / float(np.median(times["engine"])) / 1e9}
        tor = {"tokens_per_s": C.summarize([ntok / s for s in times["torch"]]),
               "achieved_gflops": step_flops / float(np.median(times["torch"])) / 1e9}
        rows.append({**c, "calls_per_round": calls, "verify": check, "engine": eng, "torch": tor,
                     "ratio": C.paired_ratios(times["torch"], times["engine"]),
                     "step_gflop": step_flops / 1e9})
        say(f"{c['name']}: {rows[-1]['ratio']['median']:.2f}x")
    result = {"workload": NAME,
              "setup": {"model": "GPT-2 124M shapes, random init (transformers, seed)",
                        "repeats": args.repeats, "threads": args.threads, "lr": args.lr,
                        "seed": args.seed},
              "cases": rows,
              "env": {**C.environment(), "threads": threads, "load_average_start": load_start},
              "elapsed_s": time.perf_counter() - t_start}
    return C.finish(args, result, report)


def report(r: dict) -> str:
    rows = [[c["name"], "infer" if c["infer"] else f"{c['k']} + ln_f",
             "-" if c["infer"] else c["opt"],
             C.fmt_range(c["engine"]["tokens_per_s"], "{:.0f}"),
             C.fmt_range(c["torch"]["tokens_per_s"], "{:.0f}"),
             f"{c['ratio']['median']:.2f}x [{c['ratio']['min']:.2f}-{c['ratio']['max']:.2f}]",
             f"{c['engine']['achieved_gflops']:.0f} / {c['torch']['achieved_gflops']:.0f}"]
            for c in r["cases"]]
    return "\n".join([
        f"{NAME}: GPT-2 124M shapes, tailtune vs PyTorch, {r['setup']['threads']} threads, "
        f"{r['setup']['repeats']} rounds per case (ABBA)", "",
        C.table(["case (BxT)", "trainable", "optimizer", "engine tok/s", "torch tok/s",
                 "ratio (paired)", "GFLOP/s e / t"], rows), "",
        "ratio: torch time / engine time per round, median [min-max]; every case verified "
        "against torch (loss and gradients, or logits) before timing", C.footer(r)])


def main(argv=None):
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
