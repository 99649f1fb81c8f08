"""Field accuracy of a model's triage answers on the held-out claims (greedy generation).

    python examples/claims/evaluate.py --model smollm2              # before fine-tuning
    python examples/claims/evaluate.py --model runs/claims/model    # after
"""
import argparse
import json
import os
import re

import engine
from engine.io.resolve import resolve_model_path

FIELDS = ("category", "severity", "fraud risk", "route")


def parse(answer: str) -> dict:
    """{field: value} from 'category: auto | severity: low | ...' (lenient about case/spaces)."""
    out = {}
    for part in re.split(r"[|\n;]", answer.lower()):
        if ":" in part:
            k, v = part.split(":", 1)
            out[k.strip()] = v.strip().rstrip(".")
    return out


def evaluate(model_path, data, limit=None, max_new_tokens=32, log=print):
    model = engine.load(model_path)
    tok = engine.load_tokenizer(resolve_model_path(model_path))
    rows = [json.loads(line) for line in open(data, encoding="utf-8")][:limit]
    hits = {f: 0 for f in FIELDS}
    exact = 0
    for i, row in enumerate(rows):
        msgs = row["messages"]
        ids = tok.chat_ids(msgs[:-1])
        out = engine.generate(model, ids, max_new_tokens=max_new_tokens, stop=tok.eos_ids)
        got = parse(tok.decode([t for t in out if t not in tok.eos_ids]))
        want = parse(msgs[-1]["content"])
        ok = [got.get(f) == want[f] for f in FIELDS]
        for f, o in zip(FIELDS, ok):
            hits[f] += o
        exact += all(ok)
        if i < 3:
            log(f"  claim {i}: got {tok.decode(out)!r}")
    n = len(rows)
    res = {"examples": n, "exact_match": exact / n, **{f: hits[f] / n for f in FIELDS}}
    log(f"{model_path}: exact match {res['exact_match']:.0%}; " +
        ", ".join(f"{f} {res[f]:.0%}" for f in FIELDS))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model path or 'smollm2'")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "test.jsonl"))
    ap.add_argument("--limit", type=int, help="only the first N rows")
    a = ap.parse_args()
    evaluate(a.model, a.data, a.limit)


if __name__ == "__main__":
    main()
