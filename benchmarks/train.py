"""Training speed and quality: `scratchlm train` vs nanoGPT's `train.py`, same data, same configuration, same run.

    bash benchmarks/setup_nanogpt.sh /path/to/nanoGPT          # a clone outside this repository
    python benchmarks/train.py --nanogpt /path/to/nanoGPT      # 3 seeds x 2 engines x 2,000 steps, 2 threads
    python benchmarks/train.py --nanogpt DIR --threads 1 --clock cpu --concurrent --bf16   # on a busy machine

Both train nanoGPT's CPU shakespeare-char configuration (4 layers, 4 heads, 128 dims, context 64, batch 12,
2,000 iterations, lr 1e-3 -> 1e-4, warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0, no dropout,
float32, no torch.compile) on the same token files: scratchlm prepares the bundled corpus with its
character tokenizer, and the very same train.bin/val.bin go into nanoGPT's data folder (plus the
meta.pkl nanoGPT reads its vocabulary size from). Each seed trains once per engine (nanoGPT's fixed seed
is shifted by a launcher line, its code untouched); the engines of a seed run one after the other,
alternating who goes first, or with --concurrent at the same time, so that both see the same load.

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
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from common import append_results, machine

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


def launch(jobs: list[dict], concurrent: bool) -> None:
    """Run jobs (``cmd``, ``cwd``, ``env``); add ``stdout``, ``wall`` and ``cpu`` (user + system seconds) to each.

    Concurrent jobs share the machine's load exactly; each one's CPU time comes from wait4 on its own pid.
    """
    pending = list(jobs)
    while pending:
        batch = pending if concurrent else pending[:1]
        pending = pending[len(batch):]
        running = {}
        for job in batch:
            job["log"] = open(job["out"].with_suffix(".log"), "w+")
            job["start"] = time.perf_counter()
            proc = subprocess.Popen(job["cmd"], cwd=job["cwd"], env=job["env"], stdout=job["log"],
                                    stderr=subprocess.STDOUT, text=True)
            running[proc.pid] = job
        while running:
            pid, status, usage = os.wait4(-1, 0)
            job = running.pop(pid, None)
            if job is None:
                continue
            job["wall"] = time.perf_counter() - job["start"]
            job["cpu"] = usage.ru_utime + usage.ru_stime
            job["log"].seek(0)
            job["stdout"] = job["log"].read()
            job["log"].close()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{job['name']} failed:\n{job['stdout'][-4000:]}")


def steady(times_ms: dict[int, float], eval_interval: int) -> list[float]:
    """Step times without warm-up (first 10 steps) and without steps that include an evaluation."""
    return [t for step, t in times_ms.items() if step > 10 and step % eval_interval != 0]


def nanogpt_job(nanogpt: Path, work: Path, steps: int, seed: int, env: dict, clock: str) -> dict:
    out = work / f"nanogpt-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = [*NANOGPT_ARGS, f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--out_dir={out}"]
    # Launched through a few lines that (1) shift nanoGPT's fixed seed 1337 to `seed` and (2) with --clock cpu
    # point its iteration timer (time.time) at the process CPU clock. nanoGPT's own code runs unchanged.
    patch = f"import sys, time, torch; s = torch.manual_seed; torch.manual_seed = lambda n: s(n + {seed - 1337}); "
    if clock == "cpu":
        patch += "time.time = time.process_time; "
    code = patch + ("sys.argv = ['train.py', *sys.argv[1:]]; "
                    "exec(compile(open('train.py').read(), 'train.py', 'exec'), {'__name__': '__main__'})")
    return {"name": "nanoGPT", "seed": seed, "out": out, "cwd": nanogpt, "env": env,
            "cmd": [sys.executable, "-c", code, *args]}


def parse_nanogpt(job: dict, steps: int) -> None:
    # nanoGPT's iteration k is the k+1-th update; its timer for k covers the evaluation done at the top of k.
    times = {int(m[1]) + 1: float(m[2]) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms",
                                                             job["stdout"])}
    times = {s: t for s, t in times.items() if s <= steps and (s - 1) % 250 != 0}
    evals = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)",
                                                         job["stdout"])}
    job.update(times=steady(times, 250), val=evals.get(steps))


def scratchlm_job(corpus: Path, work: Path, steps: int, seed: int, threads: int, env: dict, clock: str,
                  bf16: bool) -> dict:
    out = work / f"scratchlm{'-bf16' if bf16 else ''}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if clock == "cpu":  # scratchlm times its steps with time.perf_counter(): the same switch as for nanoGPT
        code = ("import sys, time; time.perf_counter = time.process_time; from scratchlm.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
        launcher = [sys.executable, "-c", code]
    else:
        launcher = [sys.executable, "-m", "scratchlm.cli"]
    cmd = [*launcher, "--threads", str(threads), "train", str(corpus), "--preset", "shakespeare-char", "--out",
           str(out), "--force", "--no-progress", "--sample-tokens", "0", "--max-steps", str(steps),
           "--seed", str(seed), *(["--dtype", "bfloat16"] if bf16 else [])]
    return {"name": "scratchlm bf16" if bf16 else "scratchlm", "seed": seed, "out": out, "cwd": ROOT, "env": env,
            "cmd": cmd}


def parse_scratchlm(job: dict, steps: int) -> None:
    records = [json.loads(line) for line in (job["out"] / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["step_time"] * 1000 for r in records if "step_time" in r}
    evals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    job.update(times=steady(times, 250), val=evals.get(steps))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a clone of karpathy/nanoGPT (outside this repo)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-train-bench"), help="scratch folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2], help="one run per engine per seed")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also run scratchlm with --dtype bfloat16")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="step timer: wall clock, or process CPU time (robust on a shared machine; use 1 thread)")
    parser.add_argument("--concurrent", action="store_true",
                        help="run the engines of a seed at the same time (same load for both; use with --clock cpu)")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    nanogpt = args.nanogpt.resolve()
    if not (nanogpt / "train.py").is_file():
        raise SystemExit(f"{nanogpt} is not a nanoGPT clone: run benchmarks/setup_nanogpt.sh first")
    args.work.mkdir(parents=True, exist_ok=True)
    corpus, prepared = prepare(args.work, nanogpt)
    val = np.asarray(prepared.val())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    rows = []
    for i, seed in enumerate(args.seeds):
        jobs = [nanogpt_job(nanogpt, args.work, args.steps, seed, env, args.clock),
                scratchlm_job(corpus, args.work, args.steps, seed, args.threads, env, args.clock, bf16=False)]
        if args.bf16:
            jobs.append(scratchlm_job(corpus, args.work, args.steps, seed, args.threads, env, args.clock, bf16=True))
        if i % 2:
            jobs.reverse()  # alternate who goes first
        launch(jobs, args.concurrent)
        for job in jobs:
            (parse_nanogpt if job["name"] == "nanoGPT" else parse_scratchlm)(job, args.steps)
            job["full_val"] = full_val_loss("nanoGPT" if job["name"] == "nanoGPT" else "scratchlm", job["out"], val,
                                            nanogpt)
            med = statistics.median(job["times"])
            print(f"seed {seed:5d} {job['name']:15s} {med:6.2f} ms/step {BATCH * CONTEXT / med * 1000:8.0f} tok/s  "
                  f"wall {job['wall']:6.1f} s  cpu {job['cpu']:6.1f} s  val@{args.steps} {job['val']:.4f}  "
                  f"whole split {job['full_val']:.4f}", flush=True)
            rows.append(job)

    lines = ["| engine | seed | median ms/step | mean ms/step | tokens/s | wall s | CPU s | val loss (own) | "
             "val loss (whole split) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["name"], r["seed"])):
        med = statistics.median(r["times"])
        lines.append(f"| {r['name']} | {r['seed']} | {med:.2f} | {statistics.mean(r['times']):.2f} | "
                     f"{BATCH * CONTEXT / med * 1000:.0f} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['val']:.4f} | "
                     f"{r['full_val']:.4f} |")
    summary = []
    base = {r["seed"]: r for r in rows if r["name"] == "nanoGPT"}
    for name in sorted({r["name"] for r in rows} - {"nanoGPT"}):
        mine = {r["seed"]: r for r in rows if r["name"] == name}
        speed = [statistics.median(base[s]["times"]) / statistics.median(mine[s]["times"]) for s in args.seeds]
        wall = [base[s]["wall"] / mine[s]["wall"] for s in args.seeds]
        ours = statistics.mean(mine[s]["full_val"] for s in args.seeds)
        theirs = statistics.mean(base[s]["full_val"] for s in args.seeds)
        summary.append(
            f"- {name} / nanoGPT: tokens/s ratio per seed {', '.join(f'{x:.3f}' for x in speed)} "
            f"(mean {statistics.mean(speed):.3f}x); whole-run wall-time ratio {statistics.mean(wall):.3f}x; "
            f"whole-split validation loss, mean over {len(args.seeds)} seeds: {ours:.4f} vs {theirs:.4f} "
            f"({ours - theirs:+.4f})")
    print("\n".join(["", *lines, "", *summary]))
    if args.no_append:
        return
    nanogpt_commit = subprocess.run(["git", "-C", str(nanogpt), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "unknown"
    section = [
        f"\n## Training: scratchlm vs nanoGPT train.py, shakespeare-char CPU configuration ({args.steps} steps)",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Machine: {machine()}; {args.threads} thread(s) per "
        f"process (OMP_NUM_THREADS), shared with other jobs. torch {torch.__version__}, Python "
        f"{platform.python_version()}, nanoGPT {nanogpt_commit}. Data: the bundled corpus, character-level "
        f"({prepared.meta['vocab_size']} symbols), {prepared.meta['train_tokens']:,} training / "
        f"{prepared.meta['val_tokens']:,} validation tokens, the same files for both.",
        f"Command: `python benchmarks/train.py --nanogpt PATH --seeds {' '.join(map(str, args.seeds))} "
        f"--threads {args.threads} --clock {args.clock}{' --concurrent' if args.concurrent else ''}"
        f"{' --bf16' if args.bf16 else ''}`. Step times: "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'} from each engine's own step timer; "
        f"{'the engines of a seed ran at the same time' if args.concurrent else 'engines ran one after the other'}.",
        "",
        *lines, "", *summary, "",
    ]
    append_results("\n".join(section))


if __name__ == "__main__":
    main()
