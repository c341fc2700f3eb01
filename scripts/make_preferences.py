"""Generate the DPO demonstration set: preference pairs whose chosen answers open with "Ahoy!".

    python scripts/make_preferences.py --out examples/prefs          # train.jsonl, test.jsonl

Each line is TRL's preference format, ``{"prompt", "chosen", "rejected"}``: a short question, the right answer
opened with the fixed word "Ahoy!" (chosen), and the same answer without it (rejected). SmolLM2-135M-Instruct
never opens an answer that way, so a checker (``follows_style``) can tell whether alignment moved the model's
behaviour: the style is learned from preferences alone, with no supervised answers.

Questions come from a few families (capitals, sums, opposites, plurals, animal sounds, word lengths). The test
split uses question templates and subjects that never occur in training, so a model must take on the style,
not remember the pairs. One seeded generator: the same seed writes the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPENER = "Ahoy!"


def follows_style(answer: str) -> bool:
    """Whether an answer opens with the preferred word (spaces and quotes before it allowed)."""
    return answer.lstrip(" \n\"'*").startswith(OPENER)


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon",
            "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
            "Chile": "Santiago", "Cuba": "Havana", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara", "Iran": "Tehran", "Belgium": "Brussels",
            "Argentina": "Buenos Aires", "Colombia": "Bogota", "Mexico": "Mexico City", "Australia": "Canberra",
            "Morocco": "Rabat", "Nigeria": "Abuja", "Ghana": "Accra", "Nepal": "Kathmandu", "Iceland": "Reykjavik"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
             "open": "closed", "early": "late", "full": "empty", "strong": "weak", "high": "low", "old": "new",
             "wet": "dry", "loud": "quiet", "rich": "poor", "hard": "soft", "thick": "thin", "long": "short",
             "clean": "dirty", "true": "false", "first": "last", "inside": "outside", "win": "lose", "push": "pull"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese", "man": "men",
           "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
           "city": "cities", "box": "boxes", "bus": "buses", "baby": "babies", "hero": "heroes", "fish": "fish",
           "sheep": "sheep", "cactus": "cacti", "ox": "oxen", "half": "halves", "party": "parties"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
          "horse": "neigh", "owl": "hoot", "lion": "roar", "frog": "croak", "snake": "hiss", "bee": "buzz",
          "mouse": "squeak", "rooster": "cock-a-doodle-doo", "donkey": "hee-haw", "crow": "caw"}
WORDS = ["apple", "river", "mountain", "garden", "yellow", "pencil", "window", "orange", "bicycle", "castle",
         "dragon", "forest", "guitar", "island", "jacket", "kitten", "lemon", "marble", "needle", "ocean",
         "planet", "rabbit", "silver", "tomato", "umbrella", "violin", "whistle", "zebra", "candle", "anchor"]

# (family, train templates, held-out test templates, answer template)
FAMILIES = [
    ("capital", ["What is the capital of {a}?", "Which city is the capital of {a}?", "Name the capital of {a}."],
     ["{a} has which city as its capital?"], "The capital of {a} is {b}."),
    ("opposite", ["What is the opposite of \"{a}\"?", "Give the opposite of the word {a}.",
                  "What word means the opposite of {a}?"],
     ["Tell me an antonym of {a}."], "The opposite of \"{a}\" is \"{b}\"."),
    ("plural", ["What is the plural of \"{a}\"?", "How do you say more than one {a}?",
                "Write the plural form of {a}."],
     ["If there are two of a {a}, what do you call them?"], "The plural of \"{a}\" is \"{b}\"."),
    ("sound", ["What sound does a {a} make?", "Which noise does a {a} make?", "How does a {a} sound?"],
     ["If you hear a {a}, what does it say?"], "A {a} says \"{b}\"."),
    ("letters", ["How many letters are in the word \"{a}\"?", "Count the letters in \"{a}\".",
                 "How long is the word {a}, in letters?"],
     ["What is the number of letters in {a}?"], "The word \"{a}\" has {b} letters."),
    ("sum", ["What is {a}?", "Compute {a}.", "Add these numbers: {a}."],
     ["Tell me the total of {a}."], "{a} = {b}."),
]


def subjects(family: str, rng: random.Random) -> list[tuple[str, str]]:
    if family == "capital":
        return list(CAPITALS.items())
    if family == "opposite":
        return list(OPPOSITES.items())
    if family == "plural":
        return list(PLURALS.items())
    if family == "sound":
        return list(SOUNDS.items())
    if family == "letters":
        return [(w, str(len(w))) for w in WORDS]
    pairs = [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(40)]
    return [(f"{x} + {y}", str(x + y)) for x, y in pairs]


def make(seed: int, test_share: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(train, test) preference pairs; the test pairs use held-out templates and subjects."""
    rng = random.Random(seed)
    train, test = [], []
    for family, train_templates, test_templates, answer in FAMILIES:
        items = subjects(family, rng)
        rng.shuffle(items)
        n_test = max(2, round(len(items) * test_share))
        for split, chosen_items, templates in ((test, items[:n_test], test_templates),
                                               (train, items[n_test:], train_templates)):
            for a, b in chosen_items:
                for template in (templates if split is train else templates[:1]):
                    plain = answer.format(a=a, b=b)
                    split.append({"prompt": template.format(a=a), "chosen": f"{OPENER} {plain}", "rejected": plain})
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/prefs", help="output directory (default examples/prefs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make(args.seed)
    for name, rows in (("train", train), ("test", test)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
