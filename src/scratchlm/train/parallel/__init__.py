"""Training beyond data parallelism, with PyTorch's own engine: FSDP2, ZeRO-1, tensor and pipeline
parallelism, and checkpoints that reshard (``docs/distributed-training.md``).

    mesh.py            --parallel modes, the mesh shape and its checks
    plan.py            what the training loop calls where modes differ
    fsdp.py            fully_shard per block (ZeRO-3) and ZeroRedundancyOptimizer (ZeRO-1)
    tensor.py          Megatron column/row-parallel blocks through parallelize_module
    pipeline.py        pipeline stages, GPipe and 1F1B schedules
    dcp_checkpoint.py  torch.distributed.checkpoint save/load, safe metadata reading
"""

from scratchlm.train.parallel.mesh import MODES, ParallelConfig
from scratchlm.train.parallel.plan import ParallelPlan

__all__ = ["MODES", "ParallelConfig", "ParallelPlan"]
