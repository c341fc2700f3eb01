"""Accuracy of each prompt technique on held-out arithmetic word problems (scripts/make_word_problems.py).

    python benchmarks/prompts.py                         # SmolLM2-135M-Instruct, 70 questions, every technique
    python benchmarks/prompts.py --questions 14 --techniques zero-shot,few-shot-cot --no-append

Techniques (scratchlm.prompts): zero-shot (the question, "Answer with a number only."), few-shot (k solved examples,
answer only), zero-shot chain of thought ("Let's think step by step.", Kojima et al. 2022), few-shot chain of
thought (k worked solutions, Wei et al. 2022), self-consistency (n few-shot-CoT samples at temperature 0.7,
majority vote, Wang et al. 2022) and tree of thoughts (best-first search over solution sentences, the model scoring
each partial solution, Yao et al. 2023). Greedy techniques run the questions in batches. The test questions are
the first N of the held-out split (the kinds in turn, so every kind is equally represented); the examples are the
first k of the training pool. Accuracy is exact match of the extracted number; the table gives a 95% Wilson
interval, because 70 questions cannot separate techniques a few points apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import date
from pathlib import Path

from common import append_results, machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
TECHNIQUES = ("zero-shot", "few-shot", "zero-shot-cot", "few-shot-cot", "self-consistency", "tree-of-thought")
ZERO_SHOT_SUFFIX = "\nAnswer with a number only."


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (Wilson 1927): sound for small n and for 0 or n successes."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load(split: str) -> list[dict]:
    path = DATA / f"word_problems_{split}.jsonl"
    if not path.is_file():
        sys.exit(f"{path} is missing: run python scripts/make_word_problems.py")
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_technique(name: str, llm, questions: list[dict], pool: list[dict], args) -> list[tuple[str | None, int]]:
    """(extracted answer, new tokens) per question."""
    from scratchlm.prompts import (
        FewShotTemplate,
        chain_of_thought,
        extract_answer,
        majority_vote,
        tree_of_thought,
    )
    from scratchlm.prompts.reasoning import generate_rows

    shots = pool[:args.shots]
    greedy = {"temperature": 0.0}
    if name in ("zero-shot", "few-shot", "zero-shot-cot", "few-shot-cot"):
        few = FewShotTemplate(shots, input="{question}", output="The answer is {answer}.",
                              instruction="Answer with the number only.")
        prompt = {"zero-shot": lambda q: [{"role": "user", "content": q + ZERO_SHOT_SUFFIX}],
                  "few-shot": lambda q: few.messages(question=q),
                  "zero-shot-cot": lambda q: chain_of_thought(q),
                  "few-shot-cot": lambda q: chain_of_thought(q, shots)}[name]
        budget = 24 if name in ("zero-shot", "few-shot") else args.cot_tokens
        out = []
        for group in batched(questions, args.batch):
            done = llm.complete([llm.encode_chat(prompt(q["question"])) for q in group], max_new_tokens=budget,
                                **greedy)
            out += [(extract_answer(c.text), len(c.token_ids)) for c in done]
        return out
    if name == "self-consistency":
        out = []
        for q in questions:
            ids = llm.encode_chat(chain_of_thought(q["question"], shots))
            rows = [(ids, llm.sampling(temperature=0.7, max_new_tokens=args.cot_tokens, seed=args.seed + i))
                    for i in range(args.n)]
            done = generate_rows(llm, rows)
            answer, _ = majority_vote([extract_answer(c.text) for c in done])
            out.append((answer, sum(len(c.token_ids) for c in done)))
        return out
    if name == "tree-of-thought":
        out = []
        for q in questions:
            result = tree_of_thought(llm, q["question"], shots, breadth=args.breadth,
                                     max_expansions=args.max_expansions, seed=args.seed)
            out.append((result.answer, -1))  # tokens are not counted inside the search
        return out
    raise SystemExit(f"unknown technique {name!r}; choose from {', '.join(TECHNIQUES)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", help="float32 (default: batches decode faster dense on CPU)")
    parser.add_argument("--questions", type=int, default=70, help="held-out questions (default 70; 140 exist)")
    parser.add_argument("--techniques", default=",".join(TECHNIQUES))
    parser.add_argument("--shots", type=int, default=4, help="few-shot examples (default 4)")
    parser.add_argument("--n", type=int, default=5, help="self-consistency samples (default 5)")
    parser.add_argument("--breadth", type=int, default=3, help="tree of thoughts: proposals per expansion")
    parser.add_argument("--max-expansions", type=int, default=6, help="tree of thoughts: nodes grown per question")
    parser.add_argument("--cot-tokens", type=int, default=96, help="most new tokens of a chain of thought")
    parser.add_argument("--batch", type=int, default=8, help="questions per batch for the greedy techniques")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    import torch

    from scratchlm.llm import LLM

    torch.set_num_threads(args.threads)
    questions = load("test")[:args.questions]
    pool = load("train")
    names = [t.strip() for t in args.techniques.split(",") if t.strip()]
    load_before = os.getloadavg()[0]
    llm = LLM.load(args.model, dtype=args.dtype)
    rows = []
    header = f"{'technique':<18} {'accuracy':>9} {'95% CI':>13} {'1-step':>7} {'2-step':>7} {'answered':>9} " \
             f"{'tokens/q':>9} {'s/q':>6}"
    print(header, flush=True)
    interrupted = None
    for name in names:
        start = time.perf_counter()
        try:
            results = run_technique(name, llm, questions, pool, args)
        except KeyboardInterrupt:  # keep what was measured: the table says which techniques did not run
            interrupted = name
            break
        seconds = (time.perf_counter() - start) / len(questions)
        right = [a == str(q["answer"]) for (a, _), q in zip(results, questions)]
        by_steps = {k: [r for r, q in zip(right, questions) if q["steps"] == k] for k in (1, 2)}
        low, high = wilson(sum(right), len(right))
        tokens = [t for _, t in results if t >= 0]
        row = dict(technique=name, correct=sum(right), n=len(right), low=low, high=high,
                   one=sum(by_steps[1]) / max(1, len(by_steps[1])), two=sum(by_steps[2]) / max(1, len(by_steps[2])),
                   answered=sum(a is not None for a, _ in results) / len(results),
                   tokens=sum(tokens) / len(tokens) if tokens else None, seconds=seconds)
        rows.append(row)
        tok = f"{row['tokens']:.0f}" if row["tokens"] is not None else "-"
        print(f"{name:<18} {sum(right):>3}/{len(right):<5} [{low:.2f}, {high:.2f}] {row['one']:>7.2f} "
              f"{row['two']:>7.2f} {row['answered']:>9.2f} {tok:>9} {seconds:>6.1f}", flush=True)
    load_after = os.getloadavg()[0]
    if args.no_append or not rows:
        return 0
    command = "python benchmarks/prompts.py " + " ".join(sys.argv[1:])
    lines = [f"\n## Prompt techniques on word problems ({date.today().isoformat()})\n",
             f"Machine: {machine()}, torch {torch.__version__}, {args.threads} threads; load average "
             f"{load_before:.1f} at the start, {load_after:.1f} at the end (seconds per question are only "
             "comparable within one run).",
             f"Command: `{command}`",
             f"Model {args.model} ({args.dtype}), the first {len(questions)} held-out questions of "
             f"benchmarks/data/word_problems_test.jsonl, {args.shots} examples from the training pool, "
             f"self-consistency n={args.n} at temperature 0.7, tree of thoughts breadth {args.breadth} and "
             f"{args.max_expansions} expansions, chains of thought up to {args.cot_tokens} tokens.\n",
             "| technique | accuracy | 95% CI | 1-step | 2-step | answer extracted | new tokens / question | "
             "s / question |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tok = f"{r['tokens']:.0f}" if r["tokens"] is not None else "-"
        lines.append(f"| {r['technique']} | {r['correct']}/{r['n']} ({r['correct'] / r['n']:.0%}) | "
                     f"{r['low']:.2f}-{r['high']:.2f} | {r['one']:.0%} | {r['two']:.0%} | {r['answered']:.0%} | "
                     f"{tok} | {r['seconds']:.1f} |")
    if interrupted:
        lines.append(f"\nInterrupted during {interrupted}: not measured in this run: "
                     f"{', '.join(names[names.index(interrupted):])}.")
    append_results("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
