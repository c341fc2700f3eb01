"""The issue-14 parts of benchmarks/serve.py (run them with `serve.py --part prefix|adapters`): prefix caching and
many LoRA adapters served in one batch. See serve.py's docstring for the method.

Run alone, this file times one decode step of 16 rows (base, four adapters, four adapters with their small
products on every thread), interleaved, in wall and CPU time:

    .venv/bin/python benchmarks/serve_cache.py --threads 2
"""

from __future__ import annotations

import asyncio
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import machine
from serve import TOPICS, measure, one_request, start_server

CHAT_TURNS = 10


def system_prompt(session: int) -> str:
    """About 1,000 tokens of instructions; the first line differs per session, so no two sessions share a block."""
    rules = " ".join(f"Rule {i}: when asked about {TOPICS[i % len(TOPICS)]}, answer politely in two sentences, "
                     f"cite timetable {i * 7}, and never promise refunds above {i * 3} euros." for i in range(1, 30))
    return f"Session {session}. You are the careful help desk of a railway company.\n{rules}"


def ttft(url: str, model: str, messages: list[dict]) -> dict:
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            return await one_request(client, model, messages, 4)
    return asyncio.run(go())


def chat(url: str, model: str, tokens: int) -> tuple[int, int, list[str]]:
    """A 10-turn conversation resending its history: (prompt tokens sent, tokens prefilled, replies)."""
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one or two sentences."}]
    sent = prefilled = 0
    replies = []
    for turn in range(CHAT_TURNS):
        messages.append({"role": "user", "content": f"Tell me one fact about {TOPICS[turn]}."})
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": model, "messages": messages, "max_tokens": tokens, "temperature": 0}).json()
        usage = r["usage"]
        sent += usage["prompt_tokens"]
        prefilled += usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        replies.append(r["choices"][0]["message"]["content"])
        messages.append({"role": "assistant", "content": replies[-1]})
    return sent, prefilled, replies


