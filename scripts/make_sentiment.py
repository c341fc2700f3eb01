"""Generate the classification demonstration task: short product reviews labelled negative, neutral or positive.

    python scripts/make_sentiment.py --out examples/sentiment      # train.jsonl, test.jsonl

Each line is ``{"text": "...", "label": "positive"}`` for ``scratchlm finetune --task classify --labels
negative,neutral,positive``. The reviews are made to need more than spotting one word: negations ("not bad at
all" is positive, "not great" negative), contrasts ("looked great at first, but it broke" is negative), and
neutral lines that describe without judging. The test split uses sentence templates and products that never
occur in training. One seeded generator: the same seed writes the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
GOOD = ["great", "excellent", "wonderful", "superb", "fantastic", "lovely", "solid", "impressive"]
BAD = ["awful", "terrible", "poor", "flimsy", "disappointing", "useless", "cheap-feeling", "dreadful"]
FAULTS = ["it broke after a week", "the battery died in a day", "it stopped working", "the handle snapped",
          "it leaked everywhere", "the screen cracked", "it overheated", "half the parts were missing"]
PRAISE = ["it still works perfectly", "it does exactly what it says", "I use it every day", "it exceeded my hopes",
          "my whole family loves it", "it was worth every penny", "I would buy it again", "it feels built to last"]
FACTS = ["it arrived on {day}", "it comes in {colour}", "the box holds one unit", "it weighs about {n} grams",
         "it uses {n} batteries", "the manual is {n} pages long", "it was delivered by courier",
         "it has a {colour} cover"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
COLOURS = ["blue", "grey", "black", "white", "green", "red"]
TRAIN_THINGS = ["the kettle", "this lamp", "the blender", "these headphones", "the backpack", "this chair",
                "the toaster", "this phone case", "the umbrella", "these boots", "the desk fan", "this clock"]
TEST_THINGS = ["the vacuum cleaner", "this keyboard", "the water bottle", "these scissors", "the tent",
               "this mirror"]

TEMPLATES = {
    "train": {
        "positive": ["{T} is {good}; {praise}.", "Not bad at all - {t} is {good}.", "I doubted it, but {praise}.",
                     "Honestly {good}: {praise}.", "{T} turned out {good}, and {praise}."],
        "negative": ["{T} is {bad}; {fault}.", "Not {good} at all - {fault}.", "It looked {good} at first, but "
                     "{fault}.", "Sadly {fault}, so {t} is {bad}.", "I wanted to like {t}, but {fault}."],
        "neutral": ["{T}: {fact}.", "For the record, {fact}.", "{T} is as described; {fact}.",
                    "Nothing to add except that {fact}.", "{T} - {fact}, and {fact2}."],
    },
    "test": {
        "positive": ["Couldn't be happier with {t}: {praise}.", "{T}? Not {bad} in the least; {praise}."],
        "negative": ["Returned {t} because {fault}.", "{T} seemed {good} until {fault}."],
        "neutral": ["Quick note on {t}: {fact}.", "About {t}: {fact}; {fact2}."],
    },
}


def review(rng: random.Random, split: str, label: str) -> str:
    things = TRAIN_THINGS if split == "train" else TEST_THINGS
    thing = rng.choice(things)

    def fact() -> str:
        return rng.choice(FACTS).format(day=rng.choice(DAYS), colour=rng.choice(COLOURS), n=rng.randint(2, 400))

    text = rng.choice(TEMPLATES[split][label]).format(
        t=thing, T=thing[0].upper() + thing[1:], good=rng.choice(GOOD), bad=rng.choice(BAD),
        fault=rng.choice(FAULTS), praise=rng.choice(PRAISE), fact=fact(), fact2=fact())
    return text[0].upper() + text[1:]


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Balanced train and test splits."""
    rng = random.Random(seed)
    splits = []
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"text": review(rng, split, LABELS[i % 3]), "label": LABELS[i % 3]} for i in range(n)]
        rng.shuffle(rows)
        splits.append(rows)
    return splits[0], splits[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/sentiment", help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=600, help="training reviews (default 600)")
    parser.add_argument("--test", type=int, default=150, help="held-out reviews (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = make(args.train, args.test, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(test)} test reviews to {out}")


if __name__ == "__main__":
    main()
