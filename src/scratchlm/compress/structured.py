"""Structured (width) pruning: remove whole attention heads and MLP channels, for a physically smaller model.

    plan = plan_structured(model.config, stats, heads=0.33, mlp=0.4)   # what to keep, layer by layer
    small = apply_plan(model, plan)                                      # a new Transformer, fewer parameters

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation", section
2.2) ranks each unit by the size of its activations on a small calibration set, removes the least important
ones in every layer, then recovers the quality by distillation from the unpruned model (``compress.distill``):

    head h:       importance = sqrt(mean over tokens of ||y_h||^2),  y_h the head's output (o_proj's input)
    MLP channel i: importance = sqrt(mean over tokens of a_i^2),      a_i = silu(gate_i) * up_i (down_proj's input)

Both are the per-feature root mean squares of a layer's inputs, the same statistic Wanda uses
(``calibration.input_norms``). Under grouped-query attention every key/value head serves a group of query
heads, so heads go by whole groups: a group's importance is the sum of its query heads' importances, and
removing a group drops its key/value head and its query heads together (with plain multi-head attention a
group is one head). The same number of groups and channels goes in every layer, because one ModelConfig
describes all layers; the heads keep their width, so the new config says ``head_dim`` explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError, UnsupportedError
from scratchlm.model import Transformer, build_model

CHANNEL_MULTIPLE = 64


@dataclass
class StructuredPlan:
    """What a structured pruning keeps: for each layer, the key/value groups and the MLP channels (sorted)."""

    config: ModelConfig  # the pruned model's config
    kv_groups: list[list[int]]  # per layer: indices of the kept key/value heads of the original model
    channels: list[list[int]]  # per layer: indices of the kept MLP channels

    def query_heads(self, layer: int, original: ModelConfig) -> list[int]:
        """The original query heads kept in ``layer`` (each group brings its n_heads / n_kv_heads heads)."""
        per_group = original.n_heads // original.n_kv_heads
        return [g * per_group + j for g in self.kv_groups[layer] for j in range(per_group)]


def check_fraction(value: float | None, flag: str) -> float:
    if value is None:
        return 0.0
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag} must be in [0, 1) (the fraction to remove), got {value:g}")
    return value


def head_importance(config: ModelConfig, o_proj_sq: torch.Tensor, tokens: int) -> torch.Tensor:
    """Importance of each key/value group [Hkv] from the sums of squares of o_proj's inputs [H*D]."""
    per_head = (o_proj_sq.float().reshape(config.n_heads, config.head_dim).sum(dim=1) / max(tokens, 1)).sqrt()
    return per_head.reshape(config.n_kv_heads, -1).sum(dim=1)


def plan_structured(config: ModelConfig, stats: Mapping[str, torch.Tensor], tokens: int, heads: float | None = None,
                    mlp: float | None = None) -> StructuredPlan:
    """Choose what to keep in every layer.

    Args:
        stats: layer name -> sum over calibration tokens of the squared inputs of ``blocks.{i}.attn.o_proj``
            and ``blocks.{i}.mlp.down_proj`` (per input feature).
        tokens: the number of calibration tokens the sums are over.
        heads: fraction of the key/value groups (attention heads) to remove, in [0, 1).
        mlp: fraction of the MLP channels to remove, in [0, 1).
    """
    heads, mlp = check_fraction(heads, "--heads"), check_fraction(mlp, "--mlp")
    if heads == 0 and mlp == 0:
        raise ConfigError("structured pruning needs --heads F and/or --mlp F (fractions to remove, e.g. 0.25)")
    if heads and not config.causal:
        raise UnsupportedError("structured pruning of encoders is not supported")
    if heads and config.positions != "rope":
        # GPT-2's files (HF GPT2Config, GGUF gpt2) have no head size of their own: it is always n_embd / n_head.
        raise UnsupportedError("removing heads needs a Llama-style model (its files record the head size); a "
                               "GPT-2-style model can lose MLP channels only: drop --heads")
    n_groups = config.n_kv_heads - round(heads * config.n_kv_heads)
    n_channels = config.d_ff - round(mlp * config.d_ff)
    if mlp and config.d_ff % CHANNEL_MULTIPLE == 0:
        # Keep the width a multiple of 64, as the original was: int4 groups (32, 64, 128) and matrix tiles divide it.
        n_channels = max(CHANNEL_MULTIPLE, CHANNEL_MULTIPLE * round(n_channels / CHANNEL_MULTIPLE))
    if n_groups < 1 or n_channels < 1:
        raise ConfigError(f"nothing would be left: {config.n_kv_heads} key/value head groups and {config.d_ff} MLP "
                          "channels per layer; remove a smaller fraction")
    if heads and n_groups == config.n_kv_heads:
        raise ConfigError(f"--heads {heads:g} removes no head: each layer has {config.n_kv_heads} key/value head "
                          f"group(s) and removal goes by whole groups (one is 1/{config.n_kv_heads})")
    kv_groups, channels = [], []
    for i in range(config.n_layers):
        if n_groups < config.n_kv_heads:
            score = head_importance(config, stats[f"blocks.{i}.attn.o_proj"], tokens)
            kv_groups.append(sorted(torch.topk(score, n_groups).indices.tolist()))
        else:
            kv_groups.append(list(range(config.n_kv_heads)))
        if n_channels < config.d_ff:
            score = stats[f"blocks.{i}.mlp.down_proj"].float()
            channels.append(sorted(torch.topk(score, n_channels).indices.tolist()))
        else:
            channels.append(list(range(config.d_ff)))
    per_group = config.n_heads // config.n_kv_heads
    new_config = config.replace(n_heads=n_groups * per_group, n_kv_heads=n_groups, head_dim=config.head_dim,
                                d_ff=n_channels)
    return StructuredPlan(new_config, kv_groups, channels)


