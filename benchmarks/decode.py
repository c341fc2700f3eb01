"""Decode and prefill speed, peak memory and perplexity: scratchlm (its default engine, float32, bfloat16, int8,
int4) against HF transformers and llama.cpp on the same GGUF; and the start-up time of the plain command.

    .venv/bin/python benchmarks/decode.py                  # all engines, prints a table and ratios
    .venv/bin/python benchmarks/decode.py --record         # ... and appends the table to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/decode.py --engines scratchlm-default --profile   # + one decode step, profiled
    bash benchmarks/setup_llamacpp.sh                      # once, for the llama.cpp engine (never in CI)

"scratchlm-default" is what `LLM.load(model)` and `scratchlm generate/chat/serve MODEL` do without options: a
Q4 GGUF stays int4 and decodes through the compiled step, cached on disk (scratchlm.compile_cache); its first
compile on this machine is spent before the measured runs (in a separate process, so that the measured one
loads from the cache as a user's second run does). Start-up: the wall time of
`scratchlm generate MODEL "Hi" --max-new-tokens 1`, run twice, the second one counts (issue 11: <= 3 s), and
where the default engine's time goes before its first token (import, load, first decode step).

scratchlm's int8/int4 engines load a checkpoint written by `scratchlm quantize` (made once, in
$SCRATCHLM_HOME/bench/), computing in bfloat16, as a user would deploy them; "-compiled" adds
`scratchlm.compiled.compile_decoding` (its compile time is spent in the warm-up). llama.cpp runs through
llama-cpp-python in its own virtualenv, with the same prompt ids and 2 threads. Perplexity: every engine
scores the same token ids of a held-out text (the last 16 KB of the bundled Shakespeare corpus) in disjoint
windows of 512 tokens, measured after the peak RSS so that its logits do not count in it.

Method (shared/BENCHMARKS.md): every engine runs in a fresh process (so peak RSS is its own) with
2 threads, on the same prompt ids; greedy decoding; a warm-up, then 3 repeats, median and best.
Decode tokens/s = (tokens - 1) / (time after the first token), 128 new tokens. Prefill tokens/s = 512 prompt
tokens / time to the first token. The script also measures this machine's copy bandwidth and prints the
decode limit it implies (weight bytes read per token / bandwidth) and each engine's share of it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import append_results, section_header

THREADS = 2
NEW_TOKENS = 128
PREFILL_TOKENS = 512
REPEATS = 3
PPL_CONTEXT = 512
PEER_PYTHON = Path("/work/peers/llamacpp-venv/bin/python")  # made by benchmarks/setup_llamacpp.sh
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
def run_scratchlm(path: str, dtype: str | None, quantize: str | None = None, compiled: bool | None = False,
                  job: dict | None = None, profile: bool = False) -> dict:
    start_up = {"import_s": time.perf_counter()}
    import torch

    from scratchlm.generate import Sequence, stream_sequences
    from scratchlm.llm import LLM
    from scratchlm.sampling import SamplingParams

    start_up["import_s"] = time.perf_counter() - start_up["import_s"]
    t = time.perf_counter()
    # dtype None and compiled None: the default engine (LLM.load's own choices), as the plain command runs it
    llm = LLM.load(job["quantized"][quantize] if quantize else path, dtype=dtype, compile=compiled)
    start_up["load_s"] = time.perf_counter() - t
    if getattr(llm.model, "decoder", None) is not None:
        t = time.perf_counter()
        llm.generate(job["short"], max_new_tokens=2, temperature=0)  # the first decode step: compile or cache
        start_up["first_decode_s"] = time.perf_counter() - t
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tensors = {id(t): t for t in [*llm.model.parameters(), *llm.model.buffers()]}.values()
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)

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
        result = measure(lambda: timed(short, NEW_TOKENS), lambda: timed(long, 1), weight_bytes)
        if profile:
            result["profile"] = profile_decode(llm, short)
    result["start_up"] = start_up
    decoder = getattr(llm.model, "decoder", None)
    result["engine"] = (f"{'compiled' if decoder is not None and decoder.compiled else 'eager'}, "
                        f"{(getattr(llm.model, 'quantization', None) or {}).get('mode', 'dense')}")
    from scratchlm.eval.perplexity import perplexity

    result["perplexity"] = perplexity(llm.model, job["ppl_ids"], PPL_CONTEXT, PPL_CONTEXT).perplexity
    return result


def profile_decode(llm, ids: list[int], tokens: int = 16) -> str:
    """torch.profiler's table (self CPU time) over ``tokens`` decode steps: where a token's time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    llm.generate(ids, max_new_tokens=4, temperature=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(ids, max_new_tokens=tokens + 1, temperature=0, ignore_eos=True)
    del torch
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + \
        f"\n(over {tokens} decode steps and one {len(ids)}-token prefill)"


def start_up_seconds(model: str) -> list[float]:
    """Wall seconds of `scratchlm generate MODEL "Hi" --max-new-tokens 1`, run twice (the second: caches warm)."""
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scratchlm.cli", "generate", model, "Hi", "--max-new-tokens", "1",
                        "--no-progress"], check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    return walls


