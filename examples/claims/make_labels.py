"""Write the claims as a classification task for an encoder (BERT): category_train.jsonl and
category_test.jsonl, one {"text": the customer's claim, "label": its category} row per chat of
train.jsonl / test.jsonl. The category (auto, health, liability, property, travel) follows from
what was damaged, which the text says in words: what a sentence encoder picks up.

    python examples/claims/make_labels.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    for split in ("train", "test"):
        with open(os.path.join(HERE, f"{split}.jsonl"), encoding="utf-8") as f:
            chats = [json.loads(line)["messages"] for line in f if line.strip()]
        with open(os.path.join(HERE, f"category_{split}.jsonl"), "w", encoding="utf-8") as f:
            for msgs in chats:
                text = next(m["content"] for m in msgs if m["role"] == "user")
                answer = dict(p.split(": ", 1) for p in msgs[-1]["content"].split(" | "))
                f.write(json.dumps({"text": text, "label": answer["category"]}) + "\n")


if __name__ == "__main__":
    main()
