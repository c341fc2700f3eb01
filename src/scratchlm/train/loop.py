"""The training loop: batches in, a better model out. Pre-training and fine-tuning share it.

    result = train(model, TrainConfig(max_steps=2000), RandomBatches(...), val_batches, out_dir="runs/x")

One optimizer step:

    lr <- warm-up then cosine schedule (optim.lr_at)
    repeat grad_accum_steps times:           # gradient accumulation: a big batch from small ones
        logits <- model(input_ids)           # under bfloat16 autocast if asked
        loss   <- cross-entropy(logits, targets), positions with target -100 ignored
        (loss / grad_accum_steps).backward() # under DDP the last micro-step all-reduces the gradients
    stop if the loss is not finite           # before the update, so the last checkpoint stays good
    clip the gradient norm, AdamW step

Every ``eval_interval`` steps (and at the end): validation loss and perplexity, the ``best`` checkpoint
when it improved, the ``last`` checkpoint with optimizer and RNG states, and early stopping.

The caller chooses the model, the batches (any iterator of ``(input_ids, targets)``; one with
``state_dict``/``load_state_dict`` resumes exactly) and which parameters train (``trainable``), so
fine-tuning passes masked targets and its adapter parameters.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError, TrainingError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.distributed import Dist, all_reduce_sum, gather_json
from scratchlm.train.optim import load_optimizer_tensors, lr_at, make_optimizer, optimizer_tensors

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainConfig:
    """How to train (not what): steps, batch, optimizer, schedule, precision, evaluation."""

    max_steps: int = 2000
    batch_size: int = 12  # sequences per micro-step, over all processes together
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # the cosine reaches min_lr here; None means max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    dtype: str = "float32"  # "bfloat16" runs forward and backward under autocast (CPU and CUDA)
    compile: bool = False  # torch.compile the model (slow start, faster steps on big models)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% slower
    eval_interval: int = 250
    eval_batches: int = 20
    early_stopping: int | None = None  # stop after this many evaluations without a better val loss
    seed: int = 1337
    fused_optimizer: bool | None = None  # None: fused AdamW where the device supports it
    optimizer: str = "adamw"  # or sgd, rmsprop, adafactor (optim.OPTIMIZERS)
    momentum: float = 0.9  # SGD's and RMSprop's

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "eval_interval", "eval_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps, weight_decay and grad_clip must not be negative")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ConfigError(f"early_stopping must be at least 1 evaluation, got {self.early_stopping}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(repr=False)
class TrainResult:
    """What happened: steps done, last losses, whether it stopped early, how long it took."""

    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # one record per step and per evaluation
    elapsed: float | None = None  # seconds of this call to train() (a resumed run counts from its resume)

    def __repr__(self) -> str:
        # Short on purpose: the history of a 2,000-step run is ~60 KB, too much for a REPL line.
        def loss(x: float | None) -> str:
            return "None" if x is None else f"{x:.4f}"

        elapsed = "None" if self.elapsed is None else f"{self.elapsed:.1f}s"
        return (f"TrainResult(step={self.step}, train_loss={loss(self.train_loss)}, val_loss={loss(self.val_loss)}, "
                f"best_val_loss={loss(self.best_val_loss)}, stopped_early={self.stopped_early}, elapsed={elapsed}, "
                f"history=[{len(self.history)} records])")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not -100."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)  # a fully masked batch gives 0, not 0/0


def autocast_context(dtype: str, device: str):
    """bfloat16 autocast (matmuls in bf16, reductions in fp32), or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], config: TrainConfig, dist: Dist) -> float:
    """Mean validation loss over ``batches`` (and over every process's share of them)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for x, y in batches:
        x, y = x.to(dist.device), y.to(dist.device)
        with autocast_context(config.dtype, dist.device):
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += (y != -100).sum().item()
    total, count = all_reduce_sum(dist, total, count)
    model.train(was_training)
    return total / max(count, 1.0)


def train(model: nn.Module, config: TrainConfig, batches: Iterator[Batch], val_batches: Sequence[Batch] | None = None,
          *, trainable: Sequence[str] | None = None, out_dir: str | Path | None = None,
          save_model: Callable[[Path], None] | None = None, resume_from: str | Path | None = None,
          dist: Dist | None = None, reporter=None, load_model: Callable[[Path], None] | None = None,
          loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          evaluate_fn: Callable[[nn.Module, Sequence[Batch]], dict] | None = None,
          lr_scale: Callable[[str], float] | None = None, before_step: Callable[[int], None] | None = None,
          parallel=None) -> TrainResult:
    """Train ``model`` for ``config.max_steps`` optimizer steps (counting steps already done when resuming).

    Args:
        batches: yields ``(input_ids, targets)`` of this process's micro-batch; targets -100 are ignored.
        val_batches: this process's share of the fixed validation batches (None: no evaluation).
        trainable: names of the parameters to train (others are frozen); None trains every parameter
            that requires grad.
        out_dir: where ``last/`` and ``best/`` checkpoints go (None: no checkpoints).
        save_model: writes the model files of a checkpoint into a directory; needed with ``out_dir``.
        resume_from: a checkpoint directory (``out/last``) to continue from, exactly.
        dist: this process's place in data-parallel training.
        reporter: receives ``on_start/on_step/on_eval/on_end`` calls (progress bar, metrics, plot).
        load_model: reads what ``save_model`` wrote back into the model when resuming (None: the checkpoint
            holds ``model.safetensors`` with the model's own parameter names). Fine-tuning saves adapters.
        loss_fn: ``loss_fn(forward, x, y)`` -> mean loss, instead of ``lm_loss(forward(x), y)`` (fine-tuning
            projects only the positions with a target onto the vocabulary).
        evaluate_fn: ``evaluate_fn(model, val_batches)`` -> ``{"val_loss": ..., other metrics}``, instead of the
            mean cross-entropy (alignment's losses and preference accuracy); the other metrics go into the
            evaluation record.
        lr_scale: each trained parameter's multiple of the learning rate, by name (discriminative rates).
        before_step: called with the step number before each step (gradual unfreezing sets ``requires_grad``
            there; a parameter without a gradient is left untouched by the optimizer).
        parallel: a ``train.parallel.ParallelPlan`` (FSDP, ZeRO-1, tensor or pipeline parallelism) instead of
            plain DDP; it shards ``model`` in place (a pipeline rank trains only its stage).
    """
    dist = dist or Dist()
    if out_dir is not None and save_model is None:
        raise ConfigError("train(out_dir=...) needs save_model, the function that writes the model files of a "
                          "checkpoint (for example save_model_dir with the tokenizer)")
    device = dist.device
    if parallel is not None:  # sharding replaces the parameters: before the optimizer sees them
        model.gradient_checkpointing = config.activation_checkpointing
        model = parallel.apply(model, config.dtype)
    names = {p: n for n, p in model.named_parameters()}
    if trainable is not None:
        unknown = sorted(set(trainable) - set(names.values()))
        if unknown:
            raise ConfigError(f"trainable names parameters the model does not have: {unknown[:5]}")
        for p, n in names.items():
            p.requires_grad_(n in trainable)
    params = [(n, p) for p, n in names.items() if p.requires_grad]
    optimizer = make_optimizer(params, config.lr, config.weight_decay, (config.beta1, config.beta2),
                               config.fused_optimizer, config.optimizer, config.momentum, lr_scale)
    if parallel is not None:
        optimizer = parallel.wrap_optimizer(optimizer)
    model.gradient_checkpointing = config.activation_checkpointing
    model.train()
    forward = torch.compile(model) if config.compile else model
    if parallel is not None:
        forward = parallel.wrap_forward(forward)
    elif dist.enabled:
        device_ids = [dist.local_rank] if "cuda" in device else None
        forward = nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
    decay_steps = config.decay_steps or config.max_steps
    out_dir = Path(out_dir) if out_dir is not None else None

    # Where training stands; this dict (plus RNG states and data position) is trainer_state.json.
    state = {"step": 0, "best_val_loss": None, "best_step": None, "evals_without_improvement": 0, "tokens": 0}
    # Dropout masks differ per data-parallel replica, as in nanoGPT (tensor-parallel ranks of a replica share them).
    torch.manual_seed(config.seed + (parallel.dp_rank if parallel is not None else dist.rank))
    if resume_from is not None:
        state = _resume(Path(resume_from), model, optimizer, names, batches, dist, state, load_model, parallel)

    def save(kind: str, with_optimizer: bool) -> None:
        # Every process takes part in gathering RNG and data states; only rank 0 writes.
        write_model, opt = save_model, None
        if parallel is not None and parallel.sharded and out_dir is not None:
            # Every process writes its shards (torch.distributed.checkpoint) next to the checkpoint; rank 0 moves
            # them inside the new checkpoint directory before its atomic swap, and makes model.safetensors.
            from scratchlm.train.parallel.dcp_checkpoint import prepare_staging, save_sharded, with_sharded_state

            staging = prepare_staging(out_dir / kind, dist)
            save_sharded(staging, model, optimizer if with_optimizer else None)
            write_model = with_sharded_state(save_model, staging)
        elif with_optimizer:
            if hasattr(optimizer, "consolidate_state_dict"):  # ZeRO-1: gather the shards on rank 0
                optimizer.consolidate_state_dict(to=0)
            opt = optimizer_tensors(optimizer, names) if dist.is_main or parallel is None else None
        rng = gather_json(dist, ckpt.capture_rng())
        data = gather_json(dist, batches.state_dict() if hasattr(batches, "state_dict") else None)
        if dist.is_main and out_dir is not None:
            trainer_state = {**state, "rng": rng, "data": data, "world_size": dist.world_size,
                             "train_config": config.to_dict(), "model_config": model.config.to_dict()}
            ckpt.write_checkpoint(out_dir / kind, write_model, opt, trainer_state)

    result = TrainResult(state["step"], None, None, state["best_val_loss"])
    started = time.perf_counter()
    if reporter is not None:
        reporter.on_start(state["step"], config.max_steps)
    step_loss = None
    while state["step"] < config.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, config.lr, config.min_lr, config.warmup_steps, decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if before_step is not None:
            before_step(step)

        loss_sum, tokens = torch.zeros((), device=device), 0
        for micro in range(config.grad_accum_steps):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last_micro = micro == config.grad_accum_steps - 1
            if parallel is not None and parallel.pipelined:  # every micro-batch's forward and backward, scheduled
                with autocast_context(config.dtype, device):
                    loss_sum += parallel.pipeline_step(x, y, config.grad_accum_steps)
                tokens += x.numel()
                continue
            # DDP all-reduces gradients in backward; only the last micro-step needs to.
            ddp = dist.enabled and isinstance(forward, nn.parallel.DistributedDataParallel)
            no_sync = forward.no_sync() if ddp and not last_micro else contextlib.nullcontext()
            with no_sync:
                with autocast_context(config.dtype, device):
                    loss = lm_loss(forward(x), y) if loss_fn is None else loss_fn(forward, x, y)
                (loss / config.grad_accum_steps).backward()
            loss_sum += loss.detach()
            tokens += x.numel()

        # The loss every process reports is the mean over all of them (what one process would see).
        if parallel is not None:
            step_loss, tokens = parallel.global_loss(loss_sum.item() / config.grad_accum_steps, tokens)
        else:
            step_loss, tokens = all_reduce_sum(dist, loss_sum.item() / config.grad_accum_steps, tokens)
            step_loss /= dist.world_size
        if not math.isfinite(step_loss):
            last = ckpt.resolve_checkpoint(out_dir / "last") if out_dir is not None else None
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(f"the loss became {step_loss} at step {step + 1}; {kept}. Lower --lr, keep "
                                "--grad-clip on, or train in float32, then resume or start again")
        grad_norm = None
        if parallel is not None:
            grad_norm = parallel.finish_gradients([p for _, p in params], config.grad_clip)
        elif config.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_([p for _, p in params], config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["tokens"] += int(tokens)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / dt, "step_time": dt}
        result.history.append(record)
        if reporter is not None:
            reporter.on_step(record)

        done = state["step"] >= config.max_steps
        if val_batches is not None and (state["step"] % config.eval_interval == 0 or done):
            if evaluate_fn is None:
                val_loss = (evaluate(model, val_batches, config, dist) if parallel is None
                            else parallel.evaluate(model, val_batches, config))
                metrics = {"val_ppl": math.exp(min(val_loss, 50))}
            else:
                metrics = dict(evaluate_fn(model, val_batches))
                val_loss = metrics.pop("val_loss")
            best = state["best_val_loss"]
            improved = best is None or val_loss < best
            if improved:
                state.update(best_val_loss=val_loss, best_step=state["step"], evals_without_improvement=0)
                save("best", with_optimizer=False)
            else:
                state["evals_without_improvement"] += 1
            save("last", with_optimizer=True)
            eval_record = {"step": state["step"], "val_loss": val_loss, **metrics, "train_loss": step_loss,
                           "best": improved}
            result.history.append(eval_record)
            result.val_loss = val_loss
            if reporter is not None:
                reporter.on_eval(eval_record)
            if config.early_stopping and state["evals_without_improvement"] >= config.early_stopping:
                result.stopped_early = True
                break
        elif done:
            save("last", with_optimizer=True)

    result.step, result.train_loss, result.best_val_loss = state["step"], step_loss, state["best_val_loss"]
    result.elapsed = time.perf_counter() - started
    if reporter is not None:
        reporter.on_end(result)
    return result


def _resume(directory: Path, model: nn.Module, optimizer, names, batches, dist: Dist, state: dict,
            load_model: Callable[[Path], None] | None = None, parallel=None) -> dict:
    """Load weights, optimizer, data position and RNG states from a checkpoint; returns its trainer state."""
    from safetensors.torch import load_file

    found = ckpt.resolve_checkpoint(directory)
    if found is None:
        raise TrainingError(f"no checkpoint to resume from in {directory}: train without --resume first")
    saved = ckpt.read_trainer_state(found)
    from scratchlm.train.parallel.dcp_checkpoint import DCP_DIR, load_sharded, load_zero1_tensors

    if load_model is None and (found / DCP_DIR).is_dir():  # written shard by shard: read into any layout
        ckpt.check_resume_config(found, model.config)
        if hasattr(optimizer, "consolidate_state_dict"):
            raise TrainingError(f"{found} was written by a sharded run (fsdp, tp or pp); resume it with one of "
                                "those --parallel modes, dp, or one process, not zero1")
        load_sharded(found / DCP_DIR, model, optimizer)
    elif parallel is not None and parallel.sharded:
        raise TrainingError(f"{found} holds whole tensors (a single-process, dp or zero1 run): resume it with "
                            f"--parallel dp or zero1 (or one process), not {parallel.mode}")
    elif load_model is not None:
        load_model(found)
    else:
        ckpt.check_resume_config(found, model.config)
        weights = load_file(found / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {found} does not fit the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    if not (found / DCP_DIR).is_dir():
        if hasattr(optimizer, "consolidate_state_dict"):
            load_zero1_tensors(optimizer, names, ckpt.read_optimizer_tensors(found))
        else:
            load_optimizer_tensors(optimizer, names, ckpt.read_optimizer_tensors(found))
    same_world = saved.get("world_size") == dist.world_size
    if same_world:
        ckpt.restore_rng(saved["rng"][dist.rank])
    # With another process count training goes on correctly, but not bit for bit.
    data = saved["data"][dist.rank if same_world else 0]
    if hasattr(batches, "load_state_dict") and data is not None:
        batches.load_state_dict(data)
    else:  # a plain iterator: skip the batches already used
        for _ in range(saved["step"] * saved["train_config"]["grad_accum_steps"]):
            next(batches)
    return {k: saved[k] for k in state}
