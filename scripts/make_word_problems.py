"""Generate the arithmetic word problems that the prompt techniques are measured on (benchmarks/prompts.py).

    python scripts/make_word_problems.py              # benchmarks/data/word_problems_{train,test}.jsonl

Each line is ``{"id", "question", "answer", "solution", "steps", "kind"}``: a short story with small whole
numbers, its answer (an integer), a worked solution that ends with "The answer is N." (what few-shot
chain-of-thought examples show the model), and the number of operations (1 or 2). Kinds: add, subtract,
multiply, divide (one step); add-subtract, multiply-add, subtract-subtract (two steps), GSM8K's shape in
miniature (Cobbe et al. 2021).

The train split is the pool that few-shot examples are drawn from; the test split is held out: its people and
objects never occur in training, and no test question equals a training one. One seeded generator writes both:
the same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "data"

# (name, pronoun) pairs; the test split has its own people and objects (held out).
TRAIN_PEOPLE = [("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mia", "She"), ("Lukas", "He"), ("Sofia", "She"),
                ("Omar", "He"), ("Chloe", "She"), ("Kenji", "He"), ("Grace", "She")]
TEST_PEOPLE = [("Ben", "He"), ("Lily", "She"), ("Diego", "He"), ("Hana", "She"), ("Felix", "He"), ("Zara", "She"),
               ("Pavel", "He"), ("Nadia", "She")]
TRAIN_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards"]
TEST_ITEMS = ["oranges", "books", "coins", "balloons", "crayons", "buttons"]


def _problem(kind: str, rng: random.Random, people: list, items: list) -> dict:
    (name, he), (friend, _) = rng.sample(people, 2)
    item = rng.choice(items)
    r = rng.randint
    if kind == "add":
        a, b = r(2, 20), r(2, 20)
        q = f"{name} has {a} {item}. {he} gets {b} more {item}. How many {item} does {name} have now?"
        return dict(question=q, answer=a + b, solution=f"{name} has {a} + {b} = {a + b} {item}.")
    if kind == "subtract":
        a = r(6, 30)
        b = r(2, a - 2)
        q = f"{name} has {a} {item}. {he} gives {b} {item} to {friend}. How many {item} does {name} have left?"
        return dict(question=q, answer=a - b, solution=f"{name} has {a} - {b} = {a - b} {item} left.")
    if kind == "multiply":
        a, b = r(2, 6), r(2, 9)
        q = f"{name} buys {a} bags of {item}. Each bag holds {b} {item}. How many {item} does {name} buy?"
        return dict(question=q, answer=a * b, solution=f"{a} bags of {b} {item} is {a} * {b} = {a * b} {item}.")
    if kind == "divide":
        a, b = r(2, 6), r(2, 9)
        q = f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?"
        return dict(question=q, answer=b, solution=f"Each friend gets {a * b} / {a} = {b} {item}.")
    if kind == "add-subtract":
        a, b = r(2, 15), r(2, 15)
        c = r(2, a + b - 2)
        q = (f"{name} has {a} {item}. {he} buys {b} more and then gives {c} to {friend}. "
             f"How many {item} does {name} have now?")
        return dict(question=q, answer=a + b - c,
                    solution=f"After buying, {name} has {a} + {b} = {a + b} {item}. "
                             f"After giving, {a + b} - {c} = {a + b - c}.")
    if kind == "multiply-add":
        a, b, c = r(2, 5), r(2, 9), r(2, 9)
        q = (f"{name} has {a} boxes with {b} {item} in each box, and {c} more {item} on the table. "
             f"How many {item} does {name} have in all?")
        return dict(question=q, answer=a * b + c,
                    solution=f"The boxes hold {a} * {b} = {a * b} {item}. "
                             f"With the others, {a * b} + {c} = {a * b + c}.")
    if kind == "subtract-subtract":
        a = r(10, 40)
        b = r(2, a // 2)
        c = r(2, a - b - 2)
        q = (f"{name} has {a} {item}. {he} gives {b} to {friend} and loses {c}. "
             f"How many {item} does {name} have left?")
        return dict(question=q, answer=a - b - c,
                    solution=f"After giving, {name} has {a} - {b} = {a - b} {item}. "
                             f"After losing some, {a - b} - {c} = {a - b - c}.")
    raise ValueError(kind)


KINDS = {"add": 1, "subtract": 1, "multiply": 1, "divide": 1, "add-subtract": 2, "multiply-add": 2,
         "subtract-subtract": 2}


def make_split(n: int, rng: random.Random, people: list, items: list, prefix: str,
               avoid: set[str] = frozenset()) -> list[dict]:
    """``n`` problems, the kinds in turn (so every kind is equally common), no question twice or from ``avoid``."""
    rows, seen = [], set(avoid)
    kinds = list(KINDS)
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        p = _problem(kind, rng, people, items)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        p["solution"] += f" The answer is {p['answer']}."
        rows.append({"id": f"{prefix}-{len(rows):03d}", **p, "steps": KINDS[kind], "kind": kind})
    return rows


def make_word_problems(seed: int = 13, n_train: int = 28, n_test: int = 140) -> tuple[list[dict], list[dict]]:
    """(train, test): the few-shot pool and the held-out questions, from one seed."""
    rng = random.Random(seed)
    train = make_split(n_train, rng, TRAIN_PEOPLE, TRAIN_ITEMS, "train")
    test = make_split(n_test, rng, TEST_PEOPLE, TEST_ITEMS, "test", avoid={p["question"] for p in train})
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from scratchlm.files import atomic_write_bytes

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--train", type=int, default=28, help="few-shot pool size (default 28)")
    parser.add_argument("--test", type=int, default=140, help="held-out questions (default 140)")
    args = parser.parse_args(argv)
    if args.train < 2 or args.test < 1:
        print("error: --train must be at least 2 and --test at least 1", file=sys.stderr)
        return 2
    train, test = make_word_problems(args.seed, args.train, args.test)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        path = args.out / f"word_problems_{split}.jsonl"
        write_jsonl(path, rows)
        print(f"wrote {len(rows)} problems to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