def _rows(units: list[int], width: int) -> torch.Tensor:
    """The row indices of ``units`` when each unit spans ``width`` consecutive rows."""
    return torch.tensor([u * width + j for u in units for j in range(width)], dtype=torch.long)


@torch.no_grad()
def pruned_state_dict(model: Transformer, plan: StructuredPlan) -> dict[str, torch.Tensor]:
    """The canonical state dict of ``model`` with the removed heads' and channels' rows and columns cut out."""
    cfg = model.config
    state = dict(model.canonical_state_dict())
    d = cfg.head_dim
    for i in range(cfg.n_layers):
        a, m = f"blocks.{i}.attn.", f"blocks.{i}.mlp."
        q_rows = _rows(plan.query_heads(i, cfg), d)
        kv_rows = _rows(plan.kv_groups[i], d)
        for name, index, dim in ((a + "q_proj", q_rows, 0), (a + "k_proj", kv_rows, 0), (a + "v_proj", kv_rows, 0),
                                 (a + "o_proj", q_rows, 1)):
            state[name + ".weight"] = state[name + ".weight"].index_select(dim, index).clone()
            if dim == 0 and name + ".bias" in state:
                state[name + ".bias"] = state[name + ".bias"].index_select(0, index).clone()
        keep = torch.tensor(plan.channels[i], dtype=torch.long)
        for proj in ("gate_proj", "up_proj"):
            if m + proj + ".weight" in state:
                state[m + proj + ".weight"] = state[m + proj + ".weight"].index_select(0, keep).clone()
                if m + proj + ".bias" in state:
                    state[m + proj + ".bias"] = state[m + proj + ".bias"].index_select(0, keep).clone()
        state[m + "down_proj.weight"] = state[m + "down_proj.weight"].index_select(1, keep).clone()
    return state


def apply_plan(model: Transformer, plan: StructuredPlan) -> Transformer:
    """A new, smaller Transformer holding the kept heads and channels of ``model`` (which is left unchanged)."""
    return build_model(plan.config, pruned_state_dict(model, plan), source="structured pruning")


@torch.no_grad()
def mask_model(model: Transformer, plan: StructuredPlan) -> None:
    """Zero, in place, the output columns of the heads and channels that ``plan`` removes.

    The masked model computes what the pruned one does (a removed head's or channel's contribution to the
    residual stream passes through those columns): the test of ``apply_plan``, and a way to look at the
    effect of a plan without building the smaller model.
    """
    cfg = model.config
    for i, block in enumerate(model.blocks):
        kept_heads = torch.zeros(cfg.n_heads, dtype=torch.bool)
        kept_heads[plan.query_heads(i, cfg)] = True
        block.attn.o_proj.weight.mul_(kept_heads.repeat_interleave(cfg.head_dim).to(block.attn.o_proj.weight.dtype))
        kept = torch.zeros(cfg.d_ff, dtype=torch.bool)
        kept[plan.channels[i]] = True
        block.mlp.down_proj.weight.mul_(kept.to(block.mlp.down_proj.weight.dtype))