def prefix_part(args) -> str:
    on, on_url = start_server(args.model, 16, args.threads)
    off, off_url = start_server(args.model, 16, args.threads, "--prefix-cache-mb", "0")
    try:
        model = httpx.get(on_url + "/v1/models").json()["data"][0]["id"]
        for url in (on_url, off_url):  # warm-up
            ttft(url, model, [{"role": "user", "content": "Hi"}])
        rows = []
        for k in range(3 * args.repeats):
            system = {"role": "system", "content": system_prompt(k)}
            first = [system, {"role": "user", "content": f"When does the train to {TOPICS[k]} leave?"}]
            second = [system, {"role": "user", "content": f"Can I bring {TOPICS[k + 1]} on board?"}]
            row = {"cold": ttft(on_url, model, first), "warm": ttft(on_url, model, second)}
            ttft(off_url, model, first)
            row["off"] = ttft(off_url, model, second)
            rows.append(row)
            print(f"[{k + 1}/{3 * args.repeats}] prompt {row['warm']['prompt_tokens']} tokens: cold "
                  f"{row['cold']['ttft']:.3f} s, warm {row['warm']['ttft']:.3f} s "
                  f"({row['warm']['cached_tokens']} cached), cache off {row['off']['ttft']:.3f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        turns = {"on": chat(on_url, model, args.tokens // 2), "off": chat(off_url, model, args.tokens // 2)}
    finally:
        for proc in (on, off):
            proc.terminate()
            proc.wait(timeout=30)

    def med(kind):
        return statistics.median(r[kind]["ttft"] for r in rows)

    ratio = statistics.median(r["warm"]["ttft"] / r["cold"]["ttft"] for r in rows)
    same = turns["on"][2] == turns["off"][2]
    lines = header("Serving: prefix caching", args) + [
        f"TTFT of a chat request with a {rows[0]['warm']['prompt_tokens']}-token prompt whose system prompt "
        f"({rows[0]['warm']['cached_tokens']} tokens cached) an earlier request sent; median of {len(rows)} pairs:",
        "",
        "| request | TTFT median | TTFT best | vs cold |",
        "|---|---|---|---|",
        f"| cold (new system prompt) | {med('cold'):.3f} s | {min(r['cold']['ttft'] for r in rows):.3f} s | 1.00x |",
        f"| warm, prefix cache on | {med('warm'):.3f} s | {min(r['warm']['ttft'] for r in rows):.3f} s | "
        f"{ratio:.2f}x |",
        f"| warm, --prefix-cache-mb 0 | {med('off'):.3f} s | {min(r['off']['ttft'] for r in rows):.3f} s | "
        f"{statistics.median(r['off']['ttft'] / r['cold']['ttft'] for r in rows):.2f}x |",
        "",
        f"Target warm <= 0.2x cold: {'met' if ratio <= 0.2 else 'NOT met'} ({ratio:.2f}x).",
        "",
        f"A {CHAT_TURNS}-turn chat (greedy, {args.tokens // 2} tokens per reply, each turn resends the history): "
        f"{turns['on'][0]} prompt tokens sent; prefilled {turns['on'][1]} with the cache, {turns['off'][1]} "
        f"without ({turns['on'][1] / turns['off'][1]:.2f}x); replies identical with and without: "
        f"{'yes' if same else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


def make_adapters(model: str, directory: Path, count: int = 4, rank: int = 8) -> dict[str, Path]:
    """``count`` rank-``rank`` LoRA adapters on every projection, random (non-zero) A and B, PEFT format."""
    import torch

    from scratchlm.finetune.lora import LoraSettings, apply_lora
    from scratchlm.finetune.peft import base_fingerprint, save_adapter
    from scratchlm.llm import LLM

    llm = LLM.load(model, dtype="float32")
    fingerprint = base_fingerprint(llm.model)
    settings = LoraSettings(rank=rank, alpha=2 * rank)
    layers = apply_lora(llm.model, settings, seed=0)
    out = {}
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_A.weight.normal_(0, 0.02, generator=generator)
                layer.lora_B.weight.normal_(0, 0.02, generator=generator)
        out[f"adapter{i}"] = save_adapter(directory / f"adapter{i}", llm.model, settings, base_name=model,
                                          fingerprint=fingerprint)
    return out


STEP_KINDS = ("base", "adapters", "adapters, every thread")


def decode_steps(model: str, adapters: dict[str, Path], threads: int, repeats: int = 10) -> dict[str, tuple]:
    """One decode step of 16 rows at position 100, in this process, on ``threads`` threads: {kind: (wall ms, CPU
    ms)}, medians over ``repeats`` rounds whose order alternates. The same model object runs every kind: "base"
    with the adapters switched off; "adapters" as served (the small LoRA products of a decode step on one
    thread); "adapters, every thread" with those products on all ``threads`` (adapters.SINGLE_THREAD_ROWS = 0,
    the behaviour before 2026-12-02). CPU time is the process's, all threads together (OpenMP threads that spin
    or wait count), so it shows the cost of thread synchronisation that wall time on a loaded machine hides."""
    import torch

    from scratchlm.llm import LLM
    from scratchlm.model import KVCache
    from scratchlm.serve import adapters as adapters_module
    from scratchlm.serve.adapters import ServedAdapters

    torch.set_num_threads(threads)
    llm = LLM.load(model)
    served = ServedAdapters(llm.model, adapters, "base")
    cache = KVCache(llm.model.config, 16, 256)
    tokens = torch.randint(0, 1000, (16, 1), generator=torch.Generator().manual_seed(0))
    mixed = [1 + i % len(adapters) for i in range(16)]
    single_rows = adapters_module.SINGLE_THREAD_ROWS

    def step(kind: str) -> tuple[float, float]:
        served.select([0] * 16 if kind == "base" else mixed)
        adapters_module.SINGLE_THREAD_ROWS = 0 if kind == "adapters, every thread" else single_rows
        cache.lengths[:] = 100
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            llm.model.logits(llm.model.hidden_states(tokens, cache)[:, -1])
        return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000

    try:
        for _ in range(3):
            for kind in STEP_KINDS:
                step(kind)
        times: dict[str, list] = {kind: [] for kind in STEP_KINDS}
        for r in range(repeats):
            for kind in STEP_KINDS if r % 2 == 0 else STEP_KINDS[::-1]:
                times[kind].append(step(kind))
    finally:
        adapters_module.SINGLE_THREAD_ROWS = single_rows
    return {kind: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for kind, ts in times.items()}


def step_lines(steps: dict[int, dict[str, tuple]]) -> list[str]:
    """The decode-step table: per thread count, each kind's wall and CPU time and its ratio to the base."""
    lines = ["| threads | step | wall ms | vs base (wall) | CPU ms | vs base (CPU) |", "|---|---|---|---|---|---|"]
    for n, kinds in steps.items():
        (bw, bc) = kinds["base"]
        for kind, (w, c) in kinds.items():
            lines.append(f"| {n} | {kind} | {w:.1f} | {bw / w:.2f}x | {c:.1f} | {bc / c:.2f}x |")
    return lines


def adapters_part(args) -> str:
    rows: dict[str, list[dict]] = {"base": [], "adapters": []}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp))
        load = os.getloadavg()[0]
        steps = {n: decode_steps(args.model, adapters, n) for n in sorted({1, args.threads})}
        step_load = (load, os.getloadavg()[0])
        print("\n".join(step_lines(steps)), flush=True)
        extra = tuple(x for name, d in adapters.items() for x in ("--adapter", f"{name}={d}"))
        for repeat in range(args.repeats):
            for kind in ("base", "adapters") if repeat % 2 == 0 else ("adapters", "base"):
                r = measure(args.model, 16, [(16, 2)], args.tokens, args.threads,
                            *((extra, list(adapters)) if kind == "adapters" else ()))[0]
                rows[kind].append(r)
                print(f"[{repeat + 1}/{args.repeats}] {kind:>8} 16 clients: {r['tok_s']:6.1f} tok/s, TTFT p50 "
                      f"{r['ttft_p50']:.2f} s, load {r['load']:.1f}", flush=True)

    def med(kind, key):
        return statistics.median(r[key] for r in rows[kind])

    ratio = med("adapters", "tok_s") / med("base", "tok_s")
    lines = header("Serving: four LoRA adapters in one batch", args) + [
        "| server | clients | aggregate tok/s | vs base | TTFT p50 | TTFT p95 | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("base", "base alone"), ("adapters", "4 adapters (rank 8, all projections), client i -> "
                                                             "adapter i mod 4")):
        lines.append(f"| {label} | 16 | {med(kind, 'tok_s'):.1f} | {med(kind, 'tok_s') / med('base', 'tok_s'):.2f}x "
                     f"| {med(kind, 'ttft_p50'):.2f} s | {med(kind, 'ttft_p95'):.2f} s | {med(kind, 'load'):.1f} |")
    lines += ["", f"Target >= 0.8x the base alone: {'met' if ratio >= 0.8 else 'NOT met'} ({ratio:.2f}x).", "",
              "One decode step of 16 rows in one process (same model; the base with the adapters switched off; "
              "'every thread': the adapters' small products on all threads, as before 2026-12-02), median of 10 "
              f"alternating rounds, load average {step_load[0]:.1f} -> {step_load[1]:.1f}:", "",
              *step_lines(steps), ""]
    return "\n".join(lines)


def header(title: str, args) -> list[str]:
    import torch

    import scratchlm

    return [
        f"## {title} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()} (shared: load average {os.getloadavg()[0]:.1f} at the end). torch {torch.__version__}, "
        f"scratchlm {scratchlm.__version__}, server threads {args.threads}.",
        f"Command: `.venv/bin/python benchmarks/serve.py {' '.join(sys.argv[1:])}` (model {args.model} as served by "
        f"default: int4 from its GGUF; {args.tokens} new tokens per throughput request, greedy).",
        "",
    ]


def main() -> None:
    """The decode-step micro-benchmark alone (a minute): `.venv/bin/python benchmarks/serve_cache.py`."""
    import argparse

    parser = argparse.ArgumentParser(description="One decode step of 16 rows: the base against four LoRA adapters")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="alternating rounds per thread count")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp))
        steps = {n: decode_steps(args.model, adapters, n, args.repeats) for n in sorted({1, args.threads})}
    print(f"{machine()}; load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print("\n".join(step_lines(steps)))


if __name__ == "__main__":
    main()
