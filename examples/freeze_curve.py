"""Quality versus the number of trainable last blocks (Lee et al. 2019, "What would Elsa do?"),
at laptop scale: SmolLM2-135M-Instruct (30 blocks) on the insurance-claims triage example.

For each k, fine-tune the last k blocks + the final norm (k = 0: the final norm only; k = 30:
every block, embeddings frozen) with the same data, seed, steps, batch size and learning rate,
then measure
  quality   held-out loss on examples/claims/test.jsonl (all 80 rows) and field accuracy of
            greedy answers on its first --eval-rows rows (examples/claims/evaluate.py);
            relative to full fine-tuning (k = 30)
  cost      median step time (first epoch, which also computes the frozen prefix, and later
            epochs, which read it from the in-memory prefix cache), peak RSS (VmHWM) of the
            training process
Each (k, lr) runs in its own subprocess; its result is kept in --work/k{K}_lr{LR}/result.json,
so an interrupted sweep continues where it stopped (--force reruns). Writes results.json,
results.csv, results.md and freeze_curve.png to --out; a sweep with a run missing (--report-only
before every run is done) writes none.

Where: the published results (examples/freeze_curve/, tracked in git) and their runs
(runs/freeze_curve/, what --report-only rebuilds them from) are used only when every setting is
the reported experiment's: the defaults plus --eval-base. Any other settings put both tables and
runs in runs/freeze_curve_quick/, so a quick look cannot overwrite the published results; that
directory keeps the latest such sweep (a run there with other settings is redone). --out and
--work override either default.

    python examples/freeze_curve.py --eval-base        # the reported table: 2209 s (37 minutes)
                                                       # of compute on the shared 2-core machine
    python examples/freeze_curve.py --ks 0,2,30 --epochs 1 --eval-rows 10   # a quick look
    python examples/freeze_curve.py --lrs 1e-4,3e-4               # best of two rates per k
    python examples/freeze_curve.py --eval-base --report-only     # redo the reported tables/plot
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLAIMS = os.path.join(HERE, "claims")
FIELDS = ("category", "severity", "fraud risk", "route")

# Defaults of the reported run (examples/freeze_curve/README.md), which adds --eval-base: 2209 s
# (37 minutes) of compute on the 2-core machine of 12-01.
DEFAULT_KS = "0,2,4,8,15,30"
DEFAULT_EPOCHS = 2.0
DEFAULT_LR = "3e-4"
DEFAULT_EVAL_ROWS = 40
PUBLISHED = os.path.join(HERE, "freeze_curve")             # tracked in git
PUBLISHED_WORK = os.path.join(ROOT, "runs", "freeze_curve")
QUICK = os.path.join(ROOT, "runs", "freeze_curve_quick")   # tables and runs of any other settings


def _parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default=DEFAULT_KS, help=f"trainable last-block counts (default {DEFAULT_KS})")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the 480 rows)")
    ap.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS,
                    help=f"passes over the training rows (default {DEFAULT_EPOCHS:g})")
    ap.add_argument("--lrs", "--lr", default=DEFAULT_LR, help="peak learning rate(s), comma separated; "
                    f"with several, each k keeps the one with the lowest held-out loss (default {DEFAULT_LR})")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-rows", type=int, default=DEFAULT_EVAL_ROWS, help="held-out rows answered "
                    f"by greedy generation for field accuracy (default {DEFAULT_EVAL_ROWS}; 0: skip)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=os.path.join(CLAIMS, "train.jsonl"))
    ap.add_argument("--eval-data", default=os.path.join(CLAIMS, "test.jsonl"))
    ap.add_argument("--out", help="tables and plot (default: examples/freeze_curve/ with the reported "
                    "experiment's settings, else runs/freeze_curve_quick/)")
    ap.add_argument("--work", help="run directories: metrics, summaries; models deleted after evaluation "
                    "(default: runs/freeze_curve/ with the reported experiment's settings, else "
                    "runs/freeze_curve_quick/)")
    ap.add_argument("--keep-models", action="store_true", help="keep each run's fine-tuned model "
                    "(540 MB each)")
    ap.add_argument("--eval-base", action="store_true", help="also score the base model's answers")
    ap.add_argument("--force", action="store_true", help="rerun even where a result exists")
    ap.add_argument("--report-only", action="store_true", help="no runs: tables and plot from --work")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def _steps(a) -> int:
    n_train = sum(1 for line in open(a.data, encoding="utf-8") if line.strip())
    return a.steps or max(1, math.ceil(a.epochs * n_train / a.batch_size))


def _settings(a) -> dict:
    """What a sweep measures: not where it writes, nor --force, --report-only, --keep-models."""
    return {"ks": sorted({int(k) for k in a.ks.split(",")}),
            "lrs": sorted({float(x) for x in a.lrs.split(",")}), "steps": _steps(a),
            "batch_size": a.batch_size, "seq_len": a.seq_len, "seed": a.seed, "eval_rows": a.eval_rows,
            "model": a.model, "data": os.path.abspath(a.data), "eval_data": os.path.abspath(a.eval_data),
            "eval_base": bool(a.eval_base and a.eval_rows)}


def _where(ap, a) -> tuple[bool, str, str]:
    """(reported?, --out, --work). Only the reported experiment's settings (the defaults plus
    --eval-base) may replace the published results and the runs they are rebuilt from; anything
    else goes to a directory of its own, unless --out / --work say otherwise."""
    reported = _settings(a) == _settings(ap.parse_args(["--eval-base"]))
    return (reported, a.out or (PUBLISHED if reported else QUICK),
            a.work or (PUBLISHED_WORK if reported else QUICK))


# ---- one run, in a child process ------------------------------------------------------------
def _vm(field: str, pid="self") -> int:
    """A /proc/<pid>/status field in bytes (VmHWM: peak resident set size); 0 where there is no
    /proc (macOS, Windows): the table then has no memory column's figures, the runs still count."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _load_evaluate():
    # by path: a module named `evaluate` may also be installed (Hugging Face's)
    spec = importlib.util.spec_from_file_location("claims_evaluate", os.path.join(CLAIMS, "evaluate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.evaluate


def run_child(cfg: dict) -> None:
    import numpy as np

    from engine.train import TrainArgs, finetune
    run_dir = cfg["run_dir"]
    train_dir = os.path.join(run_dir, "train")   # finetune wants an empty directory of its own
    t0 = time.perf_counter()
    args = TrainArgs(model=cfg["model"], data=cfg["data"], eval_data=cfg["eval_data"], out=train_dir,
                     train_last=cfg["k"], steps=cfg["steps"], batch_size=cfg["batch_size"],
                     seq_len=cfg["seq_len"], lr=cfg["lr"], seed=cfg["seed"], sample_tokens=0,
                     prefix_cache="memory")
    summary = finetune(args, log=lambda m: print(m, flush=True))
    train_s = time.perf_counter() - t0
    peak_train = _vm("VmHWM")          # before the evaluation loads a second copy of the model
    recs = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
    step_s = [r["tokens"] / r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
    per_epoch = _steps_per_epoch(cfg)
    first, later = step_s[:per_epoch], step_s[per_epoch:]
    res = {"config": _key(cfg), "k": cfg["k"], "lr": cfg["lr"], "steps": cfg["steps"],
           "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
           "eval_loss_before": summary["eval_loss_before"], "eval_loss": summary["eval_loss_after"],
           "train_loss_last10": float(np.mean([r["loss"] for r in recs if "loss" in r][-10:])),
           "step_s_first_epoch": float(np.median(first)),
           "step_s_later": float(np.median(later)) if later else None,
           "step_s_all": [round(s, 4) for s in step_s], "steps_per_epoch": per_epoch,
           "train_seconds": train_s, "finetune_seconds": summary["seconds"],
           "peak_rss_bytes": peak_train, "prefix_cache": summary.get("prefix_cache")}
    if cfg["eval_rows"]:
        t1 = time.perf_counter()
        acc = _load_evaluate()(summary["model_dir"], cfg["eval_data"], limit=cfg["eval_rows"],
                               log=lambda m: print(m, flush=True))
        res["accuracy"] = acc
        res["eval_seconds"] = time.perf_counter() - t1
    res["seconds"] = time.perf_counter() - t0
    res["cpu_seconds"] = sum(os.times()[:4])   # user + system, with any compile child
    res["git"] = _git_state()
    if not cfg["keep_models"]:
        shutil.rmtree(summary["model_dir"], ignore_errors=True)
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(res, f, indent=1)


def _git_state() -> dict:
    """The commit, and the engine/kernel files that differed from it (other work in progress
    in a shared checkout changes what a run measures)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "engine", "kernels").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "dirty": dirty}


def base_child(cfg: dict) -> None:
    t0 = time.perf_counter()
    acc = _load_evaluate()(cfg["model"], cfg["eval_data"], limit=cfg["eval_rows"],
                           log=lambda m: print(m, flush=True))
    with open(os.path.join(cfg["run_dir"], "result.json"), "w") as f:
        json.dump({"config": _key(cfg), "accuracy": acc, "seconds": time.perf_counter() - t0}, f, indent=1)


def _key(cfg):
    """What makes a result reusable: everything but paths of outputs and bookkeeping."""
    return {k: v for k, v in cfg.items() if k not in ("run_dir", "keep_models", "base")}


# ---- the sweep --------------------------------------------------------------------------------
def _spawn(cfg: dict, script: str = __file__) -> tuple[int, float, int]:
    """Run one child (`script --child CFG`); returns (exit code, wall seconds, VmHWM seen from
    outside in bytes)."""
    os.makedirs(cfg["run_dir"], exist_ok=True)
    log = open(os.path.join(cfg["run_dir"], "log.txt"), "w")
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", json.dumps(cfg)],
                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    hwm = 0
    while p.poll() is None:     # also watched from outside (covers the evaluation too)
        try:
            hwm = max(hwm, _vm("VmHWM", p.pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        time.sleep(0.5)
    log.close()
    return p.returncode, time.perf_counter() - t0, hwm


def _fresh(run_dir, cfg) -> dict | None:
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    return res if res.get("config") == _key(cfg) else None


def result_of(cfg: dict, a, name: str, announce: str = "", script: str = __file__) -> dict | None:
    """A run's result: reused while its settings match (unless --force), else run now in its
    own process (`script --child`); None under --report-only when there is none (said)."""
    res = None if a.force else _fresh(cfg["run_dir"], cfg)
    if res is not None:
        return res
    if a.report_only:
        print(f"{name}: no result in {cfg['run_dir']}", flush=True)
        return None
    if os.path.isdir(cfg["run_dir"]):
        shutil.rmtree(cfg["run_dir"])
    if announce:
        print(f"{name}: {announce}", flush=True)
    rc, wall, hwm = _spawn(cfg, script)
    if rc != 0:
        sys.exit(f"{name} failed (exit {rc}); see {cfg['run_dir']}/log.txt")
    res = _fresh(cfg["run_dir"], cfg)
    res["wall_seconds"], res["peak_rss_bytes_with_eval"] = wall, hwm
    with open(os.path.join(cfg["run_dir"], "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def sweep(a) -> list[dict]:
    ks = [int(k) for k in a.ks.split(",")]
    lrs = [float(x) for x in a.lrs.split(",")]
    steps = _steps(a)
    common = dict(model=a.model, data=os.path.abspath(a.data), eval_data=os.path.abspath(a.eval_data),
                  steps=steps, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
                  eval_rows=a.eval_rows, keep_models=a.keep_models)
    jobs = [dict(common, k=k, lr=lr, run_dir=os.path.join(a.work, f"k{k}_lr{lr:g}")) for k in ks for lr in lrs]
    if a.eval_base and a.eval_rows:
        jobs.insert(0, dict(model=a.model, eval_data=common["eval_data"], eval_rows=a.eval_rows,
                            base=True, run_dir=os.path.join(a.work, "base")))
    results, missing, t_all = [], 0, time.perf_counter()
    for i, cfg in enumerate(jobs):
        name = "base model" if cfg.get("base") else f"k={cfg['k']} lr={cfg['lr']:g}"
        res = result_of(cfg, a, f"[{i + 1}/{len(jobs)}] {name}", f"running ({steps} steps; log in "
                        f"{os.path.relpath(cfg['run_dir'], ROOT)}/log.txt)")
        if res is None:
            missing += 1
            continue
        res["base"] = bool(cfg.get("base"))
        results.append(res)
        if res["base"]:
            print(f"[{i + 1}/{len(jobs)}] {name}: {_acc_str(res['accuracy'])}", flush=True)
        else:
            print(f"[{i + 1}/{len(jobs)}] {name}: held-out loss {res['eval_loss_before']:.3f} -> "
                  f"{res['eval_loss']:.3f}; {_acc_str(res.get('accuracy'))}; step "
                  f"{res['step_s_first_epoch']:.2f} s / {res['step_s_later'] or float('nan'):.2f} s; "
                  f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB; {res.get('wall_seconds', 0):.0f} s",
                  flush=True)
    print(f"sweep: {time.perf_counter() - t_all:.0f} s here; compute of the runs "
          f"{sum(r.get('wall_seconds', 0) for r in results):.0f} s", flush=True)
    if missing:   # partial tables would replace complete ones
        sys.exit(f"{missing} of {len(jobs)} runs have no result in {a.work}: no tables written")
    return results


def _acc_str(acc):
    if not acc:
        return "no accuracy"
    return f"exact {acc['exact_match']:.0%} (" + ", ".join(f"{f} {acc[f]:.0%}" for f in FIELDS) + ")"


# ---- tables and plot --------------------------------------------------------------------------
def _mean_field(acc):
    return sum(acc[f] for f in FIELDS) / len(FIELDS)


def _steps_per_epoch(cfg) -> int:
    with open(cfg["data"], encoding="utf-8") as f:
        return math.ceil(sum(1 for line in f if line.strip()) / cfg["batch_size"])


def summarize(results: list[dict], n_layer: int = 30) -> dict:
    runs = [r for r in results if not r["base"]]
    base = next((r for r in results if r["base"]), None)
    best = {}
    for r in runs:   # per k, the rate with the lowest held-out loss
        if r["k"] not in best or r["eval_loss"] < best[r["k"]]["eval_loss"]:
            best[r["k"]] = r
    full = best.get(n_layer)
    rows = []
    for k in sorted(best):
        r = best[k]
        acc = r.get("accuracy")
        per_epoch = r.get("steps_per_epoch") or _steps_per_epoch(r["config"])
        row = {"k": k, "lr": r["lr"], "steps": r["steps"], "trainable_params": r["trainable_params"],
               "eval_loss_before": r["eval_loss_before"], "eval_loss": r["eval_loss"],
               "train_loss_last10": r["train_loss_last10"],
               "step_s_first_epoch": r["step_s_first_epoch"], "step_s_later": r["step_s_later"],
               # the fastest step of each phase: what a step costs when no other job competes
               "step_s_first_epoch_min": min(r["step_s_all"][:per_epoch]),
               "step_s_later_min": min(r["step_s_all"][per_epoch:]) if r["step_s_all"][per_epoch:] else None,
               "peak_rss_mib": r["peak_rss_bytes"] / 2**20, "run_seconds": r.get("wall_seconds"),
               "run_cpu_seconds": r.get("cpu_seconds"),
               # the code that made this run (a reused run may be older than the report)
               "commit": _commit_of(r)}
        if acc:
            row.update({"eval_rows": acc["examples"], "exact_match": acc["exact_match"],
                        **{f: acc[f] for f in FIELDS}, "mean_field_accuracy": _mean_field(acc)})
        if full is not None:
            gain_full = full["eval_loss_before"] - full["eval_loss"]
            row["rel_loss_gain"] = (r["eval_loss_before"] - r["eval_loss"]) / gain_full
            if acc and full.get("accuracy"):
                fa = full["accuracy"]
                row["rel_field_accuracy"] = _mean_field(acc) / _mean_field(fa) if _mean_field(fa) else None
                row["rel_exact_match"] = acc["exact_match"] / fa["exact_match"] if fa["exact_match"] else None
        rows.append(row)
    return {"rows": rows, "base_accuracy": base["accuracy"] if base else None,
            "all_runs": [{k: v for k, v in r.items() if k != "step_s_all"} for r in runs],
            "lrs_per_k": {str(k): sorted({r["lr"] for r in runs if r["k"] == k}) for k in best}}


def _commit_of(run: dict) -> str:
    git = run.get("git") or {}
    c = git.get("commit", "")[:7]
    return (c + " (with local changes)" if git.get("dirty") else c) if c else "not recorded"


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def markdown(summary: dict) -> str:
    head = ("| k | trainable params | lr | held-out loss | loss gain vs full | exact | category | severity "
            "| fraud risk | route | field acc. vs full | step s, epoch 1: median / min | step s, later (cached): "
            "median / min | peak RSS MiB | run's commit |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in summary["rows"]:
        lines.append("| " + " | ".join([
            str(r["k"]), f"{r['trainable_params'] / 1e6:.2f}M", f"{r['lr']:g}",
            f"{r['eval_loss']:.3f}", _f(r.get("rel_loss_gain"), ".0%"),
            _f(r.get("exact_match"), ".0%"), *[_f(r.get(f), ".0%") for f in FIELDS],
            _f(r.get("rel_field_accuracy"), ".0%"),
            f"{r['step_s_first_epoch']:.2f} / {r['step_s_first_epoch_min']:.2f}",
            f"{r['step_s_later']:.2f} / {r['step_s_later_min']:.2f}" if r["step_s_later"] else "",
            f"{r['peak_rss_mib']:.0f}", r.get("commit", "not recorded")]) + " |")
    rows = summary["rows"]
    note = ""
    if rows:
        n = rows[0].get("eval_rows")
        note = (f"\nHeld-out loss: all rows of test.jsonl (before fine-tuning {rows[0]['eval_loss_before']:.3f}). "
                + (f"Accuracies: greedy answers to the first {n} held-out rows. " if n else
                   "No accuracies (--eval-rows 0). ") + "Loss gain vs full = "
                "(loss_before - loss_k) / (loss_before - loss_30); field acc. vs full = mean of the four "
                "field accuracies / that of k = 30. Step times: median over the phase's steps, and the "
                "fastest step (the machine is shared: the median includes other jobs' load, the minimum "
                "is close to the cost on an idle machine). Peak RSS includes the in-memory prefix "
                "cache (every k below the full model). A finished run is reused while its settings "
                "match, whatever code made it: the last column says which; --force runs them again.\n")
    return head + "\n".join(lines) + "\n" + note


def write_outputs(summary: dict, out: str) -> None:
    cols = ["k", "trainable_params", "lr", "steps", "eval_loss_before", "eval_loss", "train_loss_last10",
            "rel_loss_gain", "eval_rows", "exact_match", *FIELDS, "mean_field_accuracy",
            "rel_field_accuracy", "rel_exact_match", "step_s_first_epoch", "step_s_first_epoch_min",
            "step_s_later", "step_s_later_min", "peak_rss_mib", "run_seconds", "run_cpu_seconds", "commit"]
    write_tables(summary, out, cols, markdown(summary))
    plot(summary, os.path.join(out, "freeze_curve.png"))


def write_tables(summary: dict, out: str, cols: list, md: str) -> None:
    """results.json (the summary), results.csv (its rows' `cols`) and results.md (`md`)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in summary["rows"]:
            w.writerow({c: (round(v, 5) if isinstance(v, float) else v) for c, v in r.items()})
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)


def plot(summary: dict, png: str, n_layer: int = 30) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["rows"]
    if not rows:
        return
    ks = [r["k"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    if all("rel_loss_gain" in r for r in rows):
        ax.plot(ks, [r["rel_loss_gain"] for r in rows], "o-", label="held-out loss gain / full's")
    if all(r.get("rel_field_accuracy") is not None for r in rows):
        ax.plot(ks, [r["rel_field_accuracy"] for r in rows], "s-", label="mean field accuracy / full's")
    if all(r.get("rel_exact_match") is not None for r in rows):
        ax.plot(ks, [r["rel_exact_match"] for r in rows], "^--", label="exact match / full's", alpha=0.7)
    ax.axhline(0.9, color="gray", ls=":", lw=1)
    ax.axvline(n_layer / 4, color="gray", ls=":", lw=1)
    ax.text(n_layer / 4 + 0.3, 0.02, "last quarter", color="gray", fontsize=8)
    ax.text(0.3, 0.915, "90% of full", color="gray", fontsize=8)
    ax.set_xlabel(f"trainable last blocks k (of {n_layer}; + final norm)")
    ax.set_ylabel("quality relative to full fine-tuning (k = 30)")
    ax.set_title("SmolLM2-135M-Instruct, claims triage: quality vs k")
    ax.set_xticks(ks)
    ax.set_xlim(-1, n_layer + 1)
    rel = [r.get(c) for r in rows for c in ("rel_loss_gain", "rel_field_accuracy", "rel_exact_match")]
    rel = [v for v in rel if v is not None]
    ax.set_ylim(min([0.0, *rel]) - 0.02, max([1.1, *rel]) + 0.02)   # rel is empty without k = 30
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:   # no curves relative to full without k = 30
        ax.legend(loc="lower right", fontsize=8)
    cost_panel(bx, rows, "step time (s), batch of 8 claims", rss_gib=True, xlim=(-1, n_layer + 1))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def cost_panel(bx, rows: list, ylabel: str, rss_gib: bool = False, xlim=None) -> None:
    """The plots' cost panel: each k's fastest and median step of the first epoch (which runs
    the frozen prefix) and of later ones (prefix cached), and peak RSS on a second axis."""
    ks = [r["k"] for r in rows]
    bx.plot(ks, [r["step_s_first_epoch_min"] for r in rows], "o-", color="tab:blue",
            label="step, epoch 1 (computes the prefix): fastest")
    bx.plot(ks, [r["step_s_first_epoch"] for r in rows], "o:", color="tab:blue", alpha=0.45, label="... median")
    if all(r["step_s_later"] is not None for r in rows):
        bx.plot(ks, [r["step_s_later_min"] for r in rows], "o-", color="tab:green",
                label="step, later epochs (prefix cached): fastest")
        bx.plot(ks, [r["step_s_later"] for r in rows], "o:", color="tab:green", alpha=0.45, label="... median")
    bx.set_xlabel("trainable last blocks k")
    bx.set_ylabel(ylabel)
    bx.set_xticks(ks)
    if xlim:
        bx.set_xlim(*xlim)
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    cx = bx.twinx()
    cx.plot(ks, [r["peak_rss_mib"] / (1024 if rss_gib else 1) for r in rows], "s--", color="tab:red",
            label="peak RSS")
    cx.set_ylabel(f"peak RSS of the training process ({'GiB' if rss_gib else 'MiB'})", color="tab:red")
    cx.set_ylim(bottom=0)
    h1, l1 = bx.get_legend_handles_labels()
    h2, l2 = cx.get_legend_handles_labels()
    bx.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    bx.set_title("cost: step time and peak memory")


def main():
    ap = _parser()
    a = ap.parse_args()
    if a.child:
        cfg = json.loads(a.child)
        sys.path.insert(0, ROOT)
        (base_child if cfg.get("base") else run_child)(cfg)
        return
    reported, a.out, a.work = _where(ap, a)
    a.out, a.work = os.path.abspath(a.out), os.path.abspath(a.work)   # the runs start in ROOT
    print(f"{'the reported experiment' if reported else 'not the reported settings'}: tables to "
          f"{os.path.relpath(a.out)}, runs in {os.path.relpath(a.work)}", flush=True)
    t0 = time.perf_counter()
    results = sweep(a)
    summary = summarize(results)
    summary["setup"] = {"ks": a.ks, "lrs": a.lrs, "epochs": a.epochs, "steps": a.steps,
                        "batch_size": a.batch_size, "seq_len": a.seq_len, "seed": a.seed,
                        "eval_rows": a.eval_rows, "model": a.model,
                        "compute_seconds": sum(r.get("wall_seconds", 0) for r in results),
                        "cpu_seconds": sum(r.get("cpu_seconds", 0) for r in results),
                        "report_written_at": _git_state(),
                        "runs_made_at": sorted({r["commit"] for r in summary["rows"]})}
    write_outputs(summary, a.out)
    print(markdown(summary))
    print(f"wrote {os.path.relpath(a.out)}/results.{{json,csv,md}} and freeze_curve.png "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
