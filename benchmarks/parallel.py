"""Parallel training: per-rank memory of parameters + gradients + optimizer states against the ZeRO formulas, and
the pipeline bubble fraction of GPipe and 1F1B against (P-1)/(M+P-1).

    python benchmarks/parallel.py                      # 2 CPU processes (gloo); prints the tables
    python benchmarks/parallel.py --write              # ...and appends them to benchmarks/RESULTS.md
    python benchmarks/parallel.py --nproc 4 --d-model 512 --n-layers 8

Memory: after one real training step (forward, backward, gradient reduction, AdamW step, before zero_grad), each
rank sums the bytes of its local parameter, gradient and optimizer-state tensors (a DTensor counts its local
shard). Formula (Rajbhandari et al. 2020, section 3, fp32 AdamW: 4 bytes weight + 4 gradient + 8 moments per
parameter; P parameters, N ranks): dp 16P, zero1 8P + 8P/N, fsdp 16P/N; tp and pp hold their shard of the split
matrices (or stages) plus the replicated rest, counted from the model's shapes.

Bubble: each stage's busy time is its forward and backward of the step's M micro-batches run alone on that rank
(no communication, same shapes); the bubble is 1 - busy / (pipelined step time), the largest over the stages,
median of the timed steps. Communication counts as bubble here: on one machine's gloo it is part of the idle time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def model_config(args):
    from scratchlm.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, context_length=args.context, d_model=args.d_model,
                       n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_heads, positions="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)


def expected_bytes(mode: str, config, world: int, tp: int, pp: int) -> int:
    """16 bytes per parameter held, by the ZeRO formulas (see the module docstring)."""
    from scratchlm.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    if mode in ("dp", "zero1", "fsdp"):  # scratchlm estimate's formula (src/scratchlm/estimate.py)
        from scratchlm.estimate import training_memory

        sharding = {"dp": "none", "zero1": "zero1", "fsdp": "fsdp"}[mode]
        m = training_memory(config, 1, precision="float32", sharding=sharding, devices=world)
        return int(m["weights_bytes"] + m["gradients_bytes"] + m["optimizer_bytes"])
    split = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("_proj.weight",)))
    if mode == "tp":
        return 16 * (total - split + split // tp)
    if mode == "fsdp+tp":
        return 16 * (total - split + split // tp) // (world // tp)
    if mode == "pp":  # the largest stage: its blocks plus the embedding (first) or norm and head (last)
        per_block = sum(p.numel() for p in model.blocks[0].parameters())
        ends = max(model.tok_embeddings.weight.numel(), model.lm_head.weight.numel() + config.d_model)
        return 16 * (per_block * config.n_layers // pp + ends)
    raise ValueError(mode)


def measure_memory(mode: str, args, dist) -> dict:
    from scratchlm.model import Transformer
    from scratchlm.train.loop import lm_loss
    from scratchlm.train.optim import make_optimizer
    from scratchlm.train.parallel import ParallelConfig, ParallelPlan

    config = model_config(args)
    plan = ParallelPlan(ParallelConfig(mode=mode, tp=2 if "tp" in mode else None), dist, config, args.batch)
    torch.manual_seed(0)
    model = plan.apply(Transformer(config))
    optimizer = plan.wrap_optimizer(make_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.99)))
    forward = plan.wrap_forward(model)
    x = torch.randint(0, config.vocab_size, (args.batch // plan.dp_size, config.context_length))
    if plan.pipelined:
        plan.pipeline_step(x, x, 1)
    else:
        lm_loss(forward(x), x).backward()
    params = [p for p in model.parameters()]
    plan.finish_gradients(params, 1.0)
    optimizer.step()
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local optimizer
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(states),
            "expected": expected_bytes(mode, config, dist.world_size, plan.tp, plan.pp)}


def measure_bubble(schedule: str, m: int, args, dist) -> dict:
    from scratchlm.model import Transformer
    from scratchlm.train.parallel import ParallelConfig, ParallelPlan

    config = model_config(args)
    plan = ParallelPlan(ParallelConfig(mode="pp", schedule=schedule, microbatches=m), dist, config, args.batch)
    torch.manual_seed(0)
    stage = plan.apply(Transformer(config))
    x = torch.randint(0, config.vocab_size, (args.batch // plan.dp_size, config.context_length))
    steps = []
    for i in range(args.steps + 1):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        plan.pipeline_step(x, x, 1)
        torch.distributed.barrier()
        if i:  # the first step infers shapes and warms up
            steps.append(time.perf_counter() - t0)
        stage.zero_grad(set_to_none=True)
    # The same stage's compute alone: M micro-batches forward and backward, no communication.
    micro = x[: x.shape[0] // m]
    if stage.first:
        inputs = micro
    else:
        inputs = torch.randn(micro.shape[0], config.context_length, config.d_model, requires_grad=True)
    busy = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        for _ in range(m):
            out = stage(inputs)
            out.backward(torch.ones_like(out) / out.numel())
        if i:
            busy.append(time.perf_counter() - t0)
        stage.zero_grad(set_to_none=True)
    step, work = statistics.median(steps), statistics.median(busy)
    return {"step_s": step, "busy_s": work, "bubble": 1 - work / step}


def worker(args) -> None:
    from scratchlm.train.distributed import gather_json, init_distributed, shutdown

    dist = init_distributed("cpu", timeout=300)
    out = {"memory": {}, "bubble": {}}
    for mode in args.modes.split(","):
        out["memory"][mode] = gather_json(dist, measure_memory(mode, args, dist))
    for schedule in ("gpipe", "1f1b"):
        for m in (1, 2, 4, 8):
            if (args.batch % m) == 0:
                out["bubble"][f"{schedule}/{m}"] = gather_json(dist, measure_bubble(schedule, m, args, dist))
    if dist.is_main:
        Path(args.result).write_text(json.dumps(out))
    shutdown(dist)


def report(result: dict, args) -> str:
    mib = 1 << 20
    lines = ["| mode | rank | params MiB | grads MiB | optimizer MiB | total MiB | formula MiB | total / formula |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, ranks in result["memory"].items():
        for rank, r in enumerate(ranks):
            total = r["params"] + r["grads"] + r["optimizer"]
            lines.append(f"| {mode} | {rank} | {r['params'] / mib:.2f} | {r['grads'] / mib:.2f} | "
                         f"{r['optimizer'] / mib:.2f} | {total / mib:.2f} | {r['expected'] / mib:.2f} | "
                         f"{total / r['expected']:.3f} |")
    lines += ["", "| schedule | micro-batches M | step ms | busy ms (largest stage) | bubble measured | "
              "(P-1)/(M+P-1) |", "|---|---|---|---|---|---|"]
    p = args.nproc
    for key, ranks in result["bubble"].items():
        schedule, m = key.split("/")
        worst = max(ranks, key=lambda r: r["bubble"])
        lines.append(f"| {schedule} | {m} | {worst['step_s'] * 1e3:.1f} | {worst['busy_s'] * 1e3:.1f} | "
                     f"{worst['bubble']:.2f} | {(p - 1) / (int(m) + p - 1):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--modes", default="dp,zero1,fsdp,tp,pp")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed pipeline steps per setting")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   __file__, "--worker", "--result", str(result_file)] + sys.argv[1:]
        command = [c for c in command if c != "--write"]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(result_file.read_text())
    table = report(result, args)
    print(table)
    if args.write:
        from common import append_results, machine

        load = os.getloadavg()[0]
        append_results(f"\n## Parallel training: per-rank memory and pipeline bubble "
                       f"({datetime.now(timezone.utc):%Y-%m-%d})\n\n{machine()}, torch {torch.__version__}, "
                       f"{args.nproc} CPU processes (gloo), load average {load:.1f} at the end; model d_model "
                       f"{args.d_model}, {args.n_layers} layers, vocabulary {args.vocab}, context {args.context}, "
                       f"batch {args.batch}. Command: `python benchmarks/parallel.py {' '.join(sys.argv[1:])}`\n\n"
                       f"{table}\n")


if __name__ == "__main__":
    main()
