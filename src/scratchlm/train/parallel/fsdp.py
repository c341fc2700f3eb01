"""Sharded data parallelism: FSDP2 ``fully_shard`` (ZeRO-3) and ZeroRedundancyOptimizer (ZeRO-1).

ZeRO (Rajbhandari et al. 2020) removes the copies data parallelism keeps on every process. Per parameter,
mixed-precision AdamW holds 16 bytes (fp32 weight 4, gradient 4, two moments 8; section 3.1 counts 16 with an
fp16 weight and an fp32 master copy). Stage 1 shards the optimizer states (each of N processes keeps 8/N of
them), stage 3 shards weights and gradients too (16/N), at the price of an all-gather of each block's
weights before its forward and backward and a reduce-scatter of its gradients.

``fully_shard`` (FSDP2, torch.distributed.fsdp) implements stage 3 with DTensor parameters sharded on dim 0.
Each block is its own unit, so only one block's weights are gathered at a time; the root unit holds the
embeddings, final norm and head. The mixed-precision policy computes in bf16 with fp32 gradient
reductions (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded master weights and
the optimizer stay fp32.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from scratchlm.errors import UnsupportedError


def apply_fsdp(model: nn.Module, dp_mesh, dtype: str = "float32", cpu_offload: bool = False) -> nn.Module:
    """Shard ``model`` in place over ``dp_mesh``: one FSDP unit per block, the root for the rest.

    Args:
        dtype: "bfloat16" gathers parameters in bf16 for compute and reduces gradients in fp32.
        cpu_offload: keep the shards (and so the optimizer step) in CPU memory; each unit's parameters are copied
            to the device for its forward and backward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise UnsupportedError("FSDP shards the model block by block, but this model has no .blocks")
    for block in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks):
        # The last block's weights would be gathered again right away for backward: keep them (as torchtitan).
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, offload_policy=offload)
    return model


def zero1_optimizer(optimizer: torch.optim.Optimizer, group=None) -> torch.optim.Optimizer:
    """The same optimizer with its states sharded over the processes of ``group`` (ZeRO stage 1).

    Each process updates the parameters it owns and broadcasts them (torch.distributed.optim.
    ZeroRedundancyOptimizer); the parameter groups (weight decay, learning-rate scale) are kept.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    # The constructor's own arguments only (AdamW's defaults also hold derived keys it does not take).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    return ZeroRedundancyOptimizer(optimizer.param_groups, optimizer_class=type(optimizer), process_group=group,
                                   **defaults)
