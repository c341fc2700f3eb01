"""Training speed and quality: `scratchlm train` vs nanoGPT's `train.py`, same data, same configuration, same run.

    bash benchmarks/setup_nanogpt.sh /path/to/nanoGPT          # a clone outside this repository
    python benchmarks/train.py --nanogpt /path/to/nanoGPT      # ~4 runs of 2,000 steps on 2 threads

Both train nanoGPT's CPU shakespeare-char configuration (4 layers, 4 heads, 128 dims, context 64, batch 12,
2,000 iterations, lr 1e-3 -> 1e-4, warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0, no dropout,
float32, no torch.compile) on the same token files: scratchlm prepares the bundled corpus with its
character tokenizer, and the very same train.bin/val.bin go into nanoGPT's data folder (plus the
meta.pkl nanoGPT reads its vocabulary size from). Runs alternate between the two engines, so both see
the same machine load.

Reported per run: median and mean step time over non-evaluation steps, from each engine's own step timer
(nanoGPT's per-iteration time, scratchlm's metrics.jsonl) on the wall clock, or with --clock cpu on the
process CPU clock (both timers are pointed at time.process_time; a busy shared machine disturbs that far
less); training tokens/s = 768 tokens per step / median step time; wall and CPU time of the whole
process; the validation loss each engine reports at the last step; and the loss of both final models on
the whole validation split (every non-overlapping 64-token window), computed here with each engine's own
model code. Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle  # only to WRITE nanoGPT's meta.pkl; nothing here unpickles
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATASET = "scratchlm_shakespeare_char"
CONTEXT, BATCH = 64, 12
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    f"--block_size={CONTEXT}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4", "--n_embd=128",
    "--dropout=0.0", f"--dataset={DATASET}", "--always_save_checkpoint=True",
]


def prepare(work: Path, nanogpt: Path):
    """Tokenize the bundled corpus with scratchlm; copy the same binaries into nanoGPT's data folder."""
    from scratchlm.train.chars import train_char_tokenizer
    from scratchlm.train.data import prepare_dataset
    from scratchlm.train.sources import bundled_corpus

    corpus = bundled_corpus()
    tokenizer = train_char_tokenizer([corpus.read_text(encoding="utf-8")])
    prepared = prepare_dataset(corpus, tokenizer, work / "data", progress=False)
    target = nanogpt / "data" / DATASET
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        shutil.copyfile(prepared.directory / name, target / name)
    itos = {i: tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}
    with open(target / "meta.pkl", "wb") as f:  # nanoGPT's format for its vocabulary size
        pickle.dump({"vocab_size": tokenizer.vocab_size, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    return corpus, prepared


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; return it with its wall time and the CPU time (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc, wall, cpu


def steady(times_ms: dict[int, float], eval_interval: int) -> list[float]:
    """Step times without warm-up (first 10 steps) and without steps that include an evaluation."""
    return [t for step, t in times_ms.items() if step > 10 and step % eval_interval != 0]


def run_nanogpt(nanogpt: Path, work: Path, steps: int, env: dict, clock: str) -> dict:
    out = work / "nanogpt-out"
    shutil.rmtree(out, ignore_errors=True)
    args = [*NANOGPT_ARGS, f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--out_dir={out}"]
    if clock == "cpu":  # nanoGPT times its iterations with time.time(): point that at the process CPU clock
        code = ("import sys, time; time.time = time.process_time; sys.argv = ['train.py', *sys.argv[1:]]; "
                "exec(compile(open('train.py').read(), 'train.py', 'exec'), {'__name__': '__main__'})")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "train.py", *args]
    proc, wall, cpu = timed(cmd, nanogpt, env)
    # nanoGPT's iteration k is the k+1-th update; its timer for k covers the evaluation done at the top of k.
    times = {int(m[1]) + 1: float(m[2]) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)}
    times = {s: t for s, t in times.items() if s <= steps and (s - 1) % 250 != 0}
    evals = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                                                         proc.stdout)}
    return {"times": steady(times, 250), "wall": wall, "cpu": cpu, "val": evals.get(steps), "dir": out}


def run_scratchlm(corpus: Path, work: Path, steps: int, threads: int, env: dict, clock: str,
                  extra: list[str]) -> dict:
    out = work / ("scratchlm-out" + "".join(extra).replace("-", ""))
    if clock == "cpu":  # scratchlm times its steps with time.perf_counter(): the same switch as for nanoGPT
        code = ("import sys, time; time.perf_counter = time.process_time; from scratchlm.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        launcher = [sys.executable, "-c", code]
    else:
        launcher = [sys.executable, "-m", "scratchlm.cli"]
    cmd = [*launcher, "--threads", str(threads), "train", str(corpus), "--preset",
           "shakespeare-char", "--out", str(out), "--overwrite", "--no-progress", "--sample-tokens", "0",
           "--max-steps", str(steps), *extra]
    _, wall, cpu = timed(cmd, ROOT, env)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["step_time"] * 1000 for r in records if "step_time" in r}
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return {"times": steady(times, 250), "wall": wall, "cpu": cpu, "val": evals.get(steps), "dir": out}


