"""Pipeline parallelism with ``torch.distributed.pipelining``: consecutive blocks per stage, GPipe or 1F1B.

Stage s of P holds blocks ``[s*L/P, (s+1)*L/P)``; the first also the embeddings, the last the final norm and
the head. A step's batch is cut into M micro-batches; a schedule orders their forwards and backwards:

    GPipe (Huang et al. 2019): all M forwards, then all M backwards; activations of M micro-batches live at once.
    1F1B  (Narayanan et al. 2019, PipeDream-Flush): after P-1 warm-up forwards, alternate one forward and one
          backward; at most P micro-batches' activations live at once, the same bubble.

Both leave each stage idle for P-1 of the M+P-1 slots of a step: a bubble fraction (P-1)/(M+P-1)
(Narayanan et al. 2021, section 2.2), which more micro-batches shrink. ``benchmarks/parallel.py`` measures it.

A tied head (``tie_embeddings``) lives on the first and the last stage: the last keeps its own copy of the
embedding matrix, under the same name, and the two copies' gradients are summed after backward so that they
stay equal (Megatron-LM's "embedding group" all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scratchlm.model import AttentionMask, Transformer, rope_tables


class PipelineStageModule(nn.Module):
    """The part of a Transformer one pipeline stage runs, under the model's own parameter names.

    Its forward takes token ids (first stage) or hidden states [B, T, C] (others) and returns hidden states, or
    logits [B, T, V] on the last stage.
    """

    def __init__(self, model: Transformer, stage: int, n_stages: int):
        super().__init__()
        cfg = self.config = model.config
        per_stage = cfg.n_layers // n_stages
        self.first, self.last = stage == 0, stage == n_stages - 1
        own = range(stage * per_stage, (stage + 1) * per_stage)
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in own})  # keys keep the names blocks.{i}.*
        self.gradient_checkpointing = False
        if self.first:
            self.tok_embeddings = model.tok_embeddings
            if cfg.positions == "learned":
                self.pos_embeddings = model.pos_embeddings
            self.dropout = model.dropout
        if self.last:
            self.final_norm = model.final_norm
            if not cfg.tie_embeddings:
                self.lm_head = model.lm_head
            elif not self.first:  # its own copy of the tied matrix, same name and values (see module docstring)
                self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
                self.tok_embeddings.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
        self._rope = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.first:
            ids = x
            x = self.tok_embeddings(ids)
            if cfg.positions == "learned":
                x = x + self.pos_embeddings(torch.arange(ids.shape[1], device=ids.device))
            x = self.dropout(x)
        T = x.shape[1]
        rope = None
        if cfg.positions == "rope":
            if self._rope is None or self._rope[0].device != x.device:
                self._rope = rope_tables(cfg, x.device)
            rope = (self._rope[0][:T][None, None].to(x.dtype), self._rope[1][:T][None, None].to(x.dtype))
        positions = torch.arange(T, device=x.device)[None]
        mask = AttentionMask(None, True, T)
        for block in self.blocks.values():
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, positions, mask, use_reentrant=False)
            else:
                x = block(x, rope, None, positions, mask)
        if not self.last:
            return x
        x = self.final_norm(x)
        head = self.lm_head.weight if not cfg.tie_embeddings else self.tok_embeddings.weight
        return F.linear(x, head)


def pipeline_stage_module(model: Transformer, pp_mesh) -> PipelineStageModule:
    """This rank's stage of ``model`` (its pipeline coordinate in ``pp_mesh``)."""
    return PipelineStageModule(model, pp_mesh.get_local_rank(), pp_mesh.size())


def build_schedule(stage_module: PipelineStageModule, pp_mesh, device: str, schedule: str, n_microbatches: int,
                   loss_fn):
    """A GPipe or 1F1B schedule driving this rank's stage; ``loss_fn(logits, targets)`` on the last stage."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage = PipelineStage(stage_module, pp_mesh.get_local_rank(), pp_mesh.size(), torch.device(device),
                          group=pp_mesh.get_group())
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    # scale_grads=False: loss_fn already divides by the micro-batch count (and by gradient accumulation, which the
    # schedule's own scaling would get wrong: it rescales every gradient accumulated so far).
    return kind(stage, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def sum_tied_gradients(stage_module: PipelineStageModule, pp_mesh) -> None:
    """Sum the gradients of the tied embedding's copies on the first and last stages (zeros elsewhere)."""
    cfg = stage_module.config
    if not cfg.tie_embeddings or pp_mesh.size() == 1:
        return
    has_copy = stage_module.first or stage_module.last
    if has_copy:
        w = stage_module.tok_embeddings.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
    else:
        grad = torch.zeros(cfg.vocab_size, cfg.d_model, device=next(stage_module.parameters()).device)
    dist.all_reduce(grad, group=pp_mesh.get_group())
    if has_copy:
        stage_module.tok_embeddings.weight.grad = grad


@torch.no_grad()
def pipeline_forward(stage_module: PipelineStageModule, pp_mesh, x: torch.Tensor) -> torch.Tensor | None:
    """A forward pass through every stage, for evaluation: the logits on the last stage, None elsewhere.

    Plain point-to-point sends, one micro-batch: every stage knows the batch's shape from its own copy of ``x``.
    """
    s, group = pp_mesh.get_local_rank(), pp_mesh.get_group()
    cfg = stage_module.config
    if stage_module.first:
        h = stage_module(x)
    else:
        h = torch.empty(x.shape[0], x.shape[1], cfg.d_model, device=x.device)
        dist.recv(h, src=dist.get_global_rank(group, s - 1), group=group)
        h = stage_module(h)
    if stage_module.last:
        return h
    dist.send(h.float().contiguous(), dst=dist.get_global_rank(group, s + 1), group=group)
    return None
