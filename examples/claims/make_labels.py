"""Write the claims as a classification task for an encoder (BERT): one {"text": the customer's
claim, "label": a field of its triage} row per chat of train.jsonl / test.jsonl.

The default field, category (auto, health, liability, property, travel), follows from what was
damaged, which the text says in words: what a sentence encoder picks up. The others follow from
numbers in the text (make_data.py): severity from the amount claimed, fraud risk from the days
between the policy's start, the incident and the report, and route from both, which is harder
for an encoder (examples/freeze_curve_bert.py uses it).

    python examples/claims/make_labels.py                 # category_{train,test}.jsonl
    python examples/claims/make_labels.py --field route   # route_{train,test}.jsonl
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ("category", "severity", "fraud risk", "route")


def labeled(split: str, field: str = "category") -> list[dict]:
    """The rows of split ("train" or "test") labeled by `field`."""
    with open(os.path.join(HERE, f"{split}.jsonl"), encoding="utf-8") as f:
        chats = [json.loads(line)["messages"] for line in f if line.strip()]
    rows = []
    for msgs in chats:
        text = next(m["content"] for m in msgs if m["role"] == "user")
        answer = dict(p.split(": ", 1) for p in msgs[-1]["content"].split(" | "))
        rows.append({"text": text, "label": answer[field]})
    return rows


def write(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--field", default="category", choices=FIELDS)
    ap.add_argument("--out", default=HERE, help="directory for the two files (default: here)")
    a = ap.parse_args()
    for split in ("train", "test"):
        write(os.path.join(a.out, f"{a.field.replace(' ', '_')}_{split}.jsonl"), labeled(split, a.field))


if __name__ == "__main__":
    main()
