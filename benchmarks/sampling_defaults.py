"""Which sampling defaults keep a small model from looping? SmolLM2-135M-Instruct answers simple questions.

For each candidate setting (temperature 0.7 throughout, the CLI's and ``LLM``'s default), every question is
asked with several seeds, in float32 and quantized to int4 at load, and each answer is scored:

- **loop**: some word 3-gram occurs three times or more ("la la la la la", "I'm sorry. I'm sorry. I'm sorry.");
- **limit**: the answer ran to ``--max-new-tokens`` without the model ending it;
- **correct**: the answer contains the expected word ("Paris" for the capital of France).

The criterion: the lowest loop rate over both dtypes, with a correct rate no lower than the current defaults'
(within one answer). Run::

    .venv/bin/python benchmarks/sampling_defaults.py [--seeds 4] [--max-new-tokens 128] [--record]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import torch
from common import append_results, machine

QUESTIONS = [
    ("What is the capital of France?", ("paris",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What do bees make?", ("honey",)),
    ("What is 2 + 2?", ("4", "four")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
]

CANDIDATES = {
    "T 0.7 only (old default)": dict(temperature=0.7),
    "repetition 1.1": dict(temperature=0.7, repetition_penalty=1.1),
    "min_p 0.05": dict(temperature=0.7, min_p=0.05),
    "top_k 40, top_p 0.95, min_p 0.05 (llama.cpp)": dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05),
    "top_k 40, top_p 0.9, repetition 1.1 (Ollama)": dict(temperature=0.7, top_k=40, top_p=0.9,
                                                          repetition_penalty=1.1),
    "top_k 40, min_p 0.05, repetition 1.1": dict(temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1),
}


def looped(text: str, n: int = 3, times: int = 3) -> bool:
    """True when some word n-gram occurs ``times`` times or more."""
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def correct(text: str, expected: tuple[str, ...]) -> bool:
    words = set(re.findall(r"\w+", text.lower()))
    return any(e in words for e in expected)


def answers(llm, params: dict, seeds: int, max_new_tokens: int) -> list[tuple[str, str, tuple]]:
    """Every question with every seed, decoded together as one batch: ``(question, answer, expected)``."""
    from scratchlm.generate import Sequence, stream_sequences
    from scratchlm.sampling import SamplingParams

    cfg, rows, seqs = llm.config, [], []
    for question, expected in QUESTIONS:
        ids = llm.encode_chat([{"role": "user", "content": question}])
        for seed in range(seeds):
            p = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **params)
            seqs.append(Sequence(ids, p, llm.tokenizer, llm.eos_ids, cfg.vocab_size, cfg.context_length))
            rows.append((question, expected))
    for _ in stream_sequences(llm.model, seqs):
        pass
    return [(q, s.text, e, s.finish_reason) for (q, e), s in zip(rows, seqs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", nargs="+", choices=["float32", "int4"], default=["float32", "int4"],
                    help="float32 as loaded, and/or quantized to int4 at load (default both)")
    ap.add_argument("--show", action="store_true", help="print every looped answer")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from scratchlm.llm import LLM

    table = []
    for quantize in [None if w == "float32" else w for w in args.weights]:
        llm = LLM.load(args.model, quantize=quantize)
        for name, params in CANDIDATES.items():
            start = time.perf_counter()
            rows = answers(llm, params, args.seeds, args.max_new_tokens)
            n = len(rows)
            loops = sum(looped(a) for _, a, _, _ in rows)
            limits = sum(f == "length" for *_, f in rows)
            right = sum(correct(a, e) for _, a, e, _ in rows)
            words = sum(len(a.split()) for _, a, _, _ in rows) / n
            table.append((quantize or "float32", name, n, loops, limits, right, words))
            print(f"{quantize or 'float32':<8} {name:<46} loops {loops:>2}/{n}  limit {limits:>2}/{n}  "
                  f"correct {right:>2}/{n}  words {words:5.1f}  ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.show:
                for q, a, _, _ in rows:
                    if looped(a):
                        print(f"    {q!r} -> {a[:160]!r}")
        del llm
    if args.record:
        lines = ["", f"## Sampling defaults for small models ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
                 f"Machine: {machine()}. Command: `python benchmarks/sampling_defaults.py {' '.join(sys.argv[1:])}` "
                 f"({len(QUESTIONS)} questions x {args.seeds} seeds, chat template, {args.max_new_tokens} new tokens "
                 "at most, temperature 0.7). loop = a word 3-gram occurs 3+ times; limit = ran to the token limit; "
                 "correct = contains the expected word.", "",
                 "| weights | candidate | answers | loops | at limit | correct | words/answer |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {w} | {c} | {n} | {lo} ({lo / n:.0%}) | {li} ({li / n:.0%}) | {r} ({r / n:.0%}) | {wd:.1f} |"
                  for w, c, n, lo, li, r, wd in table]
        append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
