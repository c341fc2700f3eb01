"""Serving throughput and latency: concurrent streaming clients against `scratchlm serve` on SmolLM2.

    .venv/bin/python benchmarks/serve.py               # prints a table
    .venv/bin/python benchmarks/serve.py --record      # ... and appends it to benchmarks/RESULTS.md

Method: the server runs in its own process (`scratchlm --threads 2 serve smollm2-135m-instruct`), the clients
in this one (httpx, asyncio). For 1, 4 and 16 concurrent clients, each client sends streaming chat requests
one after the other (a closed loop), every request a different question, greedy, exactly --tokens new tokens
(ignore_eos), usage from `stream_options.include_usage`. Per level:

- aggregate throughput = completion tokens of all requests / wall time from the first request to the last;
- time to first token (TTFT) = from sending a request to receiving its first text chunk; p50 and p95.

The peer is the same server with batching switched off (`--max-batch 1`), at 16 clients: what continuous
batching buys over serving one request at a time. Targets (issue 4): throughput at 16 clients >= 4x the
single-client rate, p95 TTFT at 16 clients < 2 s. The machine is shared: the load average is recorded.

`--part prefix` (issue 14): prefix caching. TTFT of a chat request whose ~1,000-token system prompt an earlier
request already sent (warm) against one whose system prompt is new (cold: its first line differs), alternating,
and the same warm request on a server with `--prefix-cache-mb 0` (target: warm <= 0.2x cold); then a 10-turn chat
(each turn resends the history with the model's replies): prompt tokens sent, and tokens actually prefilled
(prompt minus `usage.prompt_tokens_details.cached_tokens`) with and without the cache.

`--part adapters` (issue 14): four random rank-8 LoRA adapters on every projection of SmolLM2 (made here, written
as `scratchlm finetune` writes them), served together with `--adapter NAME=DIR`; 16 clients, client i asking
adapter i mod 4, against the base alone at 16 clients (target: >= 0.8x its aggregate tokens/s).
On a loaded machine run it with OMP_WAIT_POLICY=PASSIVE (recorded in the table header): OpenMP threads that
spin while waiting collapse a 2-thread server when other processes take the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import append_results, machine

from scratchlm.cpu import set_wait_policy

set_wait_policy()  # as the scratchlm command does, for the in-process decode steps of --part adapters (before torch)

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the moon", "volcanoes", "bread", "rivers", "chess", "owls", "glass", "trains", "tea", "bees",
          "clouds", "copper", "maps", "salt", "violins", "deserts", "snow", "paper", "whales", "bridges"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "scratchlm.cli", "--threads", str(threads), "serve", model, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


async def one_request(client: httpx.AsyncClient, model: str, question: str | list[dict], tokens: int) -> dict:
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    body = {"model": model, "messages": messages, "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    done = time.perf_counter()
    return {"ttft": first - sent, "tokens": usage["completion_tokens"], "sent": sent, "done": done,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def run_level(url: str, model: str | list[str], clients: int, per_client: int, tokens: int) -> dict:
    """``clients`` closed-loop clients; with a list of models, client i asks model i mod len(list)."""
    counter = iter(range(10**6))
    models = [model] if isinstance(model, str) else model

    async def client_loop(client, c):
        results = []
        for _ in range(per_client):
            i = next(counter)
            question = f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (request {i})."
            results.append(await one_request(client, models[c % len(models)], question, tokens))
        return results

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        per = await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
    results = [r for rs in per for r in rs]
    wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall": wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95),
            "load": os.getloadavg()[0]}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(model: str, max_batch: int, levels: list[tuple[int, int]], tokens: int, threads: int,
            extra: tuple[str, ...] = (), models: list[str] | None = None) -> list[dict]:
    proc, url = start_server(model, max_batch, threads, *extra)
    served = models or httpx.get(url + "/v1/models").json()["data"][0]["id"]
    try:
        asyncio.run(run_level(url, served, 1, 1, 8))  # warm-up
        return [asyncio.run(run_level(url, served, c, n, tokens)) for c, n in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="times the whole measurement is repeated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the --max-batch 1 peer")
    parser.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--part", choices=("batching", "prefix", "adapters", "all"), default="all",
                        help="what to measure (default all)")
    args = parser.parse_args()
    tables = []
    if args.part in ("batching", "all"):
        tables.append(batching_part(args))
    if args.part in ("prefix", "all"):
        from serve_cache import prefix_part

        tables.append(prefix_part(args))
    if args.part in ("adapters", "all"):
        from serve_cache import adapters_part

        tables.append(adapters_part(args))
    print("\n" + "\n".join(tables))
    if args.record:
        append_results("\n" + "\n".join(tables))


def batching_part(args) -> str:
    levels = [(1, 3), (4, 2), (16, 2)]  # (clients, requests per client)
    rows: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for r in measure(args.model, 16, levels, args.tokens, args.threads):
            rows.setdefault(("batched", r["clients"]), []).append(r)
            print(f"[{repeat + 1}/{args.repeats}] batched   {r['clients']:>2} clients: {r['tok_s']:6.1f} tok/s, "
                  f"TTFT p50 {r['ttft_p50']:.2f} s p95 {r['ttft_p95']:.2f} s, load {r['load']:.1f}", flush=True)
        if not args.no_baseline:
            for r in measure(args.model, 1, [(16, 1)], args.tokens, args.threads):
                rows.setdefault(("max-batch 1", r["clients"]), []).append(r)
                print(f"[{repeat + 1}/{args.repeats}] max-batch 1 16 clients: {r['tok_s']:6.1f} tok/s, "
                      f"TTFT p50 {r['ttft_p50']:.2f} s p95 {r['ttft_p95']:.2f} s, load {r['load']:.1f}", flush=True)
    return report(rows, args)


def report(rows: dict, args) -> str:
    import torch

    import scratchlm

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    single = med(rows[("batched", 1)], "tok_s")
    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    lines = [
        f"## Serving: concurrent streaming clients ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()} (shared with other jobs: load average shown). Python {platform.python_version()}, "
        f"torch {torch.__version__}, scratchlm {scratchlm.__version__}, server threads {args.threads}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        f"Command: `{env}.venv/bin/python benchmarks/serve.py {' '.join(sys.argv[1:])}` "
        f"(model {args.model}, float32, {args.tokens} new tokens per request, greedy, chat prompts of about 40 "
        f"tokens; median of {args.repeats} runs).",
        "",
        "| server | clients | requests | aggregate tok/s | vs 1 client | TTFT p50 | TTFT p95 | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kind, clients), rs in rows.items():
        tok_s = med(rs, "tok_s")
        lines.append(f"| {kind} | {clients} | {rs[0]['requests']} | {tok_s:.1f} | {tok_s / single:.2f}x | "
                     f"{med(rs, 'ttft_p50'):.2f} s | {med(rs, 'ttft_p95'):.2f} s | {med(rs, 'load'):.1f} |")
    at16 = med(rows[("batched", 16)], "tok_s") / single
    p95 = med(rows[("batched", 16)], "ttft_p95")
    lines += ["", f"Targets: 16 clients / 1 client = {at16:.2f}x (target >= 4x: {'met' if at16 >= 4 else 'NOT met'}); "
              f"p95 TTFT at 16 clients {p95:.2f} s (target < 2 s: {'met' if p95 < 2 else 'NOT met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
