"""Parallel training modes (FSDP2, ZeRO-1, tensor and pipeline parallelism) against one process, on CPU with gloo.

One torchrun launch per world size runs every mode in turn (imports cost seconds per launch), each for 50 steps
of a 2-layer, 64-wide Llama-style model (rotary positions, grouped-query attention, SwiGLU, tied head) on a
repeated random token sequence, and writes its loss curves, validation losses and per-rank memory to JSON; the
tests compare them with the same training in one process. Checkpoints written by 2 FSDP ranks are then read by
4 ranks, by tensor-parallel ranks and by one process (torch.distributed.checkpoint reshards them).

Run as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.model import Transformer
from scratchlm.train.data import RandomBatches, eval_batches
from scratchlm.train.distributed import Dist, barrier, init_distributed, shutdown
from scratchlm.train.loop import TrainConfig, train

STEPS = 50
MODEL = dict(vocab_size=64, context_length=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
             positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True, dropout=0.0)
TRAIN = dict(max_steps=STEPS, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=25, eval_batches=2,
             grad_clip=0.5, seed=3, decay_steps=STEPS)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def token_ids() -> np.ndarray:
    """A 600-token random sequence repeated: learnable, so the loss falls and clipping engages early on."""
    return np.tile(np.random.default_rng(0).integers(0, MODEL["vocab_size"], 600), 8).astype(np.uint16)


def run_curve(out: Path | None, parallel=None, dist: Dist | None = None, model_changes: dict | None = None,
              resume: bool = False, max_steps: int = STEPS, seed: int = 3, dtype: str = "float32") -> dict:
    """Train the tiny model (in ``parallel``'s layout); the per-step losses, validation losses and memory."""
    from scratchlm.formats.checkpoint import save_model_dir
    from scratchlm.train.parallel import ParallelPlan
    from scratchlm.train.parallel.dcp_checkpoint import model_weights

    dist = dist or Dist()
    config = ModelConfig(**{**MODEL, **(model_changes or {})})
    train_config = TrainConfig(**{**TRAIN, "max_steps": max_steps, "seed": seed, "dtype": dtype})
    plan = ParallelPlan(parallel, dist, config, train_config.batch_size) if parallel is not None else None
    rank, world = (plan.dp_rank, plan.dp_size) if plan is not None else (dist.rank, dist.world_size)
    ids = token_ids()
    batches = RandomBatches(ids[:4000], 8, 16, seed=seed, rank=rank, world_size=world)
    val = eval_batches(ids[4000:], 8, 16, 2)
    val = plan.share_eval_batches(val) if plan is not None else val
    torch.manual_seed(seed)
    model = Transformer(config)

    def save_model(directory: Path) -> None:
        save_model_dir(directory, config, model_weights(directory, model))

    resume_from = out / "last" if resume else None
    result = train(model, train_config, batches, val, out_dir=out, save_model=save_model, dist=dist,
                   parallel=plan, resume_from=resume_from)
    losses = {r["step"]: r["loss"] for r in result.history if "loss" in r}
    vals = {r["step"]: r["val_loss"] for r in result.history if "val_loss" in r}
    return {"loss": losses, "val": vals}


# ---- tests --------------------------------------------------------------------------------------------------------
def torchrun(n: int, out: Path, *jobs: str, script: str = __file__) -> None:
    """Start ``script`` (by default this file's worker) on ``n`` processes (gloo, one thread each) with the arguments
    ``out`` and ``jobs``; fail with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           script, str(out), *jobs], env=ENV, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every mode's curves: one process here, 2 and 4 processes under torchrun (see the module docstring)."""
    out = tmp_path_factory.mktemp("parallel")
    torch.set_num_threads(1)
    single = run_curve(out / "single")
    torchrun(2, out, "dp:mode=dp", "zero1_25:mode=zero1,steps=25", "zero1_resumed:mode=zero1,resume=zero1_25",
             "fsdp:mode=fsdp", "tp:mode=tp", "gpipe:mode=pp,schedule=gpipe",
             "1f1b:mode=pp,schedule=1f1b", "fsdp25:mode=fsdp,steps=25", "tp_from_fsdp:mode=tp,resume=fsdp25",
             "fsdp_bf16:mode=fsdp,dtype=bfloat16,steps=10", "fsdp_offload:mode=fsdp,cpu_offload=1,steps=10")
    torchrun(4, out, "fsdp+tp:mode=fsdp+tp,tp=2", "pp+dp:mode=pp,pp=2,microbatches=2", "fsdp4_from_fsdp2:mode=fsdp,"
             "resume=fsdp25")
    shutil.copytree(out / "fsdp25" / "last", out / "one_from_fsdp2" / "last")
    one = run_curve(out / "one_from_fsdp2", resume=True)
    results = {**json.loads((out / "results-2.json").read_text()), **json.loads((out / "results-4.json").read_text())}
    results = {name: {k: {int(step): v for step, v in r[k].items()} for k in ("loss", "val")}
               for name, r in results.items()}
    # ZeRO-1's curve is two halves: 25 steps, then a resume from their (gathered) checkpoint on 2 ranks again.
    results["zero1"] = {k: {**results["zero1_25"][k], **results["zero1_resumed"][k]} for k in ("loss", "val")}
    return {"out": out, "single": single, **results, "one_from_fsdp2": one}


# Every mode computes the same sums in another order (gradients averaged over ranks, row-parallel partial products
# added by an all-reduce, micro-batch gradients accumulated), so only float32 rounding differs: measured at most
# 7.2e-7 over the 50 steps here. 1e-4 is the bound; another seed moves the curve by more than 0.05.
TOLERANCE = 1e-4


@pytest.mark.parametrize("mode", ["dp", "zero1", "fsdp", "tp", "gpipe", "1f1b", "fsdp+tp", "pp+dp"])
def test_every_parallel_mode_follows_the_single_process_loss_curve(runs, mode):
    single, run = runs["single"], runs[mode]
    assert sorted(run["loss"]) == list(range(1, STEPS + 1))
    assert single["loss"][STEPS] < single["loss"][1] - 0.5  # it learns: the comparison is not of flat lines
    worst = max(abs(run["loss"][s] - single["loss"][s]) for s in single["loss"])
    assert worst < TOLERANCE, (mode, worst)
    assert sorted(run["val"]) == [25, 50]
    assert max(abs(run["val"][s] - single["val"][s]) for s in (25, 50)) < TOLERANCE


def test_fsdp_mixed_precision_and_cpu_offload_train_the_same_model(runs):
    """bf16 parameters for compute with fp32 reductions (MixedPrecisionPolicy) stay near the float32 curve without
    equalling it; CPU offload of the shards changes where they live, not the arithmetic."""
    single, bf16, offload = runs["single"], runs["fsdp_bf16"], runs["fsdp_offload"]
    gaps = [abs(bf16["loss"][s] - single["loss"][s]) for s in range(1, 11)]
    assert 1e-6 < max(gaps) < 0.02, gaps
    assert max(abs(offload["loss"][s] - single["loss"][s]) for s in range(1, 11)) < TOLERANCE


def test_a_different_seed_moves_the_curve_by_far_more_than_the_tolerance(runs, tmp_path):
    other = run_curve(tmp_path / "other", model_changes=None, seed=4)
    assert max(abs(other["loss"][s] - runs["single"]["loss"][s]) for s in other["loss"]) > 500 * TOLERANCE


@pytest.mark.parametrize("name", ["one_from_fsdp2", "fsdp4_from_fsdp2", "tp_from_fsdp"])
def test_a_checkpoint_of_two_fsdp_ranks_resumes_exactly_on_one_four_or_tensor_parallel_ranks(runs, name):
    run, single = runs[name], runs["single"]
    assert sorted(run["loss"]) == list(range(26, STEPS + 1))  # the data position carried over: steps 26..50
    worst = max(abs(run["loss"][s] - single["loss"][s]) for s in run["loss"])
    assert worst < TOLERANCE, (name, worst)


def test_the_sharded_checkpoint_holds_the_same_parameters_and_optimizer_states_as_one_process(runs, tmp_path):
    """2 FSDP ranks' DCP files, read into one process, against the single-process run's own state at step 25."""
    from safetensors.torch import load_file

    from scratchlm.train.optim import make_optimizer, optimizer_tensors
    from scratchlm.train.parallel.dcp_checkpoint import DCP_DIR, load_sharded

    single25 = run_curve(tmp_path / "single25", max_steps=25)
    assert single25["loss"] == {s: runs["single"]["loss"][s] for s in range(1, 26)}
    model = Transformer(ModelConfig(**MODEL))
    optimizer = make_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.99))
    load_sharded(runs["out"] / "fsdp25" / "last" / DCP_DIR, model, optimizer)
    names = {p: n for n, p in model.named_parameters()}
    mine = {**model.canonical_state_dict(), **optimizer_tensors(optimizer, names)}
    theirs = {**load_file(tmp_path / "single25" / "last" / "model.safetensors"),
              **load_file(tmp_path / "single25" / "last" / "optimizer.safetensors")}
    assert sorted(mine) == sorted(theirs)
    assert any(k.endswith("::exp_avg_sq") for k in mine)
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key].float(), value.float(), atol=1e-5, rtol=1e-4, msg=key)
    # The model files rank 0 wrote beside the shards (what export and LLM.load read) hold the same weights.
    exported = load_file(runs["out"] / "fsdp25" / "last" / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, mine[key], atol=0, rtol=0, msg=key)


