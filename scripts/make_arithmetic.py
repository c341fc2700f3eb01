"""Generate the GRPO demonstration task: small arithmetic whose answer a program can check.

    python scripts/make_arithmetic.py --out examples/arithmetic      # train.jsonl, test.jsonl

Each line is ``{"prompt": "What is 23 + 48? Answer with the number only.", "answer": 71}``. The reward
``scratchlm.align.rewards:final_number_reward`` reads the expression back out of the prompt and gives 1 when the
last number of the completion equals its value, so the ``answer`` field is only for people reading the file.
Sums and differences of two-digit numbers and small products: SmolLM2-135M gets some right and many wrong, so
sampled answers to one prompt differ in reward and GRPO has something to learn from. The test prompts are pairs
of numbers that never occur in training. One seeded generator: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = ["What is {e}? Answer with the number only.",
             "Compute {e}. Reply with just the result.",
             "{e} = ? Give only the number."]


def problem(rng: random.Random) -> tuple[str, int]:
    """One expression and its value: a + b, a - b (never negative) or a * b with a one-digit factor."""
    kind = rng.choice("+-*")
    if kind == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 9)
        return f"{a} * {b}", a * b
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b}", a - b
    return f"{a} + {b}", a + b


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test records; no expression occurs in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, n in ((0, n_train), (1, n_test)):
        while len(splits[split]) < n:
            expression, value = problem(rng)
            if expression in seen:
                continue
            seen.add(expression)
            splits[split].append({"prompt": rng.choice(TEMPLATES).format(e=expression), "answer": value})
    return splits[0], splits[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/arithmetic", help="directory for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=512, help="training prompts (default 512)")
    parser.add_argument("--test", type=int, default=64, help="held-out prompts (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = make(args.train, args.test, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(test)} test prompts to {out}")


if __name__ == "__main__":
    main()
