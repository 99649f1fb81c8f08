#!/usr/bin/env python
"""minilm: one tail fine-tuning step of the real all-MiniLM-L6-v2 as a sequence classifier, tailtune vs PyTorch.

The engine loads the Hugging Face directory with engine.load(path, labels=LABELS): the BERT
encoder, its pooler, and a new classifier over the five claim categories (random, seeded; the
engine says so on stderr). transformers loads the same directory with
AutoModelForSequenceClassification.from_pretrained(path, num_labels=5), dropouts 0, and takes the
engine's pooler and classifier weights, so both sides start equal (checked: every weight, bit for
bit). Batch: the first 16 texts of examples/claims/category_train.jsonl through the model's
tokenizer ([CLS] ... [SEP]), right-padded to the longest, or random ids of one fixed length. The
last 2 of 6 blocks, the pooler and the classifier trainable; AdamW on the trainable parameters.

Order of a run:
  1. verify: first step on both sides; loss and every trainable gradient must agree, with each
     other and with a float64 copy of the torch model (fails loudly)
  2. warm-up steps (untimed), numpy.matmul rate on the step's GEMM shapes
  3. R repeats of N engine steps and N torch steps (ABBA order), each timed as one interval
  4. numpy.matmul rate again, cProfile of engine steps
  5. worker subprocesses: each side alone, peak RSS of the whole process and of the steps alone
  6. a table on stdout, JSON with --json

    python benches/minilm.py [--steps N] [--repeats R] [--json out.json]
    tailtune bench minilm [options]

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
    from .smollm2 import weights_diff
except ImportError:         # run as a script or by `tailtune bench`: benches/ is not a package
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    import common as C
    from gpt2_small import _gemm_backend, notes
    from smollm2 import weights_diff

NAME = "minilm"
DATA = Path(__file__).resolve().parent.parent / "examples" / "claims" / "category_train.jsonl"
# the classes of DATA, sorted (as `tailtune finetune` orders a new head's labels)
LABELS = ["auto", "health", "liability", "property", "travel"]
# the torch model's parameters the engine's classifier head maps to (the engine's new head is
# random: these are copied into torch's)
HEAD_HF = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
           "classifier.bias")


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(
        prog=C.PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="training steps per timed repeat (per side)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed repeats; each runs the engine's steps and torch's, in turn first (ABBA)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps per side after the verification step")
    p.add_argument("--threads", type=int, default=cores,
                   help="threads for both sides (Numba and torch intra-op)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences (texts) per step")
    p.add_argument("--seq-len", type=int, default=128,
                   help="longest sequence: texts are cut to it (claims), or every row's length (random)")
    p.add_argument("--train-last", type=int, default=2,
                   help="trainable blocks at the top (plus the pooler and the classifier)")
    p.add_argument("--data", choices=("claims", "random"), default="claims",
                   help="batch: the first --batch-size texts of examples/claims/category_train.jsonl "
                        "and their labels, padded to the longest; or random ids (no padding, every "
                        "row --seq-len long) and random labels")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (both sides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch (--data random)")
    C.add_tolerance_args(p)
    p.add_argument("--gemm-repeats", type=int, default=3,
                   help="timed numpy.matmul calls per GEMM shape, before and after the steps")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="engine steps run under cProfile after the timing (0: none)")
    p.add_argument("--worker-steps", type=int, default=3,
                   help="steps after one warm-up step in each memory worker subprocess (the "
                        "'alone' examples/s is their median)")
    p.add_argument("--no-workers", action="store_true",
                   help="skip the subprocesses (peak RSS per side)")
    p.add_argument("--cold", action="store_true",
                   help="also run an engine worker on an empty Numba cache (compile time; ~1 min)")
    C.add_output_args(p)
    p.add_argument("--worker", choices=("engine", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    return p


def check_args(prog, args, n_layer: int, max_len: int) -> None:
    """Option values the model cannot take, named before anything runs."""
    bad = []
    if not 0 <= args.train_last <= n_layer:
        bad.append(f"--train-last {args.train_last} (expected 0..{n_layer})")
    if not 3 <= args.seq_len <= max_len:      # [CLS], a token, [SEP]
        bad.append(f"--seq-len {args.seq_len} (expected 3..{max_len})")
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps),
                        ("--repeats", args.repeats)):
        if value < 1:
            bad.append(f"{flag} {value} (expected >= 1)")
    if bad:
        raise SystemExit(f"{prog or NAME}: " + "; ".join(bad))


def model_path() -> str:
    from engine.io.resolve import resolve_model_path
    return resolve_model_path("minilm")


def load_hf(path):
    """What a PyTorch user writes: the BERT encoder with a sequence-classification head over
    the five labels (transformers starts its classifier new), dropouts 0 so that both sides
    compute the same function."""
    import torch
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), dtype=torch.float32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


def engine_head_as_hf(model) -> dict:
    """The engine's pooler and classifier weights under transformers' names (HEAD_HF), through
    engine.io.hf_names (no name table here). Copies: the optimizer updates the engine's arrays
    in place."""
    from engine.io import hf_names
    hf = hf_names.to_hf(model.config, model.params)
    return {n: hf[n].copy() for n in HEAD_HF}


def copy_head(hf, head: dict) -> None:
    import torch
    sd = dict(hf.named_parameters())
    with torch.no_grad():
        for n, a in head.items():
            sd[n].copy_(torch.from_numpy(a))


def make_batch(path, B: int, T: int, data: str, seed: int, vocab: int):
    """tokens (B, T) int64 right-padded with 0, targets (B,) class indices, lengths (B,) and a
    description. claims: the first B texts and labels of DATA through the model's tokenizer, cut
    to T tokens (keeping [SEP]) and padded to the longest (engine.classify's own batching)."""
    import numpy as np
    if data == "random":
        rng = np.random.default_rng(seed)
        tokens = rng.integers(1, vocab, (B, T), dtype=np.int64)   # 1..: no [PAD] (0)
        targets = rng.integers(0, len(LABELS), B, dtype=np.int64)
        return tokens, targets, np.full(B, T, np.int64), (f"random ids 1..{vocab - 1} and labels, "
                                                          f"seed {seed}, every row {T} long")
    import engine
    from engine import classify
    texts, labels = classify.read_labeled(str(DATA))
    if sorted(set(labels)) != LABELS:
        raise RuntimeError(f"{DATA} has the labels {sorted(set(labels))}, this bench expects {LABELS}")
    if B > len(texts):
        raise SystemExit(f"{NAME}: --batch-size {B}: {DATA.name} holds {len(texts)} texts")
    tok = engine.load_tokenizer(path)
    seqs = classify.encode(tok, texts[:B], T)
    # (single texts: every token of type 0, so no types array)
    tokens, lengths, _ = classify.batch(seqs, np.arange(B), tok.pad_id if tok.pad_id is not None else 0)
    targets = np.array([LABELS.index(x) for x in labels[:B]], np.int64)
    cut = int(sum(len(ids) == T for ids, _ in seqs))
    what = (f"examples/claims/{DATA.name}, texts 0..{B - 1} padded to {tokens.shape[1]}: "
            f"{int(lengths.sum())} real tokens of {tokens.size} ({lengths.min()}..{lengths.max()} "
            f"a text)" + (f"; {cut} cut to {T}" if cut else ""))
    return tokens, targets, lengths, what


def torch_trainable_prefixes(n_layer: int, k: int) -> tuple:
    return tuple(f"bert.encoder.layer.{i}." for i in range(n_layer - k, n_layer)) + (
        "bert.pooler.", "classifier.")


def engine_side(model, k, lr, tokens, targets, lengths):
    """(optimizer, step) of the engine on a loaded model; step() returns the loss."""
    import engine
    model.train_last(k)
    opt = engine.AdamW(model, lr=lr)

    def step():
        model.zero_grad()
        loss = model.forward(tokens, targets, lengths=lengths)
        model.backward()
        opt.step()
        return loss
    return opt, step


def attention_mask(tokens, lengths):
    import numpy as np
    return (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)   # (B, T)


def torch_side(hf, k, lr, tokens, targets, lengths):
    """What a user writes: requires_grad=False outside the last k encoder layers, the pooler
    and the classifier; torch.optim.AdamW over the trainable ones (weight decay 0, the engine's
    default); the model's own loss (labels=: mean cross-entropy over the batch)."""
    import torch
    pre = torch_trainable_prefixes(hf.config.num_hidden_layers, k)
    for n, p in hf.named_parameters():
        p.requires_grad_(n.startswith(pre))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    X, M, Y = (torch.from_numpy(a) for a in (tokens, attention_mask(tokens, lengths), targets))

    def forward_backward():
        out = hf(input_ids=X, attention_mask=M, labels=Y)
        out.loss.backward()
        return out.loss

    def step():
        opt.zero_grad()
        loss = forward_backward()
        opt.step()
        return loss.item()
    return opt, step, forward_backward


def torch_float64_reference(hf, tokens, targets, lengths):
    """A float64 copy of the torch model (same trainable set) after one forward + backward on
    the batch: (model, loss)."""
    import copy
    import torch
    hf64 = copy.deepcopy(hf).double()
    for p in hf64.parameters():
        p.grad = None
    out = hf64(input_ids=torch.from_numpy(tokens),
               attention_mask=torch.from_numpy(attention_mask(tokens, lengths)),
               labels=torch.from_numpy(targets))
    out.loss.backward()
    return hf64, out.loss.item()


# ---- FLOP model -------------------------------------------------------------------------------
def encoder_step_flops(c, B: int, T: int, k: int, n_real: int | None = None,
                       top_rows: int | None = None) -> "C.StepFlops":
    """Model FLOPs of one training step of a BERT classifier with train_last(k) (the last k
    blocks, the pooler and the classifier trainable), on B sequences padded to T, n_real of
    the B T positions real (default all).

    Counted as common.step_flops counts a decoder: matmuls only, a multiply-add = 2 FLOPs,
    attention's recomputation not counted. N = n_real: the engine's blocks run the real
    positions alone (Packing); attention is counted over the whole T x T square, 4 B H T^2 D
    forward (the engine's kernel computes padded query rows over the valid keys; torch's SDPA
    masks). The pooler reads the top block's output at the first position of each sequence
    only, so there the output projection and the MLP run on those top_rows = B rows (q, k, v
    and attention on every position), as the engine runs them. Torch runs all B T positions
    everywhere: encoder_step_flops(c, B, T, k, B * T, B * T), reported beside
    (torch_extra_flops).
      forward     every block (q, k, v, o; up, down; attention) and the head: the pooler
                  (B, C) @ (C, C) on the first position of each sequence, the classifier
                  (B, C) @ (C, K)
      backward    the classifier's and the pooler's weight gradients, their input gradients
                  (the pooler's only when a block trains); the last k blocks at 2x their forward,
                  except the lowest trainable block's q, k, v input gradients (nothing below it
                  trains: the engine skips them)
    """
    N = B * T if n_real is None else n_real
    C_, H, D, F, L = c.d_model, c.n_head, c.head_dim, c.d_ff, c.n_layer
    K = len(c.labels)

    def block(top):    # q, k, v, o, up, down as (rows, in, out)
        m = (B if top_rows is None else top_rows) if top else N
        return [(N, C_, H * D)] * 3 + [(m, H * D, C_), (m, C_, F), (m, F, C_)]
    attn = 4.0 * B * H * T * T * D            # QK^T and PV over the whole square
    gemms: dict = {}

    def add(shape, times=1):
        if times:
            gemms[shape] = gemms.get(shape, 0.0) + times * 2.0 * shape[0] * shape[1] * shape[2]

    for s in block(False):                    # the q projection's shape goes first: its rate
        add(s, L - 1)                         # is the one attention is charged at
    for s in block(True):
        add(s)
    pooler, classifier = (B, C_, C_), (B, C_, K)
    add(pooler)
    add(classifier)
    fwd_blocks = sum(2.0 * a * b * d for i in range(L) for a, b, d in block(i == L - 1)) + L * attn
    fwd_head = 2.0 * B * C_ * (C_ + K)
    add((K, B, C_))                            # classifier dW (K, C) = dlogits^T (K, B) @ pooled (B, C)
    add((B, K, C_))                            # d pooled (B, C) = dlogits (B, K) @ W (K, C)
    add((C_, B, C_))                           # pooler dW
    bwd_head = 2.0 * B * C_ * (2 * K + C_)
    if k:
        add((B, C_, C_))                       # d cls (B, C): into the top block
        bwd_head += 2.0 * B * C_ * C_
    bwd_blocks = 0.0
    for i in range(k):
        lowest = i == k - 1
        for j, (M, Kk, Nn) in enumerate(block(i == 0)):
            if not (lowest and j < 3):         # dX of q, k, v: not below the lowest trainable block
                add((M, Nn, Kk))
                bwd_blocks += 2.0 * M * Nn * Kk
            add((Nn, M, Kk))                   # dW (N, K) = dY^T (N, M) @ X (M, K)
            bwd_blocks += 2.0 * Nn * M * Kk
        bwd_blocks += 2 * attn                # dP, dV, dQ, dK
    parts = {"forward_blocks": fwd_blocks, "forward_head": fwd_head, "backward_head": bwd_head,
             "backward_blocks": bwd_blocks}
    return C.StepFlops(sum(parts.values()), parts, gemms, attention=attn * (L + 2 * k))


def torch_extra_flops(c, B: int, T: int, k: int, n_real: int | None = None) -> float:
    """What torch's step computes beyond encoder_step_flops: every block at the padding, and
    the top block's output projection and MLP at the positions the pooler does not read."""
    return (encoder_step_flops(c, B, T, k, B * T, B * T).total
            - encoder_step_flops(c, B, T, k, n_real).total)


def probe_flops(model, B: int, T: int) -> dict:
    """engine.probes.block_costs' prediction of the same step, beside this bench's count: the
    probe also charges attention's backward with the recomputed scores (2.5x its forward, not
    2x), which is hardware work and not counted here."""
    from engine import probes
    rows = probes.block_costs(model, B, T)
    total = sum(r["fwd_flops"] + r["dx_flops"] + r["dw_flops"] for r in rows)
    recompute = sum(0.5 * r["attn_fwd_flops"] for r in rows if r["attn_bwd_flops"])
    return {"total": total, "attention_recompute": recompute, "total_without_recompute": total - recompute}


# ---- worker subprocesses ----------------------------------------------------------------------
def _worker(args) -> dict:
    """One side alone in a fresh process: load, reset the peak, one warm-up step and
    `worker_steps` steps. Two peaks: the whole process (imports + load + steps) and the steps
    alone (VmHWM reset after the load)."""
    t0 = time.perf_counter()
    C.quiet_hf()
    C.set_thread_env(args.threads)
    C.ensure_repo_on_path()
    import numpy as np
    # the batch and the engine's head, from the main process: tokenizing here would add the
    # tokenizer to this side's memory
    batch = dict(np.load(args.batch_file))
    tokens, targets, lengths = batch["tokens"], batch["targets"], batch["lengths"]
    if args.worker == "engine":
        import engine
        import kernels.jit  # noqa: F401
        C.pin_threads(args.threads, torch=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = engine.load(model_path(), labels=LABELS)
        if any(not np.array_equal(a, batch[n]) for n, a in engine_head_as_hf(model).items()):
            raise RuntimeError("the engine's new head differs from the main process's")
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        C.pin_threads(args.threads, numba=False)
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        hf = load_hf(model_path())
        copy_head(hf, {n: batch[n] for n in HEAD_HF})
    t_load = time.perf_counter() - t1
    if args.worker == "engine":
        _, step = engine_side(model, args.train_last, args.lr, tokens, targets, lengths)
    else:
        _, step, _ = torch_side(hf, args.train_last, args.lr, tokens, targets, lengths)
    return C.measure_worker(args.worker, step, args.worker_steps, t_import, t_load)


def _worker_argv(args, side, batch_file):
    return C.batch_worker_argv(__file__, args, side, batch_file)


# ---- the run ----------------------------------------------------------------------------------
def run(args=None) -> dict:
    parser = build_parser()
    args = C.parse_args(parser, args)
    if args.worker:
        return _worker(args)
    say = (lambda m: None) if args.quiet else C.log
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    C.quiet_hf()
    imported_early = C.set_thread_env(args.threads)
    worker_env = dict(os.environ)
    omp_wait_at_torch = os.environ.get("OMP_WAIT_POLICY")
    import numpy as np
    import torch  # noqa: F401
    C.ensure_repo_on_path()
    import engine
    threads = C.pin_threads(args.threads)

    k = args.train_last
    path = model_path()
    t_eload, model = C.timed(engine.load, path, labels=LABELS)
    c = model.config
    L = c.n_layer
    check_args(parser.prog, args, L, c.max_seq_len)
    tokens, targets, lengths, data_what = make_batch(path, args.batch_size, args.seq_len, args.data,
                                                     args.seed, c.vocab_size)
    B, T = tokens.shape                # claims: T is the longest text of the batch
    real = int(lengths.sum())
    say(f"{model}; engine.load {t_eload:.1f} s; batch: {data_what}")
    t_hload, hf = C.timed(load_hf, path)
    head = engine_head_as_hf(model)
    copy_head(hf, head)
    wdiff = weights_diff(model, hf)
    say(f"transformers load {t_hload:.1f} s; weights max |engine - transformers| = {wdiff:.3g} "
        "(the engine's new classifier copied into torch's)")
    if wdiff != 0:
        raise AssertionError(f"{NAME}: the two sides hold different weights (max diff {wdiff})")

    attn_impl = getattr(hf.config, "_attn_implementation", None)
    eopt, engine_step = engine_side(model, k, args.lr, tokens, targets, lengths)
    topt, torch_step, torch_fwd_bwd = torch_side(hf, k, args.lr, tokens, targets, lengths)

    # 1. verification on the first step
    say("verify: first step on both sides, and a float64 copy of the torch model")
    t0 = time.perf_counter()
    model.zero_grad()
    e_loss = model.forward(tokens, targets, lengths=lengths)
    t_fwd = time.perf_counter() - t0
    model.backward()
    t_fb = time.perf_counter() - t0
    topt.zero_grad()
    t_first_torch, t_loss = C.timed(torch_fwd_bwd)
    t_loss = t_loss.item()
    t_ref, (hf64, loss64) = C.timed(torch_float64_reference, hf, tokens, targets, lengths)
    check = C.verify_grads(model, hf, e_loss, t_loss, args.loss_tol, args.grad_tol, NAME,
                           hf64=hf64, loss64=loss64)
    del hf64
    # a 6-block model: the two float32 sides also agree within the fixed tolerances (gpt2-small's
    # check), which is enforced too
    if not (check["loss_rel_err"] <= args.loss_tol and check["grad_max_rel_err"] <= args.grad_tol):
        raise AssertionError(f"{NAME}: engine vs torch float32: loss rel {check['loss_rel_err']:.3g} "
                             f"(tol {args.loss_tol}), grads {check['grad_max_rel_err']:.3g} "
                             f"({check['grad_worst_tensor']}, tol {args.grad_tol})")
    check["weights_max_abs_diff"] = wdiff
    check["float64_reference_s"] = t_ref
    g64 = check["grad_max_rel_err_vs_f64"]
    say(f"verify OK: loss engine {e_loss:.6f}, torch {t_loss:.6f}, float64 {loss64:.6f}; grads vs "
        f"float64: engine {g64['engine']:.2g} ({g64['engine_worst_tensor']}), torch float32 "
        f"{g64['torch']:.2g}; engine vs torch {check['grad_max_rel_err']:.2g}")
    t_opt_first, _ = C.timed(eopt.step)
    topt.step()
    losses_e, losses_t = [e_loss], [t_loss]
    first = {"engine_forward_s": t_fwd, "engine_forward_backward_s": t_fb,
             "engine_optimizer_s": t_opt_first, "engine_step_s": t_fb + t_opt_first,
             "torch_forward_backward_s": t_first_torch}

    # 2. warm-up, matmul rate, alternating timed repeats, matmul rate again, profile
    flops = encoder_step_flops(c, B, T, k, real)
    probe = probe_flops(model, B, T)
    tm = C.time_alternating(args, model.config, B, T, k, engine_step, torch_step, losses_e,
                            losses_t, say, flops=flops)
    blas_in_engine_steps, gemm_eff = tm["blas_in_engine_steps"], tm["gemm_eff"]
    e_times, t_times, prof = tm["e_times"], tm["t_times"], tm["prof"]
    threads = C.thread_counts()

    # 3. each side alone
    workers = {}
    if not args.no_workers:
        tmp = tempfile.mkdtemp(prefix="tailtune-bench-minilm-")
        try:
            batch_file = os.path.join(tmp, "batch.npz")
            np.savez(batch_file, tokens=tokens, targets=targets, lengths=lengths, **head)
            for side in ("engine", "torch"):
                say(f"{side} alone in a subprocess (peak RSS)")
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
        med_t = float(np.median(times))
        w = w or {}
        iso = w.get("step_s", [])[1:]
        return {"examples_per_s": C.summarize([B / t for t in times]),
                "tokens_per_s": C.summarize([real / t for t in times]),
                "padded_tokens_per_s": C.summarize([B * T / t for t in times]),
                "step_s": C.summarize(times),
                "mfu": flops.total / (med_t * gemm_eff * 1e9),
                "achieved_gflops": flops.total / med_t / 1e9,
                "peak_rss_mib": w.get("peak_rss_mib"), "peak_rss_steps_mib": w.get("peak_rss_steps_mib"),
                "rss_after_load_mib": w.get("rss_after_load_mib"),
                "alone_examples_per_s": C.summarize([B / t for t in iso]) if iso else None,
                "alone_tokens_per_s": C.summarize([real / t for t in iso]) if iso else None}
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
    result = {
        "workload": NAME,
        "setup": {"model": f"all-MiniLM-L6-v2 ({path}) + a new classifier over {len(LABELS)} labels",
                  "labels": LABELS, "n_layer": L, "d_model": c.d_model, "n_head": c.n_head,
                  "head_dim": c.head_dim, "d_ff": c.d_ff, "vocab_size": c.vocab_size,
                  "batch_size": B, "seq_len": T, "seq_len_limit": args.seq_len,
                  "lengths": lengths.tolist(), "real_tokens_per_step": real,
                  "padded_tokens_per_step": B * T, "train_last": k, "data": data_what,
                  "trainable": f"blocks {L - k}..{L - 1} + pooler + classifier (embeddings frozen)",
                  "optimizer": f"AdamW lr={args.lr} betas=(0.9, 0.999) eps=1e-8 weight_decay=0",
                  "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                  "threads": args.threads,
                  "torch_model": f"{type(hf).__name__} (AutoModelForSequenceClassification, "
                                 "dropouts 0)",
                  "torch_attn_implementation": attn_impl,
                  "engine_gemm_backend": _gemm_backend(),
                  "load_s": {"engine": t_eload, "transformers": t_hload}},
        "verify": check,
        "engine": eng,
        "torch": tor,
        **C.timing_fields(tm, eng, tor),
        "torch_extra_flops": {
            "flops": torch_extra_flops(c, B, T, k, real),
            "what": "work beyond flops.total that torch's step does: every block at the "
                    "padding (the engine's blocks skip it), and the top block's output "
                    "projection and MLP at positions other than the first (the pooler reads "
                    "that one; the engine runs those on the first positions only)"},
        "flops_probe": {**probe, "what": "engine.probes.block_costs(model, B, T), which "
                        "knows no padding: total without attention's recomputation should "
                        "equal encoder_step_flops at n_real = B T",
                        "padded_model_flops": encoder_step_flops(c, B, T, k).total},
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
        f"{NAME}: {s['model']}, B={s['batch_size']} x T={s['seq_len']} ({s['real_tokens_per_step']} "
        f"real tokens of {s['padded_tokens_per_step']} padded), {s['trainable']}, {s['optimizer']}",
        f"batch: {s['data']}",
        f"torch: {s['torch_model']}, attention {s['torch_attn_implementation']}",
        f"threads: numba {th.get('numba_threads')} ({th.get('numba_threading_layer')}), "
        f"torch {th.get('torch_threads')}; {s['steps_per_repeat']} step(s) x {s['repeats']} "
        f"alternating repeats after {s['warmup']} warm-up; load: engine "
        f"{s['load_s']['engine']:.1f} s, transformers {s['load_s']['transformers']:.1f} s",
        f"verify: weights identical (max diff {v['weights_max_abs_diff']:.1g}); {v['grad_tensors']} "
        f"trainable tensors, {v['trainable_params'] / 1e6:.2f}M params",
        f"  loss: engine {v['loss_engine']:.6f}, torch {v['loss_torch']:.6f} (rel {v['loss_rel_err']:.1e}), "
        f"float64 {v['loss_float64']:.6f} (rel err engine {v['loss_rel_err_vs_f64']['engine']:.1e}, "
        f"torch {v['loss_rel_err_vs_f64']['torch']:.1e})",
        f"  grads, max rel err: engine vs torch {v['grad_max_rel_err']:.1e} ({v['grad_worst_tensor']}); "
        f"vs float64: engine {v['grad_max_rel_err_vs_f64']['engine']:.1e}, torch float32 "
        f"{v['grad_max_rel_err_vs_f64']['torch']:.1e}: OK",
        "",
    ]

    def mib(x):
        return "-" if x is None else f"{x:.0f}"

    def alone(x):
        return "-" if not x else f"{x['median']:.1f}"
    rows = [[name, C.fmt_range(d["examples_per_s"], "{:.1f}"), C.fmt_range(d["tokens_per_s"], "{:.0f}"),
             C.fmt_range(d["step_s"], "{:.3f}"), f"{100 * d['mfu']:.1f}%", f"{d['achieved_gflops']:.0f}",
             mib(d["peak_rss_mib"]), mib(d["peak_rss_steps_mib"]), alone(d["alone_examples_per_s"])]
            for name, d in (("tailtune", e), ("torch", t))]
    lines.append(C.table(["", "examples/s median [min-max]", "tokens/s (real)", "s/step", "MFU",
                          "GFLOP/s", "peak RSS MiB", "steps' peak", "alone ex/s"], rows))
    ratio, p = r["ratio_engine_over_torch"], r["ratio_engine_over_torch"]["paired"]
    f, m, pr = r["flops"]["parts"], r["matmul"], r["flops_probe"]
    lines += [
        f"engine/torch examples/s (= tokens/s): {ratio['tokens_per_s']:.2f}x (per-repeat pairs: "
        f"median {p['median']:.2f}x, {p['min']:.2f}-{p['max']:.2f})",
        "",
        f"model FLOPs/step {C.fmt_si(r['flops']['total'], 'FLOP')} on the batch's real "
        f"positions (of {s['padded_tokens_per_step']} padded): forward blocks {f['forward_blocks'] / 1e9:.2f} G "
        f"+ pooler/classifier {f['forward_head'] / 1e6:.1f} M, backward last {s['train_last']} "
        f"blocks {f['backward_blocks'] / 1e9:.2f} G + head {f['backward_head'] / 1e6:.1f} M "
        f"(engine.probes.block_costs on the padded batch: {pr['total_without_recompute'] / 1e9:.2f} G "
        f"without attention's recomputation)",
        f"torch also computes every block at the padding, and the top block's output projection "
        f"and MLP at the positions the pooler does not read: "
        f"{r['torch_extra_flops']['flops'] / 1e9:.2f} G more "
        f"({100 * r['torch_extra_flops']['flops'] / r['flops']['total']:.0f}% of the model FLOPs)",
        f"MFU denominator: numpy.matmul fp32 on the step's {len(m['per_shape'])} GEMM shapes, "
        f"{m['effective_gflops']:.0f} GFLOP/s (before {m['effective_gflops_before']:.0f}, after "
        f"{m['effective_gflops_after']:.0f})",
    ]
    fs = r["first_step_in_process"]
    lines.append(f"first engine step in this process {fs['engine_step_s']:.2f} s (forward "
                 f"{fs['engine_forward_s']:.2f} s); first torch forward+backward "
                 f"{fs['torch_forward_backward_s']:.2f} s")
    w = r["workers"]
    if w:
        lines.append("workers (each side alone): peak RSS = whole process (imports, load, steps); "
                     "steps' peak = VmHWM reset after the load; after load "
                     + ", ".join(f"{k} {mib(x.get('rss_after_load_mib'))} MiB" for k, x in w.items()))
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
