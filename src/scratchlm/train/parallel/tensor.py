"""Megatron-style tensor parallelism through DTensor ``parallelize_module``.

Shoeybi et al. 2019 (Megatron-LM, section 3) split each block's two matrix products so that one all-reduce
per sub-layer is the only communication:

    attention: q/k/v_proj column-parallel (each rank computes H/tp whole heads), o_proj row-parallel
    MLP:       gate/up_proj column-parallel (each rank d_ff/tp hidden units),  down_proj row-parallel

A column-parallel layer keeps rows ``[r*n/tp, (r+1)*n/tp)`` of its weight, so its output is the local slice of
the features; the row-parallel layer after it takes that slice and produces partial sums, which one
all-reduce adds (``RowwiseParallel``'s Replicate output). In backward the column-parallel input's gradient is
the all-reduced one. Embeddings, norms and the head stay replicated: every rank computes them whole (the
vocabulary-parallel head of the paper is not done here).

Each attention module then sees H/tp query heads and Hkv/tp key/value heads, so its config is replaced by
one that says so; head_dim is unchanged.
"""

from __future__ import annotations

from torch import nn

from scratchlm.errors import UnsupportedError


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> nn.Module:
    """Split every block of ``model`` over ``tp_mesh`` in place (column-parallel in, row-parallel out)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        if attn.qkv_proj is not None or mlp.gate_up_proj is not None:
            raise UnsupportedError("tensor parallelism splits q/k/v and gate/up separately; this model has them "
                                   "fused (a quantized inference model): train the unfused model")
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
        if mlp.swiglu:
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        cfg = attn.config
        attn.config = cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp, head_dim=cfg.head_dim)
    return model
