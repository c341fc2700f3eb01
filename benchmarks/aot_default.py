"""Should the ahead-of-time compiled decode step be the default? Its costs and gains on the pulled SmolLM2 GGUF.

    .venv/bin/python benchmarks/aot_default.py                      # int4 (the file's Q4_1 codes), the default load
    .venv/bin/python benchmarks/aot_default.py --engines int4,float32,bfloat16 --record

For each engine (int4: ``LLM.load(gguf)``; float32/bfloat16: ``LLM.load(gguf, dtype=...)``), every measurement in
a fresh process with 2 threads, in a compile cache of its own (``--home``, emptied first: the build is cold):

- build: the AOTInductor package of the decode step for one prompt (batch 1, cache 256): wall time and CPU time of
  the process and its children (the C++ compiler runs as a child), which survives a loaded machine better;
- warm: a second process loads that package: the time of ``aot.load_step``, the first call (load + the check
  against eager), whether dynamo/inductor got imported, and its peak RSS after 128 tokens;
- eager: the same process without the compiled step: its peak RSS;
- race: one process, the compiled and the eager engine alternated (ABAB, ``--rounds`` each), 128 greedy tokens
  after a 40-token prompt; tokens/s by wall clock and by CPU time, and the ratio per round (median).
The load average is printed at the start and the end: figures taken at a high load are not final.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, machine

THREADS = 2
PROMPT_TOKENS = 40
NEW_TOKENS = 128
DTYPES = {"int4": None, "float32": "float32", "bfloat16": "bfloat16"}
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, engine: str, model: str, rounds: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from scratchlm import aot
    from scratchlm.compiled import compile_decoding
    from scratchlm.llm import LLM

    llm = LLM.load(model, dtype=DTYPES[engine], compile=False)
    ids: list[int] = []
    while len(ids) < PROMPT_TOKENS:
        ids += llm.tokenizer.encode(TEXT)
    ids = ids[:PROMPT_TOKENS]
    out: dict = {"rss_loaded_mib": peak_rss_mib()}

    def run(n: int = NEW_TOKENS) -> tuple[float, float, list[int]]:
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = llm.complete(ids, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
        return time.perf_counter() - wall, time.process_time() - cpu, tokens

    if mode == "eager":
        run()
        out["rss_mib"] = peak_rss_mib()
    elif mode == "build":
        decoder = compile_decoding(llm.model)
        wall, cpu = time.perf_counter(), cpu_seconds()
        run(2)
        out.update(build_wall_s=time.perf_counter() - wall, build_cpu_s=cpu_seconds() - cpu, built=decoder.built,
                   compiled=decoder.compiled)
    elif mode == "warm":
        decoder = compile_decoding(llm.model)
        loads = []
        original = aot.load_step

        def timed_load(path, model):
            t = time.perf_counter()
            step = original(path, model)
            loads.append(time.perf_counter() - t)
            return step

        aot.load_step = timed_load
        wall = time.perf_counter()
        run(2)
        out.update(first_call_s=time.perf_counter() - wall, load_step_s=loads, built=decoder.built,
                   compiled=decoder.compiled)
        run()
        out.update(rss_mib=peak_rss_mib(), compiler_imported=any(m in sys.modules for m in
                                                                  ("torch._inductor", "torch._dynamo")))
    elif mode == "race":
        decoder = compile_decoding(llm.model)
        run(2)  # load the package (built by the build step)
        eager_tokens = None
        rows = []
        for _ in range(rounds):
            row = {}
            for name in ("aot", "eager"):
                llm.model.decoder = decoder if name == "aot" else None
                run(2)  # warm-up of this engine after the other one ran
                wall, cpu, tokens = run()
                row[name] = (NEW_TOKENS / wall, NEW_TOKENS / cpu)
                if name == "eager":
                    eager_tokens = tokens
                else:
                    aot_tokens = tokens
            rows.append(row)
        out.update(rounds=rows, same_tokens=aot_tokens == eager_tokens, compiled=decoder.compiled)
    return out


def spawn(mode: str, engine: str, args, home: Path) -> dict:
    env = {**os.environ, "SCRATCHLM_HOME": str(home), "OMP_NUM_THREADS": str(THREADS)}
    home.mkdir(parents=True, exist_ok=True)
    # the pulled model lives in the user's home: link its models folder
    models = home / "models"
    if not models.exists():
        from scratchlm.hub import home as user_home

        models.symlink_to(user_home() / "models")
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--engines", engine, "--model", args.model,
                           "--rounds", str(args.rounds)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", default="int4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", default=None, help="compile cache for the run (default: a temporary folder)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.engines, args.model, args.rounds)))
        return
    start_load = load_average()
    base = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="aot-default-"))
    lines = []
    for engine in args.engines.split(","):
        home = base / engine
        shutil.rmtree(home / "compile", ignore_errors=True)
        build = spawn("build", engine, args, home)
        warm = spawn("warm", engine, args, home)
        eager = spawn("eager", engine, args, home)
        race = spawn("race", engine, args, home)
        aot_tps = [r["aot"][0] for r in race["rounds"]]
        eager_tps = [r["eager"][0] for r in race["rounds"]]
        ratio_wall = statistics.median(r["aot"][0] / r["eager"][0] for r in race["rounds"])
        ratio_cpu = statistics.median(r["aot"][1] / r["eager"][1] for r in race["rounds"])
        line = (f"| {engine} | {build['build_wall_s']:.0f} s wall, {build['build_cpu_s']:.0f} s CPU | "
                f"{1000 * min(warm['load_step_s']):.0f} ms ({warm['first_call_s']:.2f} s first call) | "
                f"{'yes' if warm['compiler_imported'] else 'no'} | "
                f"{eager['rss_mib']:.0f} / {warm['rss_mib']:.0f} MiB | "
                f"{statistics.median(eager_tps):.0f} / {statistics.median(aot_tps):.0f} | "
                f"{ratio_wall:.2f}x wall, {ratio_cpu:.2f}x CPU | {'yes' if race['same_tokens'] else 'NO'} |")
        print(line, flush=True)
        print(json.dumps({"build": build, "warm": warm, "eager": eager, "race": race}), file=sys.stderr)
        lines.append(line)
    end_load = load_average()
    table = "\n".join([
        "| engine | package build (batch 1, cache 256) | warm load_step | compiler imported | peak RSS eager / AOT "
        "| tokens/s eager / AOT (median) | AOT / eager (median of rounds) | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|", *lines])
    print(f"\nload average {start_load} at start, {end_load} at end\n{table}")
    if args.record:
        command = "python benchmarks/aot_default.py --engines " + args.engines + " --record"
        append_results(f"\n## AOT decode step as the default? ({datetime.date.today()}, {machine()})\n\n"
                       f"`{command}`, {THREADS} threads, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, "
                       f"{args.rounds} ABAB rounds; load average {start_load} at start, {end_load} at end.\n\n"
                       f"{table}\n")
    if not args.home:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
