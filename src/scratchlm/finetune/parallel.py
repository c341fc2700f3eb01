"""Fine-tuning over several processes (``torchrun ... finetune --parallel dp|zero1|fsdp|tp|fsdp+tp``).

It reuses pre-training's machinery (``train/parallel/``: the mesh checks, ``ParallelPlan``, DDP, FSDP2, sharded
checkpoints, ``distributed.process_group``); what differs is the data. Chat examples have different numbers of
learned tokens, and the loss is the mean over the learned tokens of the whole batch. Every process draws the same
global batches (``SFTBatches`` with the same seed) and keeps its replica's rows; a replica's mean loss is then
weighted by its share of the batch's learned tokens,

    loss_r = (sum of losses of replica r) / (its target count c_r)  x  c_r * N / C,

so that the mean over the N replicas that DDP and FSDP take of the gradients (and ``global_loss`` of the losses)
is the gradient of (sum over all rows) / C, what one process computes on the whole batch.

What runs where: full fine-tuning with any mode but ``pp`` (a pipeline schedules fixed-size micro-batches of a
plain LM loss); LoRA and QLoRA with ``dp`` only (the adapters are small and replicated; rank 0 writes the PEFT
adapter, as one process does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from scratchlm.errors import UnsupportedError
from scratchlm.finetune.data import IGNORE
from scratchlm.train.distributed import Dist, process_group


def finetune_processes(timeout: float | None):
    """A context giving this process's ``Dist``: joined to the others under torchrun (CPU processes, gloo, as
    fine-tuning runs on the CPU), a single-process ``Dist`` otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return process_group("cpu", timeout)
    return nullcontext(Dist())


def check_parallel(options: dict, mode: str) -> None:
    """An UnsupportedError when the fine-tuning options cannot run in ``mode`` (say what to use instead)."""
    method = options["method"]
    if options.get("task") == "classify":
        raise UnsupportedError("--task classify runs in one process: start it without torchrun and --parallel")
    if mode == "pp":
        raise UnsupportedError("--parallel pp splits pre-training's fixed-size batches into micro-batches; fine-tuning "
                               "batches have uneven learned tokens: use --parallel fsdp (or tp) for a large model")
    if method != "full" and mode != "dp":
        raise UnsupportedError(f"--method {method} trains small adapters that every process keeps whole: use "
                               f"--parallel dp (fsdp, zero1 and tp shard full fine-tuning: --method full)")
    if options.get("qat") is not None:
        raise UnsupportedError("--qat runs in one process: start it without torchrun and --parallel")
    if options.get("unfreeze_every"):
        raise UnsupportedError("--unfreeze-every changes which weights train during the run, which DDP and FSDP "
                               "cannot follow: use --freeze-layers, or run in one process")
    if mode != "dp" and (options.get("freeze_layers") or (options.get("layer_lr_decay") or 1.0) != 1.0):
        raise UnsupportedError("--freeze-layers and --layer-lr-decay run with --parallel dp (or one process)")


class ReplicaShare:
    """This replica's rows of every global batch of ``batches``, and the weight of its loss (module docstring).

    ``state_dict`` is the global iterator's, the same on every process, so a run resumes with any process count.
    """

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], rank: int, n_replicas: int):
        self.batches, self.rank, self.n = batches, rank, n_replicas
        self.weight = 1.0  # of the last batch handed out

    def __iter__(self) -> ReplicaShare:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.batches)
        counted = y != IGNORE
        total, mine = int(counted.sum()), int(counted[self.rank::self.n].sum())
        # A batch with no learned token has loss 0 everywhere: any weight will do.
        self.weight = mine * self.n / total if total else 1.0
        return x[self.rank::self.n], y[self.rank::self.n]

    def weighted(self, loss_fn: Callable) -> Callable:
        """``loss_fn(forward, x, y)`` times this replica's weight for the batch just drawn."""

        def loss(forward, x, y):
            return loss_fn(forward, x, y) * self.weight

        return loss

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

