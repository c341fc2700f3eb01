"""Wall time of a multiple-choice task through lm-evaluation-harness, three ways, same model, same documents:

    scratchlm          the in-process backend (scratchlm.eval.harness): each question's context prefilled once
                       into a KV cache and shared by its choices
    local-completions  lm-eval's OpenAI-completions client against scratchlm's server (in this process, on
                       a background thread), one request per choice
    hf                 lm-eval's ``hf`` backend (HF transformers) on our HF export of the same weights

Target: scratchlm >= 1.5x the hf backend's speed. Also prints the largest per-sample log-likelihood
difference from hf and each backend's accuracy (they must agree: see tests/test_eval_harness.py).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/harness.py [--model smollm2-135m-instruct]
        [--task scratchlm_next_line] [--limit 100] [--repeats 3] [--threads 2] [--record]

On a machine shared with other jobs, OMP_WAIT_POLICY=PASSIVE (and --threads 1) keeps OpenMP's spinning threads
from turning the load into the measurement.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine  # noqa: E402


def loglikelihoods(results: dict, task: str) -> list[float]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="scratchlm_next_line")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--num-fewshot", type=int, default=None, help="examples before each question")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from scratchlm.eval import harness
    from scratchlm.formats.export_hf import export_hf
    from scratchlm.llm import LLM
    from scratchlm.serve.app import create_app
    from scratchlm.serve.background import BackgroundServer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    hf_dir = export_hf(LLM.load(args.model, dtype="float32"), Path(tmp.name) / "hf")  # dense, as exported
    # Every backend runs the exported float32 weights (a GGUF would otherwise load with int4 layers).
    llm = LLM.load(hf_dir)
    ours = harness.ScratchLM(llm, progress=False)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.hf_batch_size)

    def run(lm) -> tuple[float, dict]:
        # Warm-up: task loading, first forward passes.
        harness.evaluate(lm, [args.task], num_fewshot=args.num_fewshot, limit=2)
        times, results = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = harness.evaluate(lm, [args.task], num_fewshot=args.num_fewshot, limit=args.limit,
                                       log_samples=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times), results

    measured = {}
    measured["scratchlm"] = run(ours)
    measured["hf"] = run(hf)
    with BackgroundServer(create_app(llm, max_batch=8)) as url:
        served = LocalCompletionsAPI(model=llm.name, base_url=url + "/v1/completions", tokenizer=str(hf_dir),
                                     tokenizer_backend="huggingface", tokenized_requests=True,
                                     max_length=llm.config.context_length, num_concurrent=8, max_retries=1)
        measured["local-completions"] = run(served)

    reference = loglikelihoods(measured["hf"][1], args.task)
    rows = []
    for name, (seconds, results) in measured.items():
        diff = max(abs(a - b) for a, b in zip(loglikelihoods(results, args.task), reference))
        acc = harness.scores(results)[args.task]["acc"]
        rows.append(f"| {name} | {seconds:.2f} s | {measured['hf'][0] / seconds:.2f}x | {acc:.4f} | {diff:.1e} |")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    table = "\n".join(["| backend | wall time (median) | speed vs hf | acc | max abs LL diff vs hf |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    print(f"load average after the run: {load}")
    if args.record:
        append_results(
            f"\n## lm-evaluation-harness backends: {args.task}, {args.limit} questions, "
            f"{args.num_fewshot or 0}-shot ({when})\n\n"
            f"Machine: {machine()}; load average after the run {load}. torch {torch.__version__}, "
            f"lm-eval {lm_eval.__version__}, {args.threads} threads, float32, hf batch size {args.hf_batch_size}, "
            f"local-completions with 8 concurrent requests against a max-batch-8 server.\n"
            f"Command: `{env}python benchmarks/harness.py --model {args.model} --task {args.task} --limit {args.limit} "
            f"--num-fewshot {args.num_fewshot or 0} --repeats {args.repeats} --threads {args.threads} --record`"
            f"\n\n{table}\n\n"
            "Target: scratchlm >= 1.5x the hf backend.\n")


if __name__ == "__main__":
    main()
