"""Training beyond data parallelism, with PyTorch's own engine: FSDP2, ZeRO-1, tensor and pipeline
parallelism, and checkpoints that reshard (``docs/distributed-training.md``).

    mesh.py            --parallel modes, the mesh shape and its checks
    plan.py            what the training loop calls where modes differ
    fsdp.py            fully_shard per block (ZeRO-3) and ZeroRedundancyOptimizer (ZeRO-1)
    tensor.py          Megatron column/row-parallel blocks through parallelize_module
    pipeline.py        pipeline stages, GPipe and 1F1B schedules
    dcp_checkpoint.py  torch.distributed.checkpoint save/load, safe metadata reading
"""

import importlib

# Loaded on first use (PEP 562), so that `scratchlm --help`, which imports train/cli.py, does not import torch.
_EXPORTS = {"MODES": "mesh", "ParallelConfig": "mesh", "ParallelPlan": "plan"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
