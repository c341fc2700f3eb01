"""What the training loop asks of a parallel layout: shard the model, step, reduce, clip, evaluate.

    plan = ParallelPlan(ParallelConfig(mode="fsdp"), dist, model_config, batch_size=16)
    batches = RandomBatches(train_ids, 16, context, seed, plan.dp_rank, plan.dp_size)
    train(model, config, batches, val, parallel=plan, dist=dist, ...)

The loop stays one loop: where a mode differs, it calls the plan.

    apply            shard or split the model (FSDP units, DTensor matrices, this rank's pipeline stage)
    wrap_optimizer   ZeRO-1's sharded optimizer; the others shard through their (DTensor) parameters
    wrap_forward     DDP for dp and zero1; the others reduce gradients themselves
    pipeline_step    a whole GPipe/1F1B step (forwards and backwards of every micro-batch) for pp
    global_loss      the step's loss over the whole global batch (counted once per data-parallel replica)
    finish_gradients average over replicas where no engine does, sum tied copies, clip by the global norm
    evaluate         validation loss, through the pipeline for pp
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist_
import torch.nn.functional as F
from torch import nn

from scratchlm.train.distributed import Dist, all_reduce_sum
from scratchlm.train.parallel.mesh import ParallelConfig, build_mesh, check_backend


class ParallelPlan:
    """A parallel layout joined to this process's place in it (built on every process, after init)."""

    def __init__(self, config: ParallelConfig, dist: Dist, model_config, batch_size: int):
        check_backend(dist.device)
        self.config, self.dist = config, dist
        self.shape = config.check(dist.world_size, model_config, batch_size)
        self.mesh = build_mesh(self.shape, dist.device) if dist.enabled else None
        self.tp = self.shape.get("tp", 1)
        self.pp = self.shape.get("pp", 1)
        self.dp_size = self.shape["dp"]
        coords = self.mesh.get_coordinate() if self.mesh is not None else [0] * len(self.shape)
        self.dp_rank = coords[0]
        inner = coords[1] if len(coords) > 1 else 0
        # The ranks whose loss and token count stand for their replica: one per data-parallel replica.
        self.owns_loss = (self.pp == 1 and inner == 0) or (self.pp > 1 and inner == self.pp - 1)
        self.stage = None
        self.schedule = None
        self._loss_scale = 1.0

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def sharded(self) -> bool:
        """Whether checkpoints are written by every process with torch.distributed.checkpoint."""
        return self.mode in ("fsdp", "tp", "pp", "fsdp+tp")

    @property
    def pipelined(self) -> bool:
        return self.pp > 1

    def _dim(self, name: str):
        return self.mesh[name] if self.mesh is not None and name in self.shape else None

    # ---- building -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, dtype: str = "float32") -> nn.Module:
        """Shard or split ``model`` in place; returns the module this process trains (a stage for pp)."""
        if self.mesh is None:
            return model
        if self.tp > 1:
            from scratchlm.train.parallel.tensor import apply_tensor_parallel

            apply_tensor_parallel(model, self._dim("tp"))
        if self.mode in ("fsdp", "fsdp+tp") and self.dp_size > 1:
            from scratchlm.train.parallel.fsdp import apply_fsdp

            apply_fsdp(model, self._dim("dp"), dtype, self.config.cpu_offload)
        if self.pp > 1:
            from scratchlm.train.parallel.pipeline import PipelineStageModule, build_schedule

            pp_mesh = self._dim("pp")
            model = self.stage = PipelineStageModule(model, pp_mesh.get_local_rank(), self.pp)
            self.schedule = build_schedule(model, pp_mesh, self.dist.device, self.config.schedule,
                                           self.config.n_microbatches(self.pp), self._pipeline_loss)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.mode == "zero1" and self.mesh is not None:
            from scratchlm.train.parallel.fsdp import zero1_optimizer

            return zero1_optimizer(optimizer)
        if self.tp > 1:
            # Sharded matrices are DTensors, embeddings and norms plain tensors: the fused and foreach kernels take
            # one kind per call, so step each parameter on its own (slower on many small tensors, same result).
            for group in optimizer.param_groups:
                for key in ("fused", "foreach"):
                    if group.get(key):
                        group[key] = False
        return optimizer

    def wrap_forward(self, forward: nn.Module) -> nn.Module:
        if self.mode in ("dp", "zero1") and self.mesh is not None:
            device_ids = [self.dist.local_rank] if "cuda" in self.dist.device else None
            return nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
        return forward

    # ---- a step --------------------------------------------------------------------------------------
    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from scratchlm.train.loop import lm_loss

        return lm_loss(logits, targets) * self._loss_scale

    def pipeline_step(self, x: torch.Tensor, y: torch.Tensor, grad_accum_steps: int) -> torch.Tensor:
        """Forward and backward of one batch through the pipeline; the batch's mean loss on the last stage, else 0.

        Each micro-batch's mean loss is divided by the micro-batch count and the accumulation steps, so the summed
        gradients are those of the mean over the whole batch, as in one process.
        """
        m = self.config.n_microbatches(self.pp)
        self._loss_scale = 1.0 / (m * grad_accum_steps)
        losses: list[torch.Tensor] = []
        if self.stage.first:
            self.schedule.step(x, target=y if self.stage.last else None, losses=losses)
        else:
            self.schedule.step(target=y if self.stage.last else None, losses=losses)
        if not self.stage.last:
            return torch.zeros((), device=x.device)
        return torch.stack([loss.detach() for loss in losses]).sum() * grad_accum_steps

    def global_loss(self, local_loss: float, tokens: int) -> tuple[float, int]:
        """The loss over the global batch (mean of the replicas' means) and the tokens it held."""
        owned = 1.0 if self.owns_loss else 0.0
        total, n = all_reduce_sum(self.dist, local_loss * owned, tokens * owned)
        return total / self.dp_size, int(n)

    def finish_gradients(self, params: Sequence[nn.Parameter], grad_clip: float) -> float | None:
        """Reduce the gradients no engine reduced, then clip them by their global norm; returns the norm."""
        if self.mesh is not None and self.dp_size > 1 and self.mode in ("tp", "pp"):
            group = self._dim("dp").get_group()
            for p in params:
                if p.grad is not None:
                    local = _local(p.grad)
                    dist_.all_reduce(local, group=group)
                    local.div_(self.dp_size)
        if self.stage is not None:
            from scratchlm.train.parallel.pipeline import sum_tied_gradients

            sum_tied_gradients(self.stage, self._dim("pp"))
        if grad_clip <= 0:
            return None
        return clip_grad_norm(params, grad_clip, self._norm_groups(), self._counted(params))

    def _norm_groups(self):
        return [self._dim("pp").get_group()] if self.pp > 1 else []

    def _counted(self, params):
        # A tied embedding on the first and the last stage counts once towards the norm.
        if self.stage is not None and self.stage.config.tie_embeddings and self.stage.last and not self.stage.first:
            tied = self.stage.tok_embeddings.weight
            return [p is not tied for p in params]
        return [True] * len(params)

    # ---- evaluation ----------------------------------------------------------------------------------
    def share_eval_batches(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """This replica's rows of every validation batch (``batches``: all of them, as one process has them).

        Each replica takes every batch, a strided share of its rows (perhaps none), so that all of them run the
        same number of forward passes: FSDP's all-gathers are collectives, and a replica without a batch would
        leave the others waiting.
        """
        r, n = self.dp_rank, self.dp_size
        return [(x[r::n], y[r::n]) for x, y in batches]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches, config) -> float:
        """Mean validation loss over every replica's share of ``batches``."""
        from scratchlm.train.loop import autocast_context, evaluate

        if not self.pipelined:
            return evaluate(model, batches, config, self.dist)
        from scratchlm.train.parallel.pipeline import pipeline_forward

        was_training = model.training
        model.eval()
        total = count = 0.0
        for x, y in batches:
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            with autocast_context(config.dtype, self.dist.device):
                logits = pipeline_forward(model, self._dim("pp"), x)
            if logits is not None:
                total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                         reduction="sum").item()
                count += (y != -100).sum().item()
        total, count = all_reduce_sum(self.dist, total, count)
        model.train(was_training)
        return total / max(count, 1.0)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float, groups=(), counted=None) -> float:
    """Scale the gradients so that their global 2-norm is at most ``max_norm`` (torch's clip_grad_norm_ rule).

    Works on a mix of DTensor gradients (sharded by FSDP or tensor parallelism: each norm is the full tensor's)
    and plain ones; ``groups`` are process groups whose members hold different parameters (pipeline stages),
    over which the squared norms are summed. ``counted[i]`` False leaves a parameter out of the norm (a copy).
    """
    from torch.distributed.tensor import DTensor

    counted = counted or [True] * len(params)
    square = torch.zeros((), dtype=torch.float64)
    for p, count in zip(params, counted):
        if p.grad is None or not count:
            continue
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        square += norm.double().cpu() ** 2
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    for group in groups:  # NCCL reduces device tensors only
        t = square.to(device)
        dist_.all_reduce(t, group=group)
        square = t.cpu()
    total = math.sqrt(float(square))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
