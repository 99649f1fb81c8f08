"""Write the insurance-claims triage example data (train.jsonl, test.jsonl).

The rows are synthetic, written for this example from templates and fixed rules; they describe
no real claims or people. Each row is a chat: a claim description from a customer, and the
triage answer an adjuster's desk wants back, in one fixed format:

    category: auto | severity: medium | fraud risk: low | route: adjuster

Rules the answers follow (so a model can learn them from the text):
  category    from what was damaged (vehicle, home, medical, liability to others, travel)
  severity    from the amount claimed: under $2,000 low, up to $20,000 medium, above high;
              any injury needing hospital care makes it high
  fraud risk  high when the claim is reported more than 60 days after the incident, or the
              policy began less than 30 days before it, or receipts are cash-only; else low
  route       fraud risk high -> special investigations; else low severity -> fast-track;
              else adjuster

    python examples/claims/make_data.py      # rewrites the two files (seeded, reproducible)
"""
import json
import os
import random

SYSTEM = "You triage insurance claims. Answer with the category, severity, fraud risk and route."

CATEGORIES = {
    "auto": [
        "my car was rear-ended at a red light on {place}",
        "a delivery van scraped the side of my parked car outside {place}",
        "I hit a deer on the road near {place} and the front bumper and radiator are damaged",
        "hail dented the roof and hood of my car while it was parked at {place}",
        "someone broke the window of my car at {place} and took the stereo",
        "my motorbike slid on gravel near {place} and the frame is bent",
    ],
    "property": [
        "a pipe burst in the kitchen of my house and flooded the ground floor",
        "a storm tore shingles off the roof of our home near {place}",
        "lightning struck the garage and the electrical panel burned out",
        "a tree fell on the back fence and crushed the shed",
        "our basement flooded after heavy rain and the boiler stopped working",
        "a kitchen fire damaged the cabinets and the ceiling of the apartment",
    ],
    "health": [
        "I broke my wrist falling off a ladder at home",
        "I needed emergency dental surgery after a cracked molar",
        "my daughter was treated for a severe allergic reaction at the clinic near {place}",
        "I had knee surgery after tearing a ligament playing football",
        "I was admitted with pneumonia and stayed several nights",
        "I needed stitches after cutting my hand on broken glass",
    ],
    "liability": [
        "a customer slipped on a wet floor in my shop at {place} and is asking for compensation",
        "my dog bit a neighbour's child in the park near {place}",
        "water from my bathroom leaked into the flat below and damaged their ceiling",
        "a ball from our garden broke a neighbour's car windscreen",
        "a contractor I hired was hurt on my property and is claiming against me",
        "a tenant says a loose stair rail in my rental caused their fall",
    ],
    "travel": [
        "the airline lost my checked suitcase on a flight from {place}",
        "my flight was cancelled and I paid for an extra hotel night in {place}",
        "I fell ill abroad and had to cut my trip short and fly home early",
        "my passport and wallet were stolen from the hotel in {place}",
        "a volcanic ash cloud grounded flights and I missed a prepaid tour",
        "my ski equipment was damaged in transit to {place}",
    ],
}
INJURY = ["I was taken to hospital by ambulance", "I spent two nights in hospital",
          "the other driver was hospitalised", "I had to be admitted to hospital for surgery"]
PLACES = ["Elm Street", "the Riverside mall", "Highway 9", "Lisbon", "the station car park",
          "Oakridge", "Main Square", "Denver", "the harbour", "Kyoto", "the school gate", "Porto"]
OPENERS = ["Hello,", "Hi,", "Good morning.", "Dear claims team,", "", "To whom it may concern:",
           "Hi there,"]
RECEIPTS = ["I attached the invoice from the repair shop.", "Receipts are attached.",
            "I have card receipts for everything.", "The bills are in the attachment.",
            "I only have cash receipts, no card payments.", "All payments were made in cash, no invoices."]


def claim(rng):
    cat = rng.choice(sorted(CATEGORIES))
    what = rng.choice(CATEGORIES[cat]).format(place=rng.choice(PLACES))
    amount = rng.choice([rng.randint(150, 1999), rng.randint(2000, 20000), rng.randint(20001, 90000)])
    injury = rng.random() < 0.15 and cat in ("auto", "health", "liability")
    days_late = rng.randint(61, 200) if rng.random() < 0.18 else rng.randint(0, 30)
    policy_days = rng.randint(3, 29) if rng.random() < 0.15 else rng.randint(120, 3000)
    receipt = rng.choice(RECEIPTS[4:] if rng.random() < 0.15 else RECEIPTS[:4])
    cash = "cash" in receipt
    parts = [rng.choice(OPENERS), f"{what[0].upper()}{what[1:]}."]
    if injury:
        parts.append(rng.choice(INJURY) + ".")
    parts.append(rng.choice([f"The damage comes to ${amount:,}.", f"I am claiming ${amount:,}.",
                             f"Total cost is ${amount:,}.", f"The estimate I got is ${amount:,}."]))
    parts.append(rng.choice([f"This happened {days_late} days ago.",
                             f"The incident was {days_late} days ago.",
                             f"It happened {days_late} days before this report."]))
    parts.append(rng.choice([f"My policy started {policy_days} days before the incident.",
                             f"I have been insured with you for {policy_days} days.",
                             f"The policy began {policy_days} days before it happened."]))
    parts.append(receipt)
    text = " ".join(p for p in parts if p)
    severity = "high" if injury or amount > 20000 else ("low" if amount < 2000 else "medium")
    fraud = "high" if days_late > 60 or policy_days < 30 or cash else "low"
    route = "special investigations" if fraud == "high" else ("fast-track" if severity == "low" else "adjuster")
    answer = f"category: {cat} | severity: {severity} | fraud risk: {fraud} | route: {route}"
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]}


def main():
    rng = random.Random(2026)
    rows = [claim(rng) for _ in range(560)]
    here = os.path.dirname(os.path.abspath(__file__))
    for name, part in (("train.jsonl", rows[:480]), ("test.jsonl", rows[480:])):
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows[:480])} training and {len(rows[480:])} test rows to {here}")


if __name__ == "__main__":
    main()
