"""Unstructured and semi-structured (N:M) pruning: zero the least important weights of every linear layer.

    report = prune_model(llm.model, "wanda", sparsity=0.5, input_norms=norms)   # zeros in place
    report = prune_model(llm.model, "magnitude", structure=(2, 4))             # 2 of every 4 kept

Which weights go is decided by a score per weight, compared within each output row of each layer (Sun et al.
2023, "A Simple and Effective Pruning Approach for Large Language Models", section 3: comparing per output
keeps every output neuron alive and is what makes Wanda work on LLMs):

    magnitude:  S_ij = |W_ij|                                 (Han et al. 2015)
    wanda:      S_ij = |W_ij| * ||X_j||_2                    (Wanda, eq. 1: weights times input activation norms)

``W`` is [out, in]; ``||X_j||_2`` is the norm of input feature j over every calibration token, so a small
weight on a feature with large activations (LLMs have a few such outlier features) survives. N:M keeps the
N highest scores in every group of M consecutive inputs of a row (NVIDIA's 2:4 sparse tensor cores run it at
twice the speed on GPUs; on a CPU, and in our files, the zeros are stored as zeros: the model keeps its size).

The layers pruned are the linear layers of the transformer blocks (attention q/k/v/o, MLP gate/up/down); the
token embedding and the LM head stay dense, as in Wanda and SparseGPT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from scratchlm.errors import ConfigError

METHODS = ("magnitude", "wanda")


@dataclass
class LayerReport:
    """One pruned layer: its name, shape and the share of its weights that are zero afterwards."""

    name: str
    shape: tuple[int, int]
    sparsity: float

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "sparsity": self.sparsity}


def parse_structure(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): keep N of every M weights; None stays None."""
    if text is None:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--structure must look like N:M (for example 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"--structure N:M needs 0 < N < M, got {text!r}")
    return n, m


def check_sparsity(sparsity: float | None, structure: tuple[int, int] | None) -> float:
    """The fraction of weights to remove: ``sparsity`` in [0, 1), or 1 - N/M for an N:M structure."""
    if structure is not None:
        implied = 1 - structure[0] / structure[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ConfigError(f"--structure {structure[0]}:{structure[1]} removes {implied:g} of the weights; "
                              f"drop --sparsity {sparsity:g} or give --sparsity {implied:g}")
        return implied
    if sparsity is None:
        raise ConfigError("give --sparsity (the fraction of weights to remove, for example 0.5) or --structure 2:4")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1) (the fraction of weights to remove), got {sparsity:g}")
    return sparsity


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of the transformer blocks, by name (``blocks.0.attn.q_proj``, ...)."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.startswith("blocks.")}
    if not layers:
        raise ConfigError("the model has no float linear layers to prune (a quantized model? load it dense)")
    return layers