def disjoint_windows(ids: list[int]) -> list[list[int]]:
    """The windows every engine scores: disjoint, PPL_CONTEXT tokens (the last one may be shorter)."""
    return [ids[i : i + PPL_CONTEXT] for i in range(0, len(ids), PPL_CONTEXT) if len(ids[i : i + PPL_CONTEXT]) > 1]


def nll_of_window(logits, window: list[int]) -> float:
    """Summed negative log-likelihood of window[1:] given logits [T, V] (numpy or torch, any float dtype)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)[:-1]
    x = x - x.max(axis=-1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(window) - 1), window[1:]].sum())


def perplexity_from(logits_of, ids: list[int]) -> float:
    import math

    windows = disjoint_windows(ids)
    nll = sum(nll_of_window(logits_of(w), w) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def run_llamacpp(path: str, dtype: str, job: dict) -> dict:
    """llama.cpp through llama-cpp-python (run by the peer venv's python; no torch imported here)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                logits_all=False, verbose=False, seed=0)

    def timed(ids: list[int], new_tokens: int):
        llm.reset()
        stamps, out = [], []
        start = time.perf_counter()
        llm.eval(ids)
        for i in range(new_tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            stamps.append(time.perf_counter())
            if i + 1 < new_tokens:
                llm.eval(out[-1:])
        return start, stamps, out

    weight_bytes = Path(path).stat().st_size
    result = measure(lambda: timed(job["short"], NEW_TOKENS), lambda: timed(job["long"], 1), weight_bytes,
                     bandwidth=False)
    scorer = Llama(model_path=path, n_ctx=PPL_CONTEXT, n_batch=PPL_CONTEXT, n_threads=THREADS,
                   n_threads_batch=THREADS, logits_all=True, verbose=False, seed=0)

    def logits_of(window):
        scorer.reset()
        scorer.eval(window)
        return scorer.scores[: len(window)]

    result["perplexity"] = perplexity_from(logits_of, job["ppl_ids"])
    result["version"] = __import__("llama_cpp").__version__
    return result


def run_hf(path: str, dtype: str, job: dict | None = None) -> dict:
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
        result = measure(lambda: timed(short, NEW_TOKENS), lambda: timed(long, 1), weight_bytes)
        result["perplexity"] = perplexity_from(lambda w: model(torch.tensor([w])).logits[0].float().numpy(),
                                               job["ppl_ids"])
    return result


def measure(decode_run, prefill_run, weight_bytes: int, bandwidth: bool = True) -> dict:
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
        "weight_bytes": weight_bytes, "bandwidth_gbs": copy_bandwidth_gbs() if bandwidth else None,
        "first_ids": ids[:16],
    }


ENGINES = {
    "scratchlm-default": (run_scratchlm, None, {"compiled": None}),
    "scratchlm-float32": (run_scratchlm, "float32", {}),
    "scratchlm-bfloat16": (run_scratchlm, "bfloat16", {}),
    "scratchlm-int8": (run_scratchlm, "bfloat16", {"quantize": "int8"}),
    "scratchlm-int4": (run_scratchlm, "bfloat16", {"quantize": "int4"}),
    "scratchlm-int4-compiled": (run_scratchlm, "bfloat16", {"quantize": "int4", "compiled": True}),
    "hf-float32": (run_hf, "float32", {}),
    "hf-bfloat16": (run_hf, "bfloat16", {}),
    "llama.cpp": (run_llamacpp, "Q4_1", {}),
}


def child(engine: str, path: str, job_file: str, profile: bool = False) -> None:
    fn, dtype, options = ENGINES[engine]
    job = json.loads(Path(job_file).read_text())
    if profile and fn is run_scratchlm:
        options = {**options, "profile": True}
    if fn is not run_llamacpp:  # llama.cpp's process must not load torch (its RSS would count)
        import torch

        torch.set_num_threads(THREADS)
    print(json.dumps(fn(path, dtype, job=job, **options)))


def prepare_job(model: str, directory: Path) -> dict:
    """Prompt and held-out ids (scratchlm's tokenizer) and the quantized checkpoints, made once."""
    from importlib.resources import files

    from scratchlm.formats.gguf import read_gguf
    from scratchlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(read_gguf(Path(model))[1])
    held_out = files("scratchlm").joinpath("data/shakespeare.txt").read_text(encoding="utf-8")[-16_000:]
    quantized = {}
    for mode in ("int8", "int4"):
        out = directory / f"{Path(model).stem}-{mode}"
        if not (out / "quantization.json").is_file():
            subprocess.run([sys.executable, "-m", "scratchlm.cli", "quantize", model, "--to", mode, "--out", str(out)],
                           check=True)
        quantized[mode] = str(out)
    return {"short": prompt_ids(tokenizer, 16), "long": prompt_ids(tokenizer, PREFILL_TOKENS),
            "ppl_ids": tokenizer.encode(held_out, allowed_special="none"), "quantized": quantized}


def quantization_lines(results: dict) -> list[str]:
    """The issue-5 ratios: quantized engines against llama.cpp, HF bfloat16 and scratchlm float32."""
    lines = []
    peer, hf_bf16, f32 = results.get("llama.cpp"), results.get("hf-bfloat16"), results.get("scratchlm-float32")
    for engine, r in results.items():
        if not engine.startswith("scratchlm"):
            continue
        parts = []
        if peer:
            parts.append(f"decode {r['decode_median'] / peer['decode_median']:.2f}x llama.cpp, "
                         f"prefill {r['prefill_median'] / peer['prefill_median']:.2f}x llama.cpp, "
                         f"peak RSS {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x llama.cpp")
        if hf_bf16:
            parts.append(f"prefill {r['prefill_median'] / hf_bf16['prefill_median']:.2f}x HF bfloat16")
        if f32 and engine != "scratchlm-float32":
            parts.append(f"perplexity {r['perplexity'] / f32['perplexity'] - 1:+.2%} vs float32")
        if parts:
            lines.append(f"- {engine}: " + "; ".join(parts))
    if peer:
        lines.append(f"- llama.cpp (llama-cpp-python {peer.get('version')}): first 16 greedy ids "
                     f"{'identical to' if f32 and peer['first_ids'] == f32['first_ids'] else 'differ from'} "
                     "scratchlm float32's")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the pulled SmolLM2)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--profile", action="store_true", help="profile the decode steps of the scratchlm engines")
    parser.add_argument("--no-start-up", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from scratchlm.hub import pull

        args.model = str(pull("smollm2-135m-instruct", progress=False))
    if args.child:
        child(args.child, args.model, args.job, args.profile)
        return

    import os
    import tempfile

    from scratchlm.hub import home

    bench_dir = home() / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    job_file = Path(tempfile.mkstemp(suffix=".json")[1])
    job_file.write_text(json.dumps(prepare_job(args.model, bench_dir)))
    load = os.getloadavg()[0]
    results = {}
    walls = None if args.no_start_up else start_up_seconds(args.model)  # also compiles the default step once
    for engine in args.engines.split(","):
        python = sys.executable
        if engine == "llama.cpp":
            if not PEER_PYTHON.is_file():
                print("llama.cpp skipped: run `bash benchmarks/setup_llamacpp.sh` first", file=sys.stderr)
                continue
            python = str(PEER_PYTHON)
        out = subprocess.run([python, __file__, "--child", engine, "--model", args.model, "--job", str(job_file),
                              *(["--profile"] if args.profile else [])], capture_output=True, text=True)
        if out.returncode:
            print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{engine}: done", file=sys.stderr)
    job_file.unlink()
    load = f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"

    bandwidth = statistics.median(r["bandwidth_gbs"] for r in results.values() if r["bandwidth_gbs"])
    lines = [
        f"bandwidth (copy, read+write): {bandwidth:.1f} GB/s, {THREADS} threads; load average {load}",
        "",
        "| engine | decode tok/s (median / best) | share of bandwidth limit | prefill 512 tok/s (median / best) "
        f"| peak RSS MiB | perplexity (held-out, ctx {PPL_CONTEXT}) |",
        "|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        limit = bandwidth * 1e9 / r["weight_bytes"]
        lines.append(f"| {engine} | {r['decode_median']:.1f} / {r['decode_best']:.1f} | "
                     f"{r['decode_median'] / limit:.0%} of {limit:.0f} | "
                     f"{r['prefill_median']:.0f} / {r['prefill_best']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['perplexity']:.3f} |")
    lines.append("")
    for dtype in ("float32", "bfloat16"):
        ours, peer = results.get(f"scratchlm-{dtype}"), results.get(f"hf-{dtype}")
        if ours and peer:
            same = "identical" if ours["first_ids"] == peer["first_ids"] else "DIFFERENT"
            lines.append(f"- {dtype}: decode {ours['decode_median'] / peer['decode_median']:.2f}x HF, "
                         f"prefill {ours['prefill_median'] / peer['prefill_median']:.2f}x HF, "
                         f"peak RSS {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x HF; "
                         f"first 16 greedy ids {same}")
    lines += quantization_lines(results)
    if walls:
        lines.append(f"- start-up: `scratchlm generate MODEL \"Hi\" --max-new-tokens 1` took {walls[0]:.1f} s "
                     f"(first run) and {walls[1]:.1f} s (second run; issue 11 target <= 3 s)")
    for engine, r in results.items():
        if "start_up" in r:
            parts = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in r["start_up"].items())
            lines.append(f"- {engine} ({r['engine']}): {parts}")
    table = "\n".join(lines)
    for engine, r in results.items():
        if r.get("profile"):
            print(f"\n{engine}, profile of decoding:\n{r['profile']}")
    print(table)
    if args.record:
        import transformers

        details = f"transformers {transformers.__version__}. Model: {Path(args.model).name}"
        append_results(section_header(details) + table + "\n")


if __name__ == "__main__":
    main()
