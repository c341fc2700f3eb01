"""Function-calling quality on SmolLM2-135M-Instruct, in the Berkeley Function Calling Leaderboard's layout.

    python benchmarks/function_calling.py [--formats generic,hermes] [--categories simple,...] [--limit N]
                                          [--no-append]

The items (benchmarks/data/function_calling.jsonl, written here) follow BFCL's categories: ``simple`` (one tool
offered, one call expected), ``multiple`` (six tools offered, one call), ``parallel`` (six tools, several calls in
any order) and ``irrelevance`` (no tool fits: the right reply is an answer, not a call). Every item is asked with
``tool_choice="auto"``, greedy, once per tool format (scratchlm.tools: the generic whole-reply JSON, constrained;
the ``<tool_call>`` hermes prose format, free text with each call constrained once its tag is written).

Scored by an AST-style checker as BFCL's: the function names match, every required argument is there, no unknown
one is, and each value equals one of the accepted values by type (strings compared without case, spaces or
punctuation; an integer is accepted for a float; "" among the accepted values means the argument may be left out).
Prints per category: tool-name accuracy, exact (name and arguments) accuracy, the share of calls whose arguments
validate against the tool's schema, and seconds per item; appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import torch
from common import append_results, machine

from scratchlm.llm import LLM

DATA = Path(__file__).with_name("data") / "function_calling.jsonl"
BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def to_json_schema(node):
    """BFCL writes "dict" for object and "float" for number; the rest is JSON schema already."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()}
    if out.get("type") in BFCL_TYPES:
        kind = BFCL_TYPES[out["type"]]
        if kind is None:
            del out["type"]
        else:
            out["type"] = kind
    return out


def openai_tools(functions: list[dict]) -> list[dict]:
    return [{"type": "function", "function": {**f, "parameters": to_json_schema(f["parameters"])}}
            for f in functions]


# ---- the AST checker ---------------------------------------------------------------------------------------------
def standardize(text: str) -> str:
    """BFCL's string comparison: no case, spaces or punctuation."""
    return re.sub(r"[ ,./\-_*^'\"!?:;()]", "", text).lower()


def value_matches(value, accepted: list) -> bool:
    for ok in accepted:
        if ok == "":
            continue
        if isinstance(ok, str) and isinstance(value, str) and standardize(ok) == standardize(value):
            return True
        if isinstance(ok, bool) or isinstance(value, bool):
            if ok is value:
                return True
        elif isinstance(ok, float) and isinstance(value, (int, float)) and float(value) == ok:
            return True
        elif isinstance(ok, int) and isinstance(value, int) and value == ok:
            return True
        elif isinstance(ok, (list, dict)) and value == ok:
            return True
    return False


def call_matches(name: str, args: dict, truth: dict, function: dict) -> bool:
    """One call against one ground-truth entry {name: {arg: [accepted values]}}."""
    (expected_name, accepted), = truth.items()
    if name != expected_name or not isinstance(args, dict):
        return False
    if set(args) - set(accepted):
        return False
    for arg, values in accepted.items():
        if arg not in args:
            if "" not in values and arg in function["parameters"].get("required", []) + [arg]:
                return False
        elif not value_matches(args[arg], values):
            return False
    return True


def score(item: dict, calls: list[tuple[str, dict]]) -> dict:
    """name: the right functions were called; exact: and with the right arguments (parallel: in any order)."""
    truth = item["ground_truth"]
    if not truth:  # irrelevance: answering without a call is right
        return {"name": not calls, "exact": not calls}
    names_ok = Counter(n for n, _ in calls) == Counter(next(iter(t)) for t in truth)
    functions = {f["name"]: f for f in item["function"]}
    left = list(truth)
    for name, args in calls:
        match = next((t for t in left if call_matches(name, args, t, functions.get(name, {"parameters": {}}))), None)
        if match is None:
            return {"name": names_ok, "exact": False}
        left.remove(match)
    return {"name": names_ok, "exact": names_ok and not left}


# ---- running ------------------------------------------------------------------------------------------------------
def run(llm: LLM, items: list[dict], tool_format: str, max_tokens: int) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        tools = openai_tools(item["function"])
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        start = time.perf_counter()
        message = llm.chat(item["question"][0], tools=tools, tool_choice="auto", tool_format=tool_format,
                           parallel_tool_calls=item["category"] == "parallel", temperature=0,
                           max_new_tokens=max_tokens)
        seconds = time.perf_counter() - start
        calls, valid = [], []
        for c in message.get("tool_calls", []):
            args = json.loads(c["function"]["arguments"])
            calls.append((c["function"]["name"], args))
            valid.append(jsonschema.Draft202012Validator(schemas[c["function"]["name"]]).is_valid(args))
        rows.append({"id": item["id"], "category": item["category"], "calls": calls, "valid": valid,
                     "content": message.get("content"), "seconds": seconds, **score(item, calls)})
        print(f"  [{tool_format}] {i + 1}/{len(items)} {item['id']}: {'ok' if rows[-1]['exact'] else '--'} "
              f"{calls or repr((message.get('content') or '')[:60])}", file=sys.stderr)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| format | category | items | tool name | exact (name + arguments) | calls valid | s/item |",
             "|---|---|---|---|---|---|---|"]
    for fmt, rows in results.items():
        groups = defaultdict(list)
        for r in rows:
            groups[r["category"]].append(r)
        groups["all"] = rows
        for cat, rs in groups.items():
            valid = [v for r in rs for v in r["valid"]]
            lines.append(f"| {fmt} | {cat} | {len(rs)} | {sum(r['name'] for r in rs)}/{len(rs)} | "
                         f"{sum(r['exact'] for r in rs)}/{len(rs)} | "
                         f"{sum(valid)}/{len(valid)} | {sum(r['seconds'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--formats", default="generic,hermes")
    parser.add_argument("--limit", type=int, default=None, help="the first N items of each category")
    parser.add_argument("--categories", default="simple,multiple,parallel,irrelevance")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    items = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = [it for it in items if it["category"] in args.categories.split(",")]
    if args.limit:
        seen: Counter = Counter()
        items = [it for it in items if (seen.update([it["category"]]) or seen[it["category"]] <= args.limit)]
    llm = LLM.load(args.model)
    results = {fmt: run(llm, items, fmt, args.max_tokens) for fmt in args.formats.split(",")}
    text = table(results)
    print(text)
    if not args.no_append:
        command = "python " + " ".join(sys.argv)
        append_results(f"\n## Function calling (BFCL-style items), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
                       f"UTC\n\n{machine()}; {args.model}, greedy, tool_choice auto, `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
