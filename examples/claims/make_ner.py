"""Write the claims entity-tagging data (ner_train.jsonl, ner_test.jsonl): claim descriptions
split into words, each word tagged (IOB2) with one of four entity types or O.

The rows are synthetic, made from make_data.py's templates; they describe no real claims or
people. The entity types:
  PLACE   where it happened ("Elm Street", "the Riverside mall" tags "Riverside mall")
  MONEY   the amount claimed ("$12,400": the words "$", "12", ",", "400")
  DELAY   how long after the incident the claim is reported ("18 days")
  TENURE  how long the policy had run at the incident ("2130 days")
DELAY and TENURE are both "N days": only the words around them tell them apart.

    python examples/claims/make_ner.py      # rewrites the two files (seeded, reproducible)
"""
import json
import os
import random
import re

from make_data import CATEGORIES, INJURY, OPENERS, PLACES, RECEIPTS

WORD = re.compile(r"\w+|[^\w\s]")   # words and punctuation apart, as BERT's tokenizer splits them


def _place(name):
    """(words before the entity, the entity's words) of a place: "the" stays outside."""
    return ("the ", name[4:]) if name.startswith("the ") else ("", name)


def claim(rng):
    """[(text, entity type or None)] pieces of one claim description."""
    cat = rng.choice(sorted(CATEGORIES))
    template = rng.choice(CATEGORIES[cat])
    pieces = []
    if "{place}" in template:
        before, after = template.split("{place}")
        lead, name = _place(rng.choice(PLACES))
        pieces += [(before + lead, None), (name, "PLACE"), (after, None)]
    else:
        pieces.append((template, None))
    first = pieces[0][0]
    pieces[0] = (first[0].upper() + first[1:], None) if first else pieces[0]
    opener = rng.choice(OPENERS)
    pieces = ([(opener, None)] if opener else []) + pieces + [(".", None)]
    if rng.random() < 0.15 and cat in ("auto", "health", "liability"):
        pieces.append((rng.choice(INJURY) + ".", None))
    amount = f"${rng.choice([rng.randint(150, 1999), rng.randint(2000, 90000)]):,}"
    before, after = rng.choice([("The damage comes to ", "."), ("I am claiming ", "."),
                                ("Total cost is ", "."), ("The estimate I got is ", "."),
                                ("I paid ", " out of pocket.")])
    pieces += [(before, None), (amount, "MONEY"), (after, None)]
    late = f"{rng.randint(61, 200) if rng.random() < 0.2 else rng.randint(0, 30)} days"
    before, after = rng.choice([("This happened ", " ago."), ("The incident was ", " ago."),
                                ("It happened ", " before this report."),
                                ("I am reporting it ", " after it happened.")])
    delay = [(before, None), (late, "DELAY"), (after, None)]
    tenure_days = f"{rng.randint(3, 29) if rng.random() < 0.2 else rng.randint(120, 3000)} days"
    before, after = rng.choice([("My policy started ", " before the incident."),
                                ("I have been insured with you for ", "."),
                                ("The policy began ", " before it happened."),
                                ("I had held the policy for ", " when this happened.")])
    tenure = [(before, None), (tenure_days, "TENURE"), (after, None)]
    pieces += delay + tenure if rng.random() < 0.5 else tenure + delay   # order says nothing
    pieces.append((rng.choice(RECEIPTS), None))
    return pieces


def tagged(pieces) -> dict:
    words, tags = [], []
    for text, kind in pieces:
        ws = WORD.findall(text)
        words += ws
        tags += ["O"] * len(ws) if kind is None else [("B-" if i == 0 else "I-") + kind
                                                      for i in range(len(ws))]
    return {"tokens": words, "tags": tags}


def main():
    rng = random.Random(2027)
    rows = [tagged(claim(rng)) for _ in range(400)]
    here = os.path.dirname(os.path.abspath(__file__))
    for name, part in (("ner_train.jsonl", rows[:320]), ("ner_test.jsonl", rows[320:])):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows[:320])} training and {len(rows[320:])} test rows to {here}")


if __name__ == "__main__":
    main()
