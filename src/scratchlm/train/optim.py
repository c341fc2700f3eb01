"""The optimizer and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) by default, or SGD with (Nesterov-free) momentum, RMSprop or Adafactor
(Shazeer & Stern 2018: factored second moments, the memory-light choice of T5), all of them torch's own
implementations. Weight decay applies to matrices only: decaying norm gains and biases pulls them towards zero
for no benefit (nanoGPT, GPT-3 paper appendix B). The learning rate warms up linearly, then follows a cosine
down to ``min_lr`` (Loshchilov & Hutter 2017, SGDR; as in nanoGPT). Parameters may train at different rates:
``lr_scale(name)`` puts each in a group whose ``lr_scale`` multiplies the schedule's rate (discriminative
fine-tuning, ``finetune/freeze.py``).

Optimizer state is saved as plain tensors named ``<parameter name>::<state key>`` (safetensors), never
pickled, and loaded back by parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from scratchlm.errors import ConfigError, TrainingError

OPTIMIZERS = ("adamw", "sgd", "rmsprop", "adafactor")


def make_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                   betas: tuple[float, float], fused: bool | None = None, name: str = "adamw",
                   momentum: float = 0.9, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` over the given parameters: weight decay on tensors of 2+ dimensions only.

    Args:
        named_params: (name, parameter) pairs to train; frozen ones (requires_grad False) are skipped.
        fused: use PyTorch's fused AdamW kernel (one kernel for all parameters); None picks it when
            every parameter is on a device that supports it (CPU and CUDA do in torch >= 2.4).
        name: adamw (``betas``), sgd or rmsprop (``momentum``), adafactor (its own decay schedule; ``betas``
            and ``momentum`` do not apply).
        lr_scale: each parameter's multiple of the learning rate (by name); parameters with the same multiple
            share a group, whose ``lr_scale`` the training loop applies at every step.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if not params:
        raise TrainingError("no trainable parameters: at least one parameter must have requires_grad=True")
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for n, p in params:
        scale = 1.0 if lr_scale is None else float(lr_scale(n))
        groups.setdefault((scale, p.dim() >= 2), []).append(p)
    param_groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
                     "lr": lr * scale} for (scale, decay), ps in groups.items()]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum)
    if name == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=lr, momentum=momentum)
    if name == "adafactor":
        return torch.optim.Adafactor(param_groups, lr=lr)
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for _, p in params)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


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
