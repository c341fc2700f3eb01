"""The optimizer and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only: decaying norm gains and biases
pulls them towards zero for no benefit (nanoGPT, GPT-3 paper appendix B). The learning rate warms up
linearly, then follows a cosine down to ``min_lr`` (Loshchilov & Hutter 2017, SGDR; as in nanoGPT).

Optimizer state is saved as plain tensors named ``<parameter name>::<state key>`` (safetensors), never
pickled, and loaded back by parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from scratchlm.errors import TrainingError


def make_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                   betas: tuple[float, float], fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the given parameters: weight decay on tensors of 2+ dimensions only.

    Args:
        named_params: (name, parameter) pairs to train; frozen ones (requires_grad False) are skipped.
        fused: use PyTorch's fused AdamW kernel (one kernel for all parameters); None picks it when
            every parameter is on a device that supports it (CPU and CUDA do in torch >= 2.4).
    """
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters: at least one parameter must have requires_grad=True")
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for _, p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, cosine decay, then ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def _param_names(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> list[str]:
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in names:
                raise TrainingError("the optimizer holds a parameter that is not part of the model")
            out.append(names[p])
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """The optimizer state as flat tensors ``{"<param name>::<key>": tensor}`` (step counts included)."""
    order = _param_names(optimizer, names)
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{order[index]}::{key}"] = value.detach().cpu().contiguous()
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[nn.Parameter, str],
                           tensors: dict[str, torch.Tensor]) -> None:
    """Restore state written by ``optimizer_tensors`` into an optimizer over the same parameters."""
    order = _param_names(optimizer, names)
    index_of = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat_key, value in tensors.items():
        name, _, key = flat_key.rpartition("::")
        if name not in index_of:
            raise TrainingError(f"the saved optimizer state has an entry for {name!r}, which is not trained now; "
                                "resume with the same model and trainable parameters")
        state.setdefault(index_of[name], {})[key] = value
    saved = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