@torch.no_grad()
def full_val_loss(engine: str, run_dir: Path, val: np.ndarray, nanogpt: Path) -> float:
    """Mean loss over every non-overlapping window of the validation split, with the engine's own model."""
    n = (len(val) - 1) // CONTEXT
    ids = torch.from_numpy(np.asarray(val, dtype=np.int64))
    x_all, y_all = ids[: n * CONTEXT].view(n, CONTEXT), ids[1 : n * CONTEXT + 1].view(n, CONTEXT)
    if engine == "nanoGPT":
        sys.path.insert(0, str(nanogpt))
        from model import GPT, GPTConfig  # nanoGPT's own model code, from its clone

        ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})

        def loss_of(x, y):
            return model(x, y)[1]
    else:
        from scratchlm.llm import LLM
        from scratchlm.train.loop import lm_loss

        model = LLM.load(run_dir / "last").model

        def loss_of(x, y):
            return lm_loss(model(x), y)
    model.eval()
    losses = [loss_of(x_all[i:i + 64], y_all[i:i + 64]).item() * len(x_all[i:i + 64]) for i in range(0, n, 64)]
    return sum(losses) / n


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a clone of karpathy/nanoGPT (outside this repo)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-train-bench"), help="scratch folder")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine (alternating)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also run scratchlm with --dtype bfloat16")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="step timer: wall clock, or process CPU time (robust on a shared machine; use 1 thread)")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file():
        raise SystemExit(f"{nanogpt} is not a nanoGPT clone: run benchmarks/setup_nanogpt.sh first")
    args.work.mkdir(parents=True, exist_ok=True)
    corpus, prepared = prepare(args.work, nanogpt)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    clock = args.clock
    engines = {"nanoGPT": lambda: run_nanogpt(nanogpt, args.work, args.steps, env, clock),
               "scratchlm": lambda: run_scratchlm(corpus, args.work, args.steps, args.threads, env, clock, [])}
    if args.bf16:
        engines["scratchlm bf16"] = lambda: run_scratchlm(corpus, args.work, args.steps, args.threads, env, clock,
                                                          ["--dtype", "bfloat16"])
    rows = []
    for repeat in range(args.repeats):
        order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]  # alternate who goes first
        for name in order:
            result = engines[name]()
            result["full_val"] = full_val_loss("nanoGPT" if name == "nanoGPT" else "scratchlm", result["dir"],
                                               np.asarray(prepared.val()), nanogpt)
            result.update(engine=name, repeat=repeat)
            rows.append(result)
            med = statistics.median(result["times"])
            print(f"[{repeat}] {name:15s} {med:6.2f} ms/step  {BATCH * CONTEXT / med * 1000:8.0f} tok/s  "
                  f"wall {result['wall']:6.1f} s  cpu {result['cpu']:6.1f} s  val@{args.steps} {result['val']:.4f}  "
                  f"full val {result['full_val']:.4f}", flush=True)

    lines = ["| engine | run | median ms/step | mean ms/step | tokens/s | wall s | CPU s | val loss (own) | "
             "val loss (whole split) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = statistics.median(r["times"])
        lines.append(f"| {r['engine']} | {r['repeat']} | {med:.2f} | {statistics.mean(r['times']):.2f} | "
                     f"{BATCH * CONTEXT / med * 1000:.0f} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['val']:.4f} | "
                     f"{r['full_val']:.4f} |")
    summary = []
    base = [r for r in rows if r["engine"] == "nanoGPT"]
    for name in engines:
        if name == "nanoGPT":
            continue
        mine = [r for r in rows if r["engine"] == name]
        speed = [statistics.median(b["times"]) / statistics.median(m["times"]) for b, m in zip(base, mine)]
        wall = [b["wall"] / m["wall"] for b, m in zip(base, mine)]
        dval = [m["full_val"] - b["full_val"] for b, m in zip(base, mine)]
        summary.append(f"- {name} / nanoGPT: tokens/s ratio per pair {', '.join(f'{s:.3f}' for s in speed)} "
                       f"(median {statistics.median(speed):.3f}x); whole-run wall-time ratio "
                       f"{statistics.median(wall):.3f}x; whole-split validation loss difference "
                       f"{', '.join(f'{d:+.4f}' for d in dval)} (negative = scratchlm lower)")
    print("\n".join(lines + [""] + summary))
    if args.no_append:
        return
    nanogpt_commit = subprocess.run(["git", "-C", str(nanogpt), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "unknown"
    section = [
        f"\n## Training: scratchlm vs nanoGPT train.py, shakespeare-char CPU configuration ({args.steps} steps)",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Machine: {machine()}; {args.threads} threads each "
        f"(OMP_NUM_THREADS). torch {torch.__version__}, Python {platform.python_version()}, nanoGPT {nanogpt_commit}. "
        f"Data: the bundled corpus, character-level ({prepared.meta['vocab_size']} symbols), "
        f"{prepared.meta['train_tokens']:,} training / {prepared.meta['val_tokens']:,} validation tokens, the same "
        "files for both. Runs alternate between engines.",
        f"Command: `python benchmarks/train.py --nanogpt PATH --repeats {args.repeats} --threads {args.threads} "
        f"--clock {args.clock}{' --bf16' if args.bf16 else ''}`. Step times are "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'} from each engine's own step timer.",
        "",
        *lines, "", *summary, "",
    ]
    results = ROOT / "benchmarks" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Benchmark results\n\nEach section: date, machine, versions, command, figures. "
                           "Ratios compare engines measured in the same run.\n", encoding="utf-8")
    with open(results, "a", encoding="utf-8") as f:
        f.write("\n".join(section))
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
