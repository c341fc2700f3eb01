"""Serving throughput and latency: concurrent streaming clients against `scratchlm serve` and llama.cpp's
`llama-server` on the same SmolLM2 GGUF.

    bash benchmarks/setup_llamacpp.sh                              # once: builds llama-server (outside the repo)
    .venv/bin/python benchmarks/serve.py --part batching           # ours vs llama-server: prints the tables
    .venv/bin/python benchmarks/serve.py --part batching --record  # ... and appends them to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/serve.py --record                  # every part (batching, prefix, adapters)

`--part batching` takes about 6 minutes on an idle 2-core machine (two repeats). Without the llama-server binary
(`--llama-server PATH`, default $LLAMA_SERVER or /work/peers/llama-server/bin/llama-server) its column is left out
with a notice.

Method: each server runs in its own process, the clients in this one (httpx, asyncio). For 1, 4 and 16 concurrent
clients, each client sends streaming chat requests one after the other (a closed loop), every request a different
question, greedy, exactly --tokens new tokens (ignore_eos), usage from `stream_options.include_usage`. Per level:

- aggregate throughput = completion tokens of all requests / wall time from the first request to the last;
- time to first token (TTFT) = from sending a request to receiving its first text chunk; p50 and p95;
- peak RSS of the server's process tree over its whole run (start, warm-up and all levels): the largest sum of
  the tree's resident sets, sampled every 50 ms, or the root process's own high-water mark if larger.

The servers, with the same load and the same environment (GOMP_SPINCOUNT as the scratchlm command sets it):

- `scratchlm --threads 2 serve smollm2-135m-instruct` with its defaults (16 batch slots of 2,048 positions, of which
  only the positions requests reach take memory; the engine that `scratchlm info` reports under "runs as");
- llama.cpp's `llama-server -m <the same GGUF> -t 2 -tb 2 -np 16 -c 4096`: 16 slots of 256 positions
  (a request needs about 105: its prompt and 64 new tokens); continuous batching is its default. Built by
  benchmarks/setup_llamacpp.sh from the llama.cpp tree in the llama-cpp-python sdist that benchmarks/decode.py
  measures;
- unless --no-baseline: `scratchlm serve --max-batch 1` at 16 clients (what continuous batching buys over one
  request at a time), and once, at 16 clients, scratchlm with `--max-len 256` (llama-server's positions per slot).

Both get a warm-up (one request, then 16 at once) before the levels; the order of the two servers alternates
between repeats. Targets (issue 4): throughput at 16 clients >= 4x the single-client rate, p95 TTFT at 16 clients
< 2 s; (issue 11) at 16 clients: aggregate tokens/s >= 1.0x llama-server's, p95 TTFT <= llama-server's, peak RSS
<= 1.5x llama-server's. Both servers also answer one plain greedy question first, printed side by side (their
texts may part after a few tokens: llama.cpp rounds activations to 8 bits in its matrix products). The machine
is shared: the load average is recorded.

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import append_results, machine
from serve_procs import (
    SLOT_CONTEXT,
    free_port,
    llama_server_command,
    running,
    scratchlm_command,
    start_server,  # noqa: F401 (serve_cache.py imports it from here)
)

from scratchlm.cpu import set_wait_policy

set_wait_policy()  # as the scratchlm command does, for the in-process decode steps of --part adapters (before torch)

LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "/work/peers/llama-server/bin/llama-server")
LEVELS = [(1, 3), (4, 2), (16, 2)]  # (clients, requests per client)
OURS = "scratchlm (defaults)"  # its default 2048 positions per slot: only the positions used are resident
SHORT = f"scratchlm --max-len {SLOT_CONTEXT}"
TOPICS = ["the moon", "volcanoes", "bread", "rivers", "chess", "owls", "glass", "trains", "tea", "bees",
          "clouds", "copper", "maps", "salt", "violins", "deserts", "snow", "paper", "whales", "bridges"]


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
            "prompt_tokens": statistics.median(r["prompt_tokens"] for r in results), "load": os.getloadavg()[0]}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(model: str, max_batch: int, levels: list[tuple[int, int]], tokens: int, threads: int,
            extra: tuple[str, ...] = (), models: list[str] | None = None, llama_server: str | None = None,
            reply: dict | None = None) -> list[dict]:
    """Run the client levels against a fresh server (``llama_server``: that binary on ``model``'s GGUF, else
    scratchlm); every result carries the server's peak RSS over the whole run (``rss``, bytes). With ``reply``
    (a dict), the server's greedy answer to REPLY_QUESTION is stored in it first, under the server's name."""
    port = free_port()
    if llama_server:
        cmd, name = llama_server_command(llama_server, gguf_path(model), max_batch, threads, port), "llama-server"
    else:
        cmd, name = scratchlm_command(model, max_batch, threads, port, *extra), "scratchlm"
    with running(cmd, port, name) as (url, sampler):
        served = models or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        if reply is not None:
            reply[name] = greedy_reply(url, served if isinstance(served, str) else served[0])
        asyncio.run(run_level(url, served, 1, 1, 8))  # warm-up: one stream, then a full batch
        asyncio.run(run_level(url, served, max_batch, 1, 8))
        results = [asyncio.run(run_level(url, served, c, n, tokens)) for c, n in levels]
        rss = sampler.stop()
    for r in results:
        r["rss"] = rss
    return results


REPLY_QUESTION = "What is the capital of France? Answer in one sentence, then name one famous building there."


def greedy_reply(url: str, model: str, tokens: int = 48) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": REPLY_QUESTION}], "max_tokens": tokens,
            "temperature": 0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def gguf_path(model: str) -> Path:
    """The GGUF file behind a model name or path (llama-server needs the file itself)."""
    from scratchlm.hub import resolve

    path = resolve(model)
    if path.suffix != ".gguf":
        raise SystemExit(f"llama-server needs a GGUF file, and {model} is {path}: pass --no-llama-server")
    return path


def llama_server_binary(args) -> str | None:
    """The llama-server to race, or None (with a notice) when it is not built or not wanted."""
    if args.no_llama_server:
        return None
    if not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
        print(f"notice: no llama-server at {args.llama_server}: its column is left out (build it with "
              "`bash benchmarks/setup_llamacpp.sh`, or pass --llama-server PATH)", file=sys.stderr)
        return None
    return args.llama_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="times the whole measurement is repeated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the --max-batch 1 peer")
    parser.add_argument("--llama-server", default=LLAMA_SERVER, metavar="PATH",
                        help=f"llama.cpp's server binary to race (default $LLAMA_SERVER or {LLAMA_SERVER})")
    parser.add_argument("--no-llama-server", action="store_true", help="skip the llama-server column")
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
    llama = llama_server_binary(args)
    rows: dict[tuple[str, int], list[dict]] = {}
    replies: dict[str, str] = {}
    # (row name, slots, scratchlm's extra flags, llama-server binary): the race gives both servers the same
    # context per slot; scratchlm's default (2048 positions per slot) is measured once more, at 16 clients.
    race = [(OURS, 16, (), None), *((("llama-server", 16, (), llama),) if llama else ())]
    for repeat in range(args.repeats):
        for kind, slots, extra, binary in race if repeat % 2 == 0 else race[::-1]:  # alternate who goes first
            for r in measure(args.model, slots, LEVELS, args.tokens, args.threads, extra, llama_server=binary,
                             reply=replies if repeat == 0 else None):
                rows.setdefault((kind, r["clients"]), []).append(r)
                progress(repeat, args, kind, r)
        if not args.no_baseline:
            for r in measure(args.model, 1, [(16, 1)], args.tokens, args.threads):
                rows.setdefault(("scratchlm --max-batch 1", r["clients"]), []).append(r)
                progress(repeat, args, "scratchlm --max-batch 1", r)
    if not args.no_baseline:
        for r in measure(args.model, 16, [(16, 2)], args.tokens, args.threads, ("--max-len", str(SLOT_CONTEXT))):
            rows.setdefault((SHORT, r["clients"]), []).append(r)
            progress(args.repeats - 1, args, SHORT, r)
    for name, text in replies.items():
        print(f"{name} greedy reply to {REPLY_QUESTION!r}:\n    {text!r}")
    return report(rows, args, replies)


def progress(repeat: int, args, kind: str, r: dict) -> None:
    print(f"[{repeat + 1}/{args.repeats}] {kind:<24} {r['clients']:>2} clients: {r['tok_s']:6.1f} tok/s, TTFT p50 "
          f"{r['ttft_p50']:.2f} s p95 {r['ttft_p95']:.2f} s, peak RSS {r['rss'] / 2**20:.0f} MiB, "
          f"load {r['load']:.1f}", flush=True)


def report(rows: dict, args, replies: dict[str, str]) -> str:
    import torch

    import scratchlm
    from scratchlm.info import model_info

    def med(kind, clients, key):
        return statistics.median(r[key] for r in rows[(kind, clients)])

    ours = OURS
    single = med(ours, 1, "tok_s")
    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    llama = any(kind == "llama-server" for kind, _ in rows)
    peer = (f"; llama-server {llama_server_version(args.llama_server)}, `-t {args.threads} -tb {args.threads} -np 16 "
            f"-c {16 * SLOT_CONTEXT}`" if llama else "; llama-server not run")
    lines = [
        f"## Serving: concurrent streaming clients ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {machine()} (shared with other jobs: load average shown). Python {platform.python_version()}, "
        f"torch {torch.__version__}, scratchlm {scratchlm.__version__}, server threads {args.threads}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')} (both servers){peer}.",
        f"Command: `{env}.venv/bin/python benchmarks/serve.py {' '.join(sys.argv[1:])}` "
        f"(model {args.model}, scratchlm runs it as: {model_info(args.model)['runs as']}; {args.tokens} new tokens "
        f"per request, greedy; median of {args.repeats} runs; peak RSS of the server's process tree).",
        "",
        "| server | clients | requests | prompt tokens | aggregate tok/s | vs 1 client | TTFT p50 | TTFT p95 | "
        "peak RSS | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, clients), rs in rows.items():
        tok_s = med(kind, clients, "tok_s")
        lines.append(f"| {kind} | {clients} | {rs[0]['requests']} | {med(kind, clients, 'prompt_tokens'):.0f} | "
                     f"{tok_s:.1f} | {tok_s / med(kind, 1, 'tok_s') if (kind, 1) in rows else tok_s / single:.2f}x | "
                     f"{med(kind, clients, 'ttft_p50'):.2f} s | {med(kind, clients, 'ttft_p95'):.2f} s | "
                     f"{med(kind, clients, 'rss') / 2**20:.0f} MiB | {med(kind, clients, 'load'):.1f} |")
    at16 = med(ours, 16, "tok_s") / single
    p95 = med(ours, 16, "ttft_p95")
    lines += ["", f"Targets: 16 clients / 1 client = {at16:.2f}x (target >= 4x: {'met' if at16 >= 4 else 'NOT met'}); "
              f"p95 TTFT at 16 clients {p95:.2f} s (target < 2 s: {'met' if p95 < 2 else 'NOT met'}).", ""]
    if llama:
        lines += ["scratchlm / llama-server, same clients, same prompts:", "",
                  "| clients | aggregate tok/s | TTFT p50 | TTFT p95 | peak RSS |", "|---|---|---|---|---|"]
        for clients, _ in LEVELS:
            ratio = {key: med(ours, clients, key) / med("llama-server", clients, key)
                     for key in ("tok_s", "ttft_p50", "ttft_p95", "rss")}
            lines.append(f"| {clients} | {ratio['tok_s']:.2f}x | {ratio['ttft_p50']:.2f}x | {ratio['ttft_p95']:.2f}x | "
                         f"{ratio['rss']:.2f}x |")
        tok, ttft, rss = (med(ours, 16, k) / med("llama-server", 16, k) for k in ("tok_s", "ttft_p95", "rss"))
        if (SHORT, 16) in rows:
            short = med(SHORT, 16, "rss") / med("llama-server", 16, "rss")
            lines += ["", f"With --max-len {SLOT_CONTEXT} (llama-server's positions per slot) scratchlm's peak RSS is "
                      f"{short:.2f}x llama-server's."]
        lines += ["", "Targets at 16 clients (issue 11): aggregate tokens/s "
                  f"{tok:.2f}x llama-server's (>= 1.0x: {'met' if tok >= 1 else 'NOT met'}); p95 TTFT {ttft:.2f}x "
                  f"(<= 1.0x: {'met' if ttft <= 1 else 'NOT met'}); peak RSS {rss:.2f}x (<= 1.5x: "
                  f"{'met' if rss <= 1.5 else 'NOT met'}).", ""]
    if replies:
        same = len(set(replies.values())) == 1
        lines += [f"Greedy reply to \"{REPLY_QUESTION}\" ({'identical' if same else 'they differ'}):", ""]
        lines += [f"- {name}: \"{text.strip()}\"" for name, text in replies.items()]
        lines.append("")
    return "\n".join(lines)


def llama_server_version(binary: str) -> str:
    """llama-server's build line, e.g. "version: 1 (abc123)"."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    found = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return found[0].removeprefix("version: ") if found else "(version unknown)"


if __name__ == "__main__":
    main()
