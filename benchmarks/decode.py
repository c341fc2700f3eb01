"""Decode and prefill speed and peak memory: scratchlm against HF transformers on the same GGUF.

    .venv/bin/python benchmarks/decode.py                  # all engines, prints a table and ratios
    .venv/bin/python benchmarks/decode.py --record         # ... and appends the table to benchmarks/RESULTS.md

Method (shared/BENCHMARKS.md): every engine runs in a fresh process (so peak RSS is its own) with
2 threads, on the same prompt ids; greedy decoding; a warm-up, then 3 repeats, median and best.
Decode tokens/s = (tokens - 1) / (time after the first token), 128 new tokens. Prefill tokens/s = 512 prompt
tokens / time to the first token. The script also measures this machine's copy bandwidth and prints the
decode limit it implies (weight bytes read per token / bandwidth) and each engine's share of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
NEW_TOKENS = 128
PREFILL_TOKENS = 512
REPEATS = 3
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair. "
)


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def copy_bandwidth_gbs() -> float:
    """Bytes read plus written per second by a large tensor copy (best of 5)."""
    import torch

    src = torch.ones(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


# --------------------------------------------------------------------------------------------------
def run_scratchlm(path: str, dtype: str) -> dict:
    import torch

    from scratchlm.generate import Sequence, stream_sequences
    from scratchlm.llm import LLM
    from scratchlm.sampling import SamplingParams

    llm = LLM.load(path, dtype=dtype)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in llm.model.parameters()}.values())

    def timed(ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
        seq = Sequence(ids, params.__class__(**{**params.__dict__, "max_new_tokens": new_tokens}),
                       llm.tokenizer, llm.eos_ids, llm.config.vocab_size, llm.config.context_length)
        stamps: list[float] = []
        push = seq.push
        seq.push = lambda tok: (stamps.append(time.perf_counter()), push(tok))[1]
        start = time.perf_counter()
        for _ in stream_sequences(llm.model, [seq]):
            pass
        return start, stamps, seq.output_ids

    with torch.inference_mode():
        short = prompt_ids(llm.tokenizer, 16)
        long = prompt_ids(llm.tokenizer, PREFILL_TOKENS)
        return measure(lambda: timed(short, NEW_TOKENS), lambda: timed(long, 1), weight_bytes)


def run_hf(path: str, dtype: str) -> dict:
    import torch
    import transformers

    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        p.parent, gguf_file=p.name, dtype=getattr(torch, dtype)
    ).eval()
    from scratchlm.formats.gguf import read_gguf
    from scratchlm.tokenizer import Tokenizer  # same prompt ids as scratchlm

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(p)[1])
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())

    class Stamps(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.ids: list[int] = []
            self.first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.times.append(time.perf_counter())
            self.ids += value.flatten().tolist()

        def end(self):
            pass

    def timed(ids: list[int], new_tokens: int):
        streamer = Stamps()
        start = time.perf_counter()
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=streamer, pad_token_id=0)
        return start, streamer.times, streamer.ids

    with torch.inference_mode():
        short = prompt_ids(tokenizer, 16)
        long = prompt_ids(tokenizer, PREFILL_TOKENS)
        return measure(lambda: timed(short, NEW_TOKENS), lambda: timed(long, 1), weight_bytes)


def measure(decode_run, prefill_run, weight_bytes: int) -> dict:
    decode_run()  # warm-up
    prefill_run()
    decode, prefill, ids = [], [], None
    for _ in range(REPEATS):
        start, stamps, out = decode_run()
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        ids = ids or out
        start, stamps, _ = prefill_run()
        prefill.append(PREFILL_TOKENS / (stamps[0] - start))
    return {
        "decode_median": statistics.median(decode), "decode_best": max(decode),
        "prefill_median": statistics.median(prefill), "prefill_best": max(prefill),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "weight_bytes": weight_bytes, "bandwidth_gbs": copy_bandwidth_gbs(), "first_ids": ids[:16],
    }


ENGINES = {
    "scratchlm-float32": (run_scratchlm, "float32"),
    "scratchlm-bfloat16": (run_scratchlm, "bfloat16"),
    "hf-float32": (run_hf, "float32"),
    "hf-bfloat16": (run_hf, "bfloat16"),
}


def child(engine: str, path: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    fn, dtype = ENGINES[engine]
    print(json.dumps(fn(path, dtype)))


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the pulled SmolLM2)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from scratchlm.hub import pull

        args.model = str(pull("smollm2-135m-instruct", progress=False))
    if args.child:
        child(args.child, args.model)
        return

    results = {}
    for engine in args.engines.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", engine, "--model", args.model],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{engine}: done", file=sys.stderr)

    bandwidth = statistics.median(r["bandwidth_gbs"] for r in results.values())
    lines = [
        f"bandwidth (copy, read+write): {bandwidth:.1f} GB/s, {THREADS} threads",
        "",
        "| engine | decode tok/s (median / best) | share of bandwidth limit | prefill 512 tok/s (median / best) "
        "| peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        limit = bandwidth * 1e9 / r["weight_bytes"]
        lines.append(f"| {engine} | {r['decode_median']:.1f} / {r['decode_best']:.1f} | "
                     f"{r['decode_median'] / limit:.0%} of {limit:.0f} | "
                     f"{r['prefill_median']:.0f} / {r['prefill_best']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines.append("")
    for dtype in ("float32", "bfloat16"):
        ours, peer = results.get(f"scratchlm-{dtype}"), results.get(f"hf-{dtype}")
        if ours and peer:
            same = "identical" if ours["first_ids"] == peer["first_ids"] else "DIFFERENT"
            lines.append(f"- {dtype}: decode {ours['decode_median'] / peer['decode_median']:.2f}x HF, "
                         f"prefill {ours['prefill_median'] / peer['prefill_median']:.2f}x HF, "
                         f"peak RSS {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x HF; "
                         f"first 16 greedy ids {same}")
    table = "\n".join(lines)
    print(table)
    if args.record:
        import torch
        import transformers

        header = (f"\n## decode.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                  f"Machine: {machine()}. torch {torch.__version__}, transformers {transformers.__version__}. "
                  f"Model: {Path(args.model).name}. Command: `.venv/bin/python benchmarks/decode.py --record`.\n\n")
        results_md = Path(__file__).with_name("RESULTS.md")
        if not results_md.exists():
            results_md.write_text("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n")
        with open(results_md, "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