def test_checkpoint_writes_leave_no_staging_or_temporary_directories(runs):
    leftovers = [p.name for p in (runs["out"] / "fsdp").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in (runs["out"] / "fsdp" / "last").iterdir()) == [
        "distcp", "model.safetensors", "model_config.json", "trainer_state.json"]


# ---- the worker torchrun starts ---------------------------------------------------------------------------------
def worker(out: Path, jobs: list[str]) -> None:
    from scratchlm.train.parallel import ParallelConfig

    dist = init_distributed("cpu", timeout=60)
    results = {}
    try:
        for job in jobs:
            name, _, flags = job.partition(":")
            spec = dict(item.split("=") for item in flags.split(",") if item)
            mode = spec.pop("mode")
            resume = spec.pop("resume", None)
            steps = int(spec.pop("steps", STEPS))
            dtype = spec.pop("dtype", "float32")
            cfg = ParallelConfig(mode=mode, **{k: (v if k == "schedule" else int(v)) for k, v in spec.items()})
            if resume and dist.is_main:  # continue a copy of another job's checkpoint
                shutil.copytree(out / resume / "last", out / name / "last")
            barrier(dist)
            started = time.process_time()
            results[name] = run_curve(out / name, cfg, dist, resume=resume is not None, max_steps=steps, dtype=dtype)
            results[name]["cpu_s"] = time.process_time() - started
    finally:
        if dist.is_main:
            (out / f"results-{dist.world_size}.json").write_text(json.dumps(results))
        shutdown(dist)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
