"""Structured output on SmolLM2-135M-Instruct: what a JSON-schema constraint costs, against xgrammar.

    python benchmarks/structured.py [--repeats 3] [--tokens 160] [--samples 12] [--no-append]
    python benchmarks/structured.py --masks-only --clock cpu     # the mask figures alone, on a busy machine

Prints and appends to RESULTS.md:
- decode tokens/s unconstrained and under a 20-property JSON schema (greedy, same prompt), on the first request
  for the schema (masks computed as they are met) and on a later one (masks cached): the ratio is the cost;
- compiling a schema and building its first mask, ours and xgrammar's (its GrammarCompiler on the same
  vocabulary, compact separators, one thread), plus the one-off per-tokenizer set-up of each; ours includes
  the walks it does up front (masks.TokenMasks.precompute), and starts with no mask shared from earlier schemas;
- the per-token mask time (mask + advance) along the same token sequence, mean and p99, ours cold (first request)
  and warm, and xgrammar's;
- the validity rate: sampled outputs (temperature 1, several seeds) that parse and validate with jsonschema.

``--masks-only`` loads the tokenizer alone and measures compile, first mask and per-token mask times along a
fixed realistic instance of the schema (tokenized, not generated); ``--clock cpu`` times them with this thread's
CPU time instead of the wall clock, which a loaded machine inflates (each reading costs ~20 us there, so the
cached per-token figures are not meaningful with it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone

import jsonschema
import torch
from common import append_results, machine

from scratchlm import structured
from scratchlm.llm import LLM
from scratchlm.structured import json_schema_constraint, masks
from scratchlm.structured.masks import vocabulary_trie

clock = time.perf_counter  # --clock cpu: time.thread_time


def twenty_properties() -> dict:
    kinds = [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"enum": ["red", "green", "blue"]},
             {"type": "number"}, {"type": "array", "items": {"type": "string"}, "maxItems": 3},
             {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
              "required": ["x", "y"]}]
    props = {name: kinds[i % len(kinds)] for i, name in enumerate(
        ["name", "age", "active", "color", "score", "tags", "position", "city", "count", "verified", "size",
         "ratio", "aliases", "origin", "country", "year", "admin", "shade", "weight", "notes"])}
    return {"type": "object", "properties": props, "required": list(props)}


PROMPT = [{"role": "user", "content": "Describe a fictional person as a JSON object with these fields: name, age, "
                                      "active, color, score, tags, position, city, count, verified, size, ratio, "
                                      "aliases, origin, country, year, admin, shade, weight, notes."}]


def decode_rate(llm: LLM, tokens: int, **kwargs) -> tuple[float, int]:
    """(tokens/s after the first token, tokens made) for one greedy completion."""
    start, first, n = time.perf_counter(), None, 0
    seqs = llm.sequences([PROMPT], llm.sampling(temperature=0, max_new_tokens=tokens, **kwargs))
    from scratchlm.generate import stream_sequences

    for _ in stream_sequences(llm.model, seqs):
        if first is None:
            first = time.perf_counter()
    n = len(seqs[0].output_ids)
    end = time.perf_counter()
    del start
    return (n - 1) / (end - first), n


class XGrammar:
    def __init__(self, tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = clock()
        special = set(tokenizer.special_tokens.values())
        vocab = [b"" if i in special else tokenizer.bytes_of(i) for i in range(tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=[tokenizer.eos_id])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.setup_s = clock() - t0
        self.size = tokenizer.vocab_size

    def first_mask(self, schema) -> tuple[float, object]:
        t0 = clock()
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(",", ":"), strict_mode=True)
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.size)
        matcher.fill_next_token_bitmask(bitmask)
        return clock() - t0, (compiled, bitmask)

    def per_token(self, compiled_bitmask, ids: list[int]) -> list[float]:
        compiled, bitmask = compiled_bitmask
        matcher = self.xgr.GrammarMatcher(compiled)
        times = []
        for t in ids:
            t0 = clock()
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(t)
            times.append(clock() - t0)
        return times


def forget_constraints() -> None:
    """Drop every compiled constraint and every shared per-top mask: the next request starts cold."""
    structured._CACHE.clear()
    masks._SHARED_TOPS.clear()


def ours_first_mask(llm: LLM, schema) -> tuple[float, structured.Constraint]:
    forget_constraints()
    t0 = clock()
    constraint = json_schema_constraint(schema)
    constraint.start(llm.tokenizer, llm.eos_ids).allowed()
    return clock() - t0, constraint


def ours_per_token(llm: LLM, constraint, ids: list[int]) -> list[float]:
    state = constraint.start(llm.tokenizer, llm.eos_ids)
    times = []
    for t in ids:
        t0 = clock()
        assert state.allowed()[t]
        state.advance(t)
        times.append(clock() - t0)
    return times


def stats(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"{statistics.mean(times) * 1e3:.3f} / {p99 * 1e3:.3f} / {ordered[-1] * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--masks-only", action="store_true", help="no model: compile and mask times only")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(2)
    if args.masks_only:  # one thread: a busy machine makes a second one spin, and thread time counts the spin
        torch.set_num_threads(1)
        return masks_only(args)
    llm = LLM.load("smollm2-135m-instruct")
    schema = twenty_properties()
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}

    t0 = clock()
    vocabulary_trie(llm.tokenizer)
    trie_s = clock() - t0
    xg = XGrammar(llm.tokenizer)

    say("compile + first mask")
    # Compile + first mask (fresh each time: our cache cleared, xgrammar's disabled).
    rows_compile = []
    bounded = {"type": "object", "properties": {"bio": {"type": "string", "maxLength": 200}}, "required": ["bio"]}
    for name, s in (("2 properties", person), ("20 properties", schema), ("a string with maxLength 200", bounded)):
        ours = statistics.median(ours_first_mask(llm, s)[0] for _ in range(args.repeats))
        theirs = statistics.median(xg.first_mask(s)[0] for _ in range(args.repeats))
        rows_compile.append((name, ours, theirs))

    say("decode")
    # Decode: unconstrained, constrained first request (cold masks), constrained again (warm).
    plain, cold, warm, made = [], [], [], 0
    decode_rate(llm, 8, ignore_eos=True)  # warm-up: the first decode pays one-off kernel set-up
    for _ in range(args.repeats):
        plain.append(decode_rate(llm, args.tokens, ignore_eos=True)[0])
        forget_constraints()
        rate, made = decode_rate(llm, args.tokens, json_schema=schema)
        cold.append(rate)
        warm.append(decode_rate(llm, args.tokens, json_schema=schema)[0])
    plain_m, cold_m, warm_m = (statistics.median(x) for x in (plain, cold, warm))

    say("per-token mask times")
    # Per-token mask time along the greedy output's tokens.
    out = llm.complete(PROMPT, json_schema=schema, temperature=0, max_new_tokens=400)
    ids = out.token_ids
    _, constraint = ours_first_mask(llm, schema)
    ours_cold = ours_per_token(llm, constraint, ids)
    ours_warm = ours_per_token(llm, constraint, ids)
    _, compiled = xg.first_mask(schema)
    xg.per_token(compiled, ids)  # warm-up
    theirs = xg.per_token(compiled, ids)

    say("validity")
    # Validity: sampled outputs that finished.
    valid = finished = 0
    validator = jsonschema.Draft202012Validator(schema)
    for seed in range(args.samples):
        c = llm.complete(PROMPT, json_schema=schema, temperature=1.0, seed=seed, max_new_tokens=400)
        if c.finish_reason == "stop":
            finished += 1
            try:
                valid += validator.is_valid(json.loads(c.text))
            except json.JSONDecodeError:
                pass

    lines = [
        f"\n## Structured output (benchmarks/structured.py), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {machine()}; torch {torch.__version__}, 2 threads; SmolLM2-135M-Instruct as LLM.load gives it; "
        f"xgrammar {_version('xgrammar')}. Command: `python benchmarks/structured.py --repeats {args.repeats} "
        f"--tokens {args.tokens} --samples {args.samples}`. Load average at start: {_load()}.\n",
        "| decode, greedy, same prompt | tokens/s (median) | vs unconstrained |",
        "|---|---|---|",
        f"| unconstrained ({args.tokens} tokens) | {plain_m:.1f} | 1.00 |",
        f"| 20-property JSON schema, first request ({made} tokens) | {cold_m:.1f} | {cold_m / plain_m:.2f} |",
        f"| 20-property JSON schema, again (masks cached) | {warm_m:.1f} | {warm_m / plain_m:.2f} |",
        "",
        "| compile + first mask (median) | ours ms | xgrammar ms | ours / xgrammar |",
        "|---|---|---|---|",
        *[f"| {n} | {o * 1e3:.1f} | {t * 1e3:.1f} | {o / t:.2f} |" for n, o, t in rows_compile],
        f"| once per tokenizer: vocabulary trie / TokenizerInfo+compiler | {trie_s * 1e3:.0f} | "
        f"{xg.setup_s * 1e3:.0f} | |",
        "",
        f"| per-token mask + advance, {len(ids)} tokens of the greedy output | mean / p99 / max ms |",
        "|---|---|",
        f"| ours, first request (masks computed as met) | {stats(ours_cold)} |",
        f"| ours, again (cached) | {stats(ours_warm)} |",
        f"| xgrammar | {stats(theirs)} |",
        "",
        f"Validity: {valid} of {finished} sampled outputs that finished parse and validate with jsonschema "
        f"(temperature 1, {args.samples} seeds, {args.samples - finished} stopped for length).\n",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        append_results(text)


INSTANCE = {"name": "Élodie Martin", "age": 34, "active": True, "color": "green", "score": 87.5,
            "tags": ["hiking", "jazz"], "position": {"x": 12, "y": -4}, "city": 'Lyon, "France"', "count": 7,
            "verified": False, "size": "red", "ratio": 0.42, "aliases": ["Lo"], "origin": {"x": 0, "y": 3},
            "country": "France", "year": 1990, "admin": True, "shade": "blue", "weight": 61.25,
            "notes": ["Likes tea; 日本 trip in 2019 😀", "x"]}


def masks_only(args) -> None:
    """Compile + first mask and per-token mask times on SmolLM2's tokenizer, along INSTANCE's tokens."""
    from scratchlm.formats.gguf import read_gguf
    from scratchlm.hub import model_path
    from scratchlm.tokenizer import Tokenizer

    class Holder:  # what ours_first_mask / ours_per_token use of an LLM
        pass

    llm = Holder()
    llm.tokenizer = Tokenizer.from_gguf_metadata(read_gguf(model_path("smollm2-135m-instruct"))[1])
    llm.eos_ids = {llm.tokenizer.eos_id}
    schema = twenty_properties()
    text = json.dumps({k: INSTANCE[k] for k in schema["properties"]}, ensure_ascii=False, separators=(",", ":"))
    ids = llm.tokenizer.encode(text)
    t0 = clock()
    vocabulary_trie(llm.tokenizer)
    trie_s = clock() - t0
    xg = XGrammar(llm.tokenizer)
    bounded = {"type": "object", "properties": {"bio": {"type": "string", "maxLength": 200}}, "required": ["bio"]}
    rows = []
    for name, s in (("20 properties", schema), ("a string with maxLength 200", bounded)):
        ours = statistics.median(ours_first_mask(llm, s)[0] for _ in range(args.repeats))
        theirs = statistics.median(xg.first_mask(s)[0] for _ in range(args.repeats))
        rows.append((name, ours, theirs))
    cold, warm = [], []
    for _ in range(args.repeats):
        _, constraint = ours_first_mask(llm, schema)
        cold += ours_per_token(llm, constraint, ids)
        warm += ours_per_token(llm, constraint, ids)
    _, compiled = xg.first_mask(schema)
    xg.per_token(compiled, ids)
    theirs = xg.per_token(compiled, ids)
    what = "thread CPU time" if args.clock == "cpu" else "wall clock"
    lines = [
        f"\n## Structured output, masks only (benchmarks/structured.py --masks-only), "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {machine()}; SmolLM2-135M-Instruct's tokenizer; xgrammar {_version('xgrammar')}; timed by {what}. "
        f"Command: `python benchmarks/structured.py --masks-only --clock {args.clock} --repeats {args.repeats}`. "
        f"Load average at start: {_load()}.\n",
        "| compile + first mask (median) | ours ms | xgrammar ms | ours / xgrammar |",
        "|---|---|---|---|",
        *[f"| {n} | {o * 1e3:.1f} | {t * 1e3:.1f} | {o / t:.2f} |" for n, o, t in rows],
        f"| once per tokenizer: vocabulary trie / TokenizerInfo+compiler | {trie_s * 1e3:.0f} | "
        f"{xg.setup_s * 1e3:.0f} | |",
        "",
        f"| per-token mask + advance, {len(ids)} tokens of a fixed instance, {args.repeats} runs | "
        "mean / p99 / max ms |",
        "|---|---|",
        f"| ours, first request (after compile + first mask) | {stats(cold)} |",
        f"| ours, again (cached) | {stats(warm)} |",
        f"| xgrammar | {stats(theirs)} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        append_results(text)


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


if __name__ == "__main__":
    main()
