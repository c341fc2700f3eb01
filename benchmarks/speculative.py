"""Speculative decoding on SmolLM2-135M-Instruct: prompt lookup and draft models against plain greedy decoding.

    python benchmarks/speculative.py [--tokens 128] [--repeats 3] [--threads 2] [--draft-model NAME ...]
                                     [--skip-draft-models] [--no-append]

Prints and appends to RESULTS.md, for greedy decoding in the same process (plain and speculative runs of one
prompt alternate, best of ``--repeats`` each):
- prompt lookup (``draft="ngram"``, adaptive K) on input-grounded prompts (summarise, extract, rewrite a passage of
  the bundled Shakespeare, 300-800 prompt tokens) with the default engine (the GGUF's int4 weights): decode
  tokens/s against plain decoding (target >= 1.5x), acceptance rate, tokens per forward pass, identical text;
- the same on open-ended prompts (target >= 0.95x: the adaptive K stops drafting where it does not pay), and with
  a fixed K for comparison;
- draft models for the float32 model: SmolLM2's own int4 weights by default, plus any ``--draft-model``;
- the cost of verifying k drafted tokens: one forward pass over 1 + k tokens after a 500-token context, relative
  to a one-token step, and the per-token slope c that ``speculative.VERIFY_COST_PER_TOKEN`` should hold.

Decode tokens/s = tokens after the first / seconds after the first (BENCHMARKS.md); prefill is the same work for
both and is left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import append_results, machine

from scratchlm.generate import DecodeStats, stream_sequences
from scratchlm.llm import LLM
from scratchlm.speculative import VERIFY_COST_PER_TOKEN

CORPUS = Path(__file__).resolve().parents[1] / "src" / "scratchlm" / "data" / "shakespeare.txt"
MODEL = "smollm2-135m-instruct"


def passage(anchor: str, before: int, lines: int) -> str:
    """``lines`` lines of the bundled Shakespeare starting ``before`` lines above the one holding ``anchor``."""
    text = CORPUS.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(text) if anchor in line)
    return "\n".join(text[max(0, at - before): at - before + lines]).strip()


def grounded_prompts() -> list[tuple[str, str]]:
    hamlet = passage("To be, or not to be", 4, 40)
    antony = passage("Friends, Romans, countrymen", 3, 40)
    persons = passage("PERSONS REPRESENTED", 0, 45)
    return [
        ("summarise Hamlet", f"Summarise the following passage in a few sentences.\n\n{hamlet}"),
        ("summarise Antony", f"Summarise the following passage in a few sentences.\n\n{antony}"),
        ("extract persons", f"List every person in this cast list with their role, one per line.\n\n{persons}"),
        ("extract Antony's lines", f"Copy the lines Antony speaks in this passage, word for word.\n\n{antony}"),
        ("rewrite Hamlet", f"Rewrite this passage as plain prose, keeping Shakespeare's words.\n\n{hamlet}"),
        ("rewrite persons", f"Rewrite this cast list as a Markdown table with columns Name and Role.\n\n{persons}"),
    ]


OPEN = [
    ("capital", "What is the capital of France? Answer in a few sentences about the city."),
    ("story", "Write a short story about a robot who learns to paint."),
    ("explain", "Explain why the sky is blue to a ten-year-old."),
    ("list", "Give me ten ideas for a weekend with children."),
]


def run(llm: LLM, prompt: str, tokens: int, **decoding) -> tuple[list[int], DecodeStats]:
    seqs = llm.sequences([[{"role": "user", "content": prompt}]],
                         llm.sampling(temperature=0, max_new_tokens=tokens))
    stats = DecodeStats()
    for _ in stream_sequences(llm.model, seqs, stats=stats, **decoding):
        pass
    return seqs[0].output_ids, stats


def best(llm: LLM, prompt: str, tokens: int, repeats: int, configs: dict) -> dict:
    """For each named config: (output ids, DecodeStats of the fastest decode among ``repeats`` runs)."""
    results: dict = {}
    for _ in range(repeats):
        for name, decoding in configs.items():
            ids, stats = run(llm, prompt, tokens, **decoding)
            if name not in results or stats.decode_seconds < results[name][1].decode_seconds:
                results[name] = (ids, stats)
    return results


def compare(llm: LLM, prompts: list[tuple[str, str]], tokens: int, repeats: int, configs: dict) -> tuple[list, dict]:
    """Rows of a per-prompt table, and totals per config (tokens after the first, decode seconds, drafted,
    accepted, forwards, tokens, identical prompts)."""
    rows, totals = [], {name: [0, 0.0, 0, 0, 0, 0, 0] for name in configs}
    for label, prompt in prompts:
        results = best(llm, prompt, tokens, repeats, configs)
        plain_ids, plain = results["plain"]
        n_prompt = len(llm.encode_chat([{"role": "user", "content": prompt}]))
        row = [label, n_prompt, len(plain_ids), f"{plain.decode_tokens_per_second:.1f}"]
        for name, (ids, stats) in results.items():
            t = totals[name]
            t[0] += stats.generated - 1
            t[1] += stats.decode_seconds
            t[2] += stats.drafted
            t[3] += stats.accepted
            t[4] += stats.forwards
            t[5] += stats.generated
            t[6] += ids == plain_ids
            if name == "plain":
                continue
            ratio = stats.decode_tokens_per_second / plain.decode_tokens_per_second
            row += [f"{stats.decode_tokens_per_second:.1f}", f"{ratio:.2f}x", f"{100 * stats.acceptance_rate:.0f}%",
                    f"{stats.tokens_per_forward:.2f}", "yes" if ids == plain_ids else "NO"]
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)
    return rows, totals


def table(title: str, configs: list[str], rows: list, totals: dict) -> str:
    head = ["prompt", "prompt tokens", "new tokens", "plain tok/s"]
    for name in configs:
        if name != "plain":
            head += [f"{name} tok/s", "speedup", "accepted", "tokens/pass", "identical"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    plain_rate = totals["plain"][0] / totals["plain"][1]
    total = ["**all**", "", str(totals["plain"][5]), f"{plain_rate:.1f}"]
    for name in configs:
        if name == "plain":
            continue
        t = totals[name]
        rate = t[0] / t[1]
        total += [f"{rate:.1f}", f"**{rate / plain_rate:.2f}x**", f"{100 * t[3] / max(1, t[2]):.0f}%",
                  f"{t[5] / t[4]:.2f}", f"{t[6]}/{len(rows)}"]
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines) + "\n"


def verify_cost(llm: LLM, repeats: int, context: int = 500) -> tuple[dict[int, float], float]:
    """Forward-pass time over 1 + k tokens after ``context`` cached tokens, relative to one token (best of
    ``repeats``, sizes interleaved), and the least-squares slope c of t(1 + k) / t(1) = 1 + c k."""
    from scratchlm.model import KVCache

    cache = KVCache(llm.config, 1, context + 16)
    sizes = (1, 2, 3, 5, 9)
    times = {t: float("inf") for t in sizes}
    with torch.inference_mode():
        llm.model.hidden_states(torch.randint(0, min(1000, llm.config.vocab_size), (1, context)), cache)
        for _ in range(max(5, 5 * repeats)):
            for t in sizes:
                cache.lengths[:] = context
                ids = torch.randint(0, min(1000, llm.config.vocab_size), (1, t))
                start = time.perf_counter()
                # as speculative.verify_step runs one sequence: each position attends alone
                llm.model.logits(llm.model.hidden_states(ids, cache, stepwise_attention=True)).float()
                times[t] = min(times[t], time.perf_counter() - start)
    ratios = {t - 1: times[t] / times[1] for t in sizes}
    slope = sum(k * (r - 1) for k, r in ratios.items()) / sum(k * k for k in ratios)
    return ratios, slope


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per prompt and config; the fastest counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-model", action="append", default=[],
                    help="another draft model for the float32 model (name or path; repeatable)")
    ap.add_argument("--skip-draft-models", action="store_true", help="prompt lookup only")
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()
    sections = []

    llm = LLM.load(MODEL)  # the default engine: the GGUF's int4 weights
    lines = ["**Verification cost**: a forward pass over 1 + k tokens after 500 cached ones, relative to a one-token "
             "step (best of several, interleaved); c = least-squares slope of 1 + c k (`VERIFY_COST_PER_TOKEN` "
             f"is {VERIFY_COST_PER_TOKEN})", "", "| engine | " + " | ".join(f"k={k}" for k in (1, 2, 4, 8)) + " | c |",
             "|---|---|---|---|---|---|"]
    for name, model in (("int4 (default)", llm), ("float32", None)):
        model = model or LLM.load(MODEL, dtype="float32")
        ratios, slope = verify_cost(model, args.repeats)
        lines.append(f"| {name} | " + " | ".join(f"{ratios[k]:.2f}" for k in (1, 2, 4, 8)) + f" | {slope:.3f} |")
        print(lines[-1], flush=True)
    sections.append("\n".join(lines) + "\n")
    configs = {"plain": {}, "ngram": {"draft": "ngram"}}
    print("prompt lookup, input-grounded prompts (default engine, int4)")
    rows, grounded = compare(llm, grounded_prompts(), args.tokens, args.repeats, configs)
    sections.append(table("Prompt lookup, input-grounded prompts (default engine: int4 from the GGUF)",
                          list(configs), rows, grounded))
    configs_open = {"plain": {}, "ngram": {"draft": "ngram"},
                    "ngram fixed K=8": {"draft": "ngram", "draft_tokens": 8, "adaptive": False}}
    print("prompt lookup, open-ended prompts")
    rows, opened = compare(llm, OPEN, args.tokens, args.repeats, configs_open)
    sections.append(table("Prompt lookup, open-ended prompts (adaptive K, and a fixed K of 8)", list(configs_open),
                          rows, opened))
    del llm

    if not args.skip_draft_models:
        target = LLM.load(MODEL, dtype="float32")
        drafts = {"ngram": "ngram", "int4 SmolLM2": LLM.load(MODEL)}
        for name in args.draft_model:
            drafts[name] = LLM.load(name)
        configs_draft = {"plain": {}}
        for name, draft in drafts.items():
            configs_draft[name] = {"draft": target.draft_model(draft)}
        print("draft models for the float32 model")
        prompts = grounded_prompts()[::2] + OPEN[:2]
        rows, drafted = compare(target, prompts, args.tokens, args.repeats, configs_draft)
        sections.append(table("Draft models for SmolLM2 in float32 (adaptive K; ngram for comparison)",
                              list(configs_draft), rows, drafted))

    load_after = os.getloadavg()
    header = (f"\n## Speculative decoding: prompt lookup and draft models, SmolLM2-135M-Instruct, greedy ({when})\n\n"
              f"Machine: {machine()}; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}"
              f"{' (LOADED: rerun on a quiet machine)' if max(load_before[0], load_after[0]) > 2.5 else ''}. "
              f"torch {torch.__version__}, {args.threads} threads, {args.tokens} new tokens, best of {args.repeats}.\n"
              f"Command: `python benchmarks/speculative.py {' '.join(sys.argv[1:])}`\n\n"
              "Decode tokens/s after the first token; speedup against plain greedy decoding of the same engine in the "
              "same run; accepted = drafted tokens kept; tokens/pass = tokens per forward pass of the model; "
              "identical = the same tokens as plain greedy. Targets: prompt lookup >= 1.5x on input-grounded "
              "prompts, >= 0.95x on open-ended ones.\n\n")
    text = header + "\n".join(sections)
    print(text)
    if not args.no_append:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
