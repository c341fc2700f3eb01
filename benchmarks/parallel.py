"""Parallel training: per-rank memory of parameters + gradients + optimizer states against the `estimate` formulas,
and the pipeline bubble fraction of GPipe and 1F1B against (P-1)/(M+P-1).

    python benchmarks/parallel.py                      # 2 CPU processes (gloo); prints the tables (~1-5 minutes)
    python benchmarks/parallel.py --record             # ...and appends them to benchmarks/RESULTS.md
    python benchmarks/parallel.py --nproc 4 --d-model 512 --n-layers 8

Memory: after one real training step (forward, backward, gradient reduction, AdamW step, before zero_grad), each
rank sums the bytes of its local parameter, gradient and optimizer-state tensors (a DTensor counts its local
shard). Formula (Rajbhandari et al. 2020, section 3; fp32 AdamW: 4 bytes weight + 4 gradient + 8 moments per
parameter; P parameters, N ranks), from ``scratchlm.estimate.training_memory`` for dp (16P), zero1 (8P + 8P/N) and
fsdp (16P/N); tp and pp hold their shard of the split matrices (or their stage) plus the replicated rest, counted
here from the model's shapes, as `estimate` has no tensor or pipeline split. Not counted by either: DDP's gradient
buckets (another 4P in dp and zero1, communication buffers), activations, and the allocator's slack.

Bubble: the stage's ``forward_one_chunk`` and ``backward_one_chunk`` (what the schedule calls per micro-batch) are
timed on every rank during real pipeline steps. Two figures come from these timestamps:

- **slots**: the order in which each rank ran its forwards and backwards is replayed with unit costs (a forward 1,
  a backward 2, as Narayanan et al. 2021 take t_b = 2 t_f) and the dependencies of a pipeline (forward m on stage s
  after forward m on stage s-1; backward m on stage s after backward m on stage s+1). The idle share of the
  replayed step is the bubble the schedule itself leaves, whatever the machine's load: it checks the engine's
  schedule against the formula.
- **wall clock**: 1 - (time a stage computed) / (the step's span over all ranks), the mean over the stages, the
  median of the timed steps. It includes communication and unequal stages (the first holds the embeddings, the
  last the head), and on a loaded machine the waits for a CPU: read it as loaded unless the machine was quiet.
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

COST = {"F": 1, "B": 2}  # unit costs of a forward and a backward in the slot replay


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

    if mode in ("dp", "zero1", "fsdp"):  # scratchlm estimate's formula (src/scratchlm/estimate.py)
        from scratchlm.estimate import training_memory

        sharding = {"dp": "none", "zero1": "zero1", "fsdp": "fsdp"}[mode]
        m = training_memory(config, 1, precision="float32", sharding=sharding, devices=world)
        return int(m["weights_bytes"] + m["gradients_bytes"] + m["optimizer_bytes"])
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    split = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_proj.weight"))
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
    params = list(model.parameters())
    plan.finish_gradients(params, 1.0)
    optimizer.step()
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's local optimizer
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(states),
            "expected": expected_bytes(mode, config, dist.world_size, plan.tp, plan.pp)}


def time_chunks(pipeline_stage, events: list) -> None:
    """Record (kind, micro-batch, start, end) of every forward and backward the schedule runs on this stage."""
    for kind, name in (("F", "forward_one_chunk"), ("B", "backward_one_chunk")):
        original = getattr(pipeline_stage, name)

        def timed(chunk, *a, _original=original, _kind=kind, **k):
            t0 = time.perf_counter()
            result = _original(chunk, *a, **k)
            events.append((_kind, chunk, t0, time.perf_counter()))
            return result

        setattr(pipeline_stage, name, timed)


def replay(orders: list[list[tuple[str, int]]]) -> float:
    """The bubble fraction of running each stage's actions in ``orders`` with unit costs (``COST``).

    An action starts when its stage is free and its dependency is done: F(s, m) needs F(s-1, m), B(s, m) needs
    B(s+1, m) (the last stage's backward follows its own forward, earlier in its order).
    """
    n = len(orders)
    done: dict[tuple[str, int, int], float] = {}
    free, nxt = [0.0] * n, [0] * n
    while any(nxt[s] < len(orders[s]) for s in range(n)):
        moved = False
        for s in range(n):
            if nxt[s] >= len(orders[s]):
                continue
            kind, m = orders[s][nxt[s]]
            dep = ("F", s - 1, m) if kind == "F" and s > 0 else ("B", s + 1, m) if kind == "B" and s < n - 1 else None
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done.get(dep, 0.0))
            free[s] = done[(kind, s, m)] = start + COST[kind]
            nxt[s] += 1
            moved = True
        if not moved:
            raise RuntimeError(f"the recorded orders deadlock: {orders}")
    span = max(free)
    busy = sum(COST[k] for k, _ in orders[0])
    return 1 - busy / span


def measure_bubble(schedule: str, m: int, args, dist) -> dict:
    from scratchlm.model import Transformer
    from scratchlm.train.distributed import gather_json
    from scratchlm.train.parallel import ParallelConfig, ParallelPlan

    config = model_config(args)
    plan = ParallelPlan(ParallelConfig(mode="pp", schedule=schedule, microbatches=m), dist, config, args.batch)
    torch.manual_seed(0)
    plan.apply(Transformer(config))
    events: list = []
    time_chunks(plan.schedule._stage, events)  # the PipelineStage the schedule drives
    x = torch.randint(0, config.vocab_size, (args.batch // plan.dp_size, config.context_length))
    walls, slots = [], []
    for i in range(args.steps + 1):
        events.clear()
        torch.distributed.barrier()
        plan.pipeline_step(x, x, 1)
        plan.stage.zero_grad(set_to_none=True)
        ranks = gather_json(dist, events)  # every rank's events of this step, in rank (= stage) order
        if i == 0:  # the first step infers shapes and warms up
            continue
        start = min(e[2] for r in ranks for e in r)
        span = max(e[3] for r in ranks for e in r) - start
        walls.append(statistics.mean(1 - sum(e[3] - e[2] for e in r) / span for r in ranks))
        slots.append(replay([[(k, c) for k, c, _, _ in sorted(r, key=lambda e: e[2])] for r in ranks]))
        if i == 1:
            orders = [" ".join(f"{k}{c}" for k, c, _, _ in sorted(r, key=lambda e: e[2])) for r in ranks]
    return {"slots": statistics.median(slots), "wall": statistics.median(walls), "orders": orders}


def worker(args) -> None:
    from scratchlm.train.distributed import gather_json, init_distributed, shutdown

    dist = init_distributed("cpu", timeout=600)
    out = {"memory": {}, "bubble": {}}
    for mode in args.modes.split(","):
        out["memory"][mode] = gather_json(dist, measure_memory(mode, args, dist))
    for schedule in ("gpipe", "1f1b"):
        for m in (int(v) for v in args.microbatches.split(",")):
            if args.batch % m == 0 and (schedule == "gpipe" or m >= dist.world_size):  # 1F1B needs M >= P
                out["bubble"][f"{schedule}/{m}"] = measure_bubble(schedule, m, args, dist)
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
    p = args.nproc
    lines += ["", f"| schedule | micro-batches M | (P-1)/(M+P-1), P={p} | bubble, slots replayed | "
              "bubble, wall clock | order on stage 0 |", "|---|---|---|---|---|---|"]
    for key, r in result["bubble"].items():
        schedule, m = key.split("/")
        lines.append(f"| {schedule} | {m} | {(p - 1) / (int(m) + p - 1):.3f} | {r['slots']:.3f} | {r['wall']:.2f} | "
                     f"{r['orders'][0]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes: the data-parallel size, and the stages")
    parser.add_argument("--modes", default="dp,zero1,fsdp,tp,pp")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", default="1,2,4,8", help="micro-batch counts M of the bubble table")
    parser.add_argument("--steps", type=int, default=5, help="timed pipeline steps per setting")
    parser.add_argument("--record", "--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   __file__, "--worker", "--result", str(result_file)]
        command += [a for a in sys.argv[1:] if a not in ("--record", "--write")]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(result_file.read_text())
    table = report(result, args)
    print(table)
    if args.record:
        from common import append_results, machine

        load = os.getloadavg()[0]
        append_results(f"\n## Parallel training: per-rank memory and pipeline bubble "
                       f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n{machine()}, torch {torch.__version__}, "
                       f"{args.nproc} CPU processes (gloo), {time.perf_counter() - started:.0f} s, load average "
                       f"{load:.1f} at the end (the wall-clock bubble depends on it; memory and slots do not); model "
                       f"d_model {args.d_model}, {args.n_layers} layers, vocabulary {args.vocab}, context "
                       f"{args.context}, batch {args.batch}, float32 AdamW. Command: `python benchmarks/parallel.py "
                       f"{' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
