"""Quality versus the number of trainable last blocks of an encoder, in the setting of Lee et al.
2019 ("What would Elsa do? Freezing layers during transformer fine-tuning": BERT classifiers on
GLUE), at laptop scale: all-MiniLM-L6-v2 (6 blocks) as a classifier of the claims' route
(adjuster, fast-track, special investigations; examples/claims/make_labels.py). The route
follows from numbers in the text (the amount claimed; the days between the policy's start, the
incident and the report), not from the topic words a frozen sentence encoder already separates,
so the blocks have something to learn. `--field entities`: the claims' entity tagging instead
(examples/claims/make_ner.py: a token classifier; quality is entity F1, where "accuracy" is
written below, and the majority baseline, every word O, scores 0).

For each k in --ks, each rate in --lrs and each seed in --seeds, the same run: the last k blocks
+ the classifier head (pooler and classifier; k = 0: the head alone) trainable, AdamW with
warmup + cosine, --epochs over the 480 training rows, the in-memory frozen-prefix cache on; the
seed orders the batches (the new head starts from the same draw). Per k the rate with the
lowest mean held-out loss is kept (chosen on the held-out rows themselves, as GLUE papers choose
on their dev sets: optimistic by a little for every k alike). Reported per k: held-out accuracy
and loss over all 80 test rows (mean and spread over seeds), accuracy relative to full
fine-tuning (k = 6) and its gain over the majority class relative to full's; median and fastest
step time in the first epoch (which computes the frozen prefix) and in later ones (read from the
cache); peak RSS of the training process.

Each run is its own process and keeps its result in --work/k{K}_lr{LR}_s{SEED}/result.json, so
an interrupted sweep continues where it stopped (--force reruns). The default settings write
their tables and plot to examples/freeze_curve_bert/ (tracked in git) and their runs to
runs/freeze_curve_bert/; any other settings write both to runs/freeze_curve_bert_quick/.

    python examples/freeze_curve_bert.py                  # the reported table (about 25 minutes)
    python examples/freeze_curve_bert.py --ks 0,2,6 --seeds 0 --lrs 1e-4 --epochs 2   # a look
    python examples/freeze_curve_bert.py --report-only     # tables and plot from the runs
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "claims"))
import freeze_curve as fc        # noqa: E402  (the SmolLM2 sweep: process and memory helpers)
import make_labels               # noqa: E402

N_LAYER = 6   # all-MiniLM-L6-v2's; another --model's count is read from it
ENTITIES = "entities"   # --field: the token-classification task (make_ner.py's files)
DEFAULTS = dict(ks="0,1,2,3,4,5,6", lrs="3e-5,1e-4,3e-4", seeds="0,1,2", epochs=5.0, batch_size=16,
                seq_len=128, field="route", model="minilm")
PUBLISHED = os.path.join(HERE, "freeze_curve_bert")
PUBLISHED_WORK = os.path.join(ROOT, "runs", "freeze_curve_bert")
QUICK = os.path.join(ROOT, "runs", "freeze_curve_bert_quick")


def _parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    ap.add_argument("--ks", default=d["ks"], help=f"trainable last-block counts (default {d['ks']})")
    ap.add_argument("--lrs", default=d["lrs"], help=f"peak learning rates; per k the best (default {d['lrs']})")
    ap.add_argument("--seeds", default=d["seeds"], help=f"batch orders, averaged (default {d['seeds']})")
    ap.add_argument("--epochs", type=float, default=d["epochs"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--seq-len", type=int, default=d["seq_len"])
    ap.add_argument("--field", default=d["field"], choices=(*make_labels.FIELDS, ENTITIES),
                    help=f"the claims' field to classify, or {ENTITIES}: their words' entity tags "
                    f"(default {d['field']})")
    ap.add_argument("--model", default=d["model"])
    ap.add_argument("--out", help="tables and plot (default: examples/freeze_curve_bert/ with the "
                    "default settings, else runs/freeze_curve_bert_quick/)")
    ap.add_argument("--work", help="run directories (default: runs/freeze_curve_bert/ with the "
                    "default settings, else runs/freeze_curve_bert_quick/)")
    ap.add_argument("--force", action="store_true", help="rerun even where a result exists")
    ap.add_argument("--report-only", action="store_true", help="no runs: tables and plot from --work")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def _floats(s):
    return sorted({float(x) for x in s.split(",")})


def _ints(s):
    return sorted({int(x) for x in s.split(",")})


def _settings(a) -> dict:
    return {"ks": _ints(a.ks), "lrs": _floats(a.lrs), "seeds": _ints(a.seeds), "epochs": a.epochs,
            "batch_size": a.batch_size, "seq_len": a.seq_len, "field": a.field, "model": a.model}


# ---- one run, in a child process -------------------------------------------------------------
def run_child(cfg: dict) -> None:
    from engine.train import TrainArgs, finetune
    train_dir = os.path.join(cfg["run_dir"], "train")
    t0 = time.perf_counter()
    summary = finetune(TrainArgs(
        model=cfg["model"], data=cfg["data"], eval_data=cfg["eval_data"], out=train_dir,
        train_last=cfg["k"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
        seq_len=cfg["seq_len"], lr=cfg["lr"], seed=cfg["seed"], prefix_cache="memory",
        eval_batches=0), log=lambda m: print(m, flush=True))
    peak = fc._vm("VmHWM")
    recs = [json.loads(line) for line in open(os.path.join(train_dir, "metrics.jsonl"))]
    metric = "f1" if summary["task"] == "token classification" else "accuracy"   # the quality
    step_s = [r["step_s"] for r in recs if "step_s" in r]
    per_epoch = math.ceil(cfg["n_train"] / cfg["batch_size"])
    res = {"config": _key(cfg), "k": cfg["k"], "lr": cfg["lr"], "seed": cfg["seed"],
           "steps": summary["steps"], "trainable_params": summary["trainable_params"],
           "metric": metric, "accuracy_before": summary["base_eval"][metric],
           "loss_before": summary["base_eval"]["loss"],
           "accuracy": summary["final_eval"][metric], "loss": summary["final_eval"]["loss"],
           "per_label": summary["final_eval"].get("per_label", summary["final_eval"].get("per_type")),
           "step_s_first_epoch": statistics.median(step_s[:per_epoch]),
           "step_s_first_epoch_min": min(step_s[:per_epoch]),
           "step_s_later": statistics.median(step_s[per_epoch:]) if step_s[per_epoch:] else None,
           "step_s_later_min": min(step_s[per_epoch:]) if step_s[per_epoch:] else None,
           "train_seconds": summary["train_seconds"], "peak_rss_bytes": peak,
           "prefix_cache": summary.get("prefix_cache"), "git": fc._git_state()}
    shutil.rmtree(os.path.join(train_dir, "model"), ignore_errors=True)   # 90 MB a run
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(cfg["run_dir"], "result.json"), "w") as f:
        json.dump(res, f, indent=1)


def _key(cfg):
    return {k: v for k, v in cfg.items() if k != "run_dir"}


# ---- the sweep ---------------------------------------------------------------------------------
def sweep(a, data, eval_data, n_train) -> list[dict]:
    common = dict(model=a.model, data=data, eval_data=eval_data, n_train=n_train, epochs=a.epochs,
                  batch_size=a.batch_size, seq_len=a.seq_len)
    jobs = [dict(common, k=k, lr=lr, seed=s, run_dir=os.path.join(a.work, f"k{k}_lr{lr:g}_s{s}"))
            for k in _ints(a.ks) for lr in _floats(a.lrs) for s in _ints(a.seeds)]
    results, missing, t_all = [], 0, time.perf_counter()
    for i, cfg in enumerate(jobs):
        name = f"[{i + 1}/{len(jobs)}] k={cfg['k']} lr={cfg['lr']:g} seed={cfg['seed']}"
        res = fc.result_of(cfg, a, name, script=__file__)
        if res is None:
            missing += 1
            continue
        results.append(res)
        print(f"{name}: {res.get('metric', 'accuracy')} {res['accuracy_before']:.3f} -> "
              f"{res['accuracy']:.3f}, loss {res['loss']:.3f}; step {res['step_s_first_epoch']:.3f} s "
              f"/ {res['step_s_later'] or float('nan'):.3f} s; peak RSS "
              f"{res['peak_rss_bytes'] / 2**20:.0f} MiB; {res.get('wall_seconds', 0):.0f} s", flush=True)
    print(f"sweep: {time.perf_counter() - t_all:.0f} s", flush=True)
    if missing:
        sys.exit(f"{missing} of {len(jobs)} runs have no result in {a.work}: no tables written")
    return results


# ---- tables and plot ---------------------------------------------------------------------------
def _mean_sd(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(results: list[dict], majority: float, n_layer: int = N_LAYER) -> dict:
    by = collections.defaultdict(list)
    for r in results:
        by[(r["k"], r["lr"])].append(r)
    best = {}
    for (k, lr), runs in by.items():   # per k, the rate with the lowest mean held-out loss
        loss = statistics.fmean(r["loss"] for r in runs)
        if k not in best or loss < best[k][0]:
            best[k] = (loss, lr, runs)
    rows = []
    for k in sorted(best):
        loss, lr, runs = best[k]
        acc, acc_sd = _mean_sd([r["accuracy"] for r in runs])
        med = lambda key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None  # noqa: E731
        rows.append({"k": k, "lr": lr, "seeds": len(runs), "trainable_params": runs[0]["trainable_params"],
                     "accuracy": acc, "accuracy_sd": acc_sd, "loss": loss,
                     "loss_sd": _mean_sd([r["loss"] for r in runs])[1],
                     "accuracy_before": runs[0]["accuracy_before"], "loss_before": runs[0]["loss_before"],
                     "step_s_first_epoch": med("step_s_first_epoch"),
                     "step_s_first_epoch_min": min(r["step_s_first_epoch_min"] for r in runs),
                     "step_s_later": med("step_s_later"),
                     "step_s_later_min": (min(r["step_s_later_min"] for r in runs)
                                          if runs[0]["step_s_later_min"] is not None else None),
                     "peak_rss_mib": max(r["peak_rss_bytes"] for r in runs) / 2**20,
                     "commit": fc._commit_of(runs[0])})
    full = next((r for r in rows if r["k"] == n_layer), None)
    for r in rows:
        if full is not None:
            r["rel_accuracy"] = r["accuracy"] / full["accuracy"]
            r["rel_gain_over_majority"] = ((r["accuracy"] - majority) / (full["accuracy"] - majority)
                                           if full["accuracy"] > majority else None)
    what = "entity F1" if results and results[0].get("metric") == "f1" else "accuracy"
    return {"rows": rows, "majority_accuracy": majority, "n_layer": n_layer, "quality": what,
            "all_runs": [{k: v for k, v in r.items() if k != "config"} for r in results]}


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def markdown(summary: dict) -> str:
    q = summary.get("quality", "accuracy")
    out = [f"| k | trainable params | lr | held-out {q} (mean ± sd) | held-out loss | {q} vs full "
           "| gain over majority vs full | step s, epoch 1: median / min | step s, cached prefix: median / "
           "min | peak RSS MiB | run's commit |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        out.append("| " + " | ".join([
            str(r["k"]), f"{r['trainable_params'] / 1e6:.2f}M", f"{r['lr']:g}",
            f"{r['accuracy']:.3f} ± {r['accuracy_sd']:.3f}", f"{r['loss']:.3f}",
            _f(r.get("rel_accuracy"), ".0%"), _f(r.get("rel_gain_over_majority"), ".0%"),
            f"{r['step_s_first_epoch']:.3f} / {r['step_s_first_epoch_min']:.3f}",
            (f"{r['step_s_later']:.3f} / {r['step_s_later_min']:.3f}" if r["step_s_later"] else ""),
            f"{r['peak_rss_mib']:.0f}", r["commit"]]) + " |")
    rows = summary["rows"]
    if rows:
        out.append(f"\nHeld-out: all rows of the test split (before fine-tuning: {q} "
                   f"{rows[0]['accuracy_before']:.3f}, a new head; the majority class "
                   f"{summary['majority_accuracy']:.3f}). Mean over {rows[0]['seeds']} seed(s) at "
                   f"each k's best rate. Gain over majority vs full = ({q}_k - majority) / "
                   f"({q}_{summary.get('n_layer', N_LAYER)} - majority). Step times: median over the phase's steps of all "
                   "seeds, and the fastest step (the machine is shared). Peak RSS: the training "
                   "process, with the in-memory prefix cache.")
    return "\n".join(out) + "\n"


def plot(summary: dict, png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["rows"]
    ks = [r["k"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    q = summary.get("quality", "accuracy")
    ax.errorbar(ks, [r["accuracy"] for r in rows], yerr=[r["accuracy_sd"] for r in rows], fmt="o-",
                capsize=3, label=f"held-out {q} (mean ± sd over seeds)")
    n_layer = summary.get("n_layer", N_LAYER)
    full = next((r for r in rows if r["k"] == n_layer), None)
    if full is not None:
        ax.axhline(0.9 * full["accuracy"], color="gray", ls=":", lw=1)
        ax.text(0.05, 0.9 * full["accuracy"] + 0.005, "90% of full", color="gray", fontsize=8)
    ax.axhline(summary["majority_accuracy"], color="tab:red", ls="--", lw=1, label="majority class")
    ax.axvline(n_layer / 4, color="gray", ls=":", lw=1)
    ax.text(n_layer / 4 + 0.05, summary["majority_accuracy"] + 0.01, "last quarter", color="gray", fontsize=8)
    ax.set_xlabel(f"trainable last blocks k (of {n_layer}; + classifier head)")
    ax.set_ylabel(f"held-out {q}")
    ax.set_title(title)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fc.cost_panel(bx, rows, "step time (s), batch of 16 texts")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_outputs(summary: dict, out: str, title: str) -> None:
    cols = ["k", "trainable_params", "lr", "seeds", "accuracy", "accuracy_sd", "loss", "loss_sd",
            "rel_accuracy", "rel_gain_over_majority", "step_s_first_epoch", "step_s_first_epoch_min",
            "step_s_later", "step_s_later_min", "peak_rss_mib", "commit"]
    fc.write_tables(summary, out, cols, markdown(summary))
    plot(summary, os.path.join(out, "freeze_curve.png"), title)


def _n_layer(model: str) -> int:
    """The blocks of --model (a causal LM is trained as a classifier on its last token)."""
    sys.path.insert(0, ROOT)
    import engine
    return engine.load(model).config.n_layer


def main():
    ap = _parser()
    a = ap.parse_args()
    if a.child:
        sys.path.insert(0, ROOT)
        run_child(json.loads(a.child))
        return
    reported = _settings(a) == _settings(ap.parse_args([]))
    # absolute: the runs' processes start in the project's root
    a.out = os.path.abspath(a.out or (PUBLISHED if reported else QUICK))
    a.work = os.path.abspath(a.work or (PUBLISHED_WORK if reported else QUICK))
    os.makedirs(a.work, exist_ok=True)
    field = a.field.replace(" ", "_")
    if a.field == ENTITIES:     # every word O finds no entity: F1 0
        data, eval_data = (os.path.join(HERE, "claims", f"ner_{s}.jsonl") for s in ("train", "test"))
        train_rows, majority = open(data).read().splitlines(), 0.0
    else:
        data, eval_data = (os.path.join(a.work, f"{field}_{s}.jsonl") for s in ("train", "test"))
        train_rows, test_rows = make_labels.labeled("train", a.field), make_labels.labeled("test", a.field)
        make_labels.write(data, train_rows)
        make_labels.write(eval_data, test_rows)
        top = collections.Counter(r["label"] for r in train_rows).most_common(1)[0][0]
        majority = sum(r["label"] == top for r in test_rows) / len(test_rows)
    print(f"{'the reported experiment' if reported else 'not the reported settings'}: tables to "
          f"{os.path.relpath(a.out)}, runs in {os.path.relpath(a.work)}", flush=True)
    results = sweep(a, data, eval_data, len(train_rows))
    n_layer = N_LAYER if a.model == "minilm" else _n_layer(a.model)
    summary = summarize(results, majority, n_layer)
    summary["setup"] = {**_settings(a), "report_written_at": fc._git_state()}
    name = "all-MiniLM-L6-v2" if a.model == "minilm" else os.path.basename(a.model)
    write_outputs(summary, a.out, f"{name}, claims {a.field}: {summary['quality']} vs k")
    print(markdown(summary))
    print(f"wrote {os.path.relpath(a.out)}/results.{{json,csv,md}} and freeze_curve.png")


if __name__ == "__main__":
    main()