def weight_scores(weight: torch.Tensor, method: str, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The importance of each weight [out, in]: |W| for magnitude, |W| * ||X_j|| for Wanda."""
    score = weight.detach().abs().float()
    if method == "wanda":
        if input_norm is None:
            raise ConfigError("Wanda needs the input activation norms of every layer (calibration text)")
        score = score * input_norm.float().to(score.device)[None, :]
    elif method != "magnitude":
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    return score


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A boolean mask [out, in] that keeps the ``1 - sparsity`` highest scores of every row (True = kept)."""
    n_in = score.shape[1]
    n_pruned = int(n_in * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if n_pruned:
        # Ties (equal scores) are broken by position, so the count per row is exact.
        lowest = torch.topk(score, n_pruned, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, lowest, False)
    return mask


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A boolean mask [out, in] that keeps the N highest scores in every group of M consecutive inputs."""
    out_features, in_features = score.shape
    if in_features % m:
        raise ConfigError(f"an {n}:{m} structure needs the input width to be a multiple of {m}; a layer has "
                          f"{in_features} inputs")
    groups = score.reshape(out_features, in_features // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(out_features, in_features)


@torch.no_grad()
def prune_layer(layer: nn.Linear, method: str, sparsity: float, structure: tuple[int, int] | None = None,
                input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the pruned weights of ``layer`` in place; returns the mask (True = kept)."""
    score = weight_scores(layer.weight, method, input_norm)
    mask = n_m_mask(score, *structure) if structure is not None else row_mask(score, sparsity)
    layer.weight.mul_(mask.to(layer.weight.dtype))
    return mask


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float | None = None,
                structure: tuple[int, int] | None = None,
                input_norms: Mapping[str, torch.Tensor] | None = None) -> list[LayerReport]:
    """Prune every block linear layer of ``model`` in place; returns one report per layer.

    Args:
        method: "magnitude" or "wanda".
        sparsity: fraction of each row's weights to zero, in [0, 1) (implied by ``structure`` when given).
        structure: (N, M) to keep N of every M consecutive weights instead (2:4).
        input_norms: Wanda only: layer name -> ||X_j||_2 per input feature ([in]), from calibration text
            (``wanda_input_norms``).
    """
    sparsity = check_sparsity(sparsity, structure)
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    report = []
    for name, layer in prunable_layers(model).items():
        norm = input_norms.get(name) if input_norms is not None else None
        if method == "wanda" and norm is None:
            raise ConfigError(f"no calibration statistics for layer {name}: compute them for this model")
        prune_layer(layer, method, sparsity, structure, norm)
        zeros = (layer.weight == 0).sum().item()
        report.append(LayerReport(name, tuple(layer.weight.shape), zeros / layer.weight.numel()))
    return report


def overall_sparsity(report: list[LayerReport]) -> float:
    """The share of zero weights over all the pruned layers together."""
    total = sum(r.shape[0] * r.shape[1] for r in report)
    return sum(r.sparsity * r.shape[0] * r.shape[1] for r in report) / max(total, 1)


# ---- calibration statistics ---------------------------------------------------------------------------
@torch.no_grad()
def input_square_sums(model: nn.Module, tokens: torch.Tensor, names: tuple[str, ...] | None = None,
                      after_block=None, progress: bool = False, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per-feature sums of squares of the inputs of each block linear layer over the calibration ``tokens``.

    One block at a time (``quant.calibration``): the hidden states entering block i are captured once, the
    statistics of its layers are taken on them, ``after_block(i, block, sums)`` may then change the block
    (Wanda prunes it), and the states are passed through the block as it now is to become block i+1's inputs.

    Args:
        names: the layers inside each block (``"attn.o_proj"``, ...); None: every linear layer.
    Returns:
        ``{"blocks.{i}.attn.q_proj": sum over tokens of x_j^2 [in_features], ...}`` in float32.
    """
    from scratchlm.progress import bar
    from scratchlm.quant.calibration import block_inputs, block_linears, capture_inputs, run_block

    states = block_inputs(model, tokens, batch_size)
    sums: dict[str, torch.Tensor] = {}
    for i, block in enumerate(bar(model.blocks, "calibrating", progress, unit="layer")):
        layer_names = [n for group in block_linears(block) for n in group if names is None or n in names]
        local: dict[str, torch.Tensor] = {}

        def accumulate(name: str, x: torch.Tensor, local=local) -> None:
            square = x.float().pow(2).flatten(0, -2).sum(dim=0)
            local[name] = local[name] + square if name in local else square

        with capture_inputs(block, layer_names, accumulate):
            next_states = run_block(block, states)
        for name, value in local.items():
            sums[f"blocks.{i}.{name}"] = value
        if after_block is not None:
            after_block(i, block, {name: value for name, value in local.items()})
            next_states = run_block(block, states)  # the next block sees this one as changed
        states = next_states
    return sums


@torch.no_grad()
def wanda_prune(model: nn.Module, tokens: torch.Tensor, sparsity: float | None = None,
                structure: tuple[int, int] | None = None, progress: bool = False) -> list[LayerReport]:
    """Wanda, block by block as in the paper's code: each block's input norms are measured on the outputs of
    the blocks before it, already pruned. Returns the per-layer report."""
    sparsity = check_sparsity(sparsity, structure)
    report: list[LayerReport] = []

    def prune_block(i: int, block: nn.Module, sums: dict[str, torch.Tensor]) -> None:
        for name, square in sums.items():
            layer = block.get_submodule(name)
            prune_layer(layer, "wanda", sparsity, structure, square.sqrt())
            zeros = (layer.weight == 0).sum().item()
            report.append(LayerReport(f"blocks.{i}.{name}", tuple(layer.weight.shape), zeros / layer.weight.numel()))

    input_square_sums(model, tokens, after_block=prune_block, progress=progress)
    return report
