"""LoRA: train a low-rank update beside each chosen linear layer, leave the base weights frozen.

Hu et al. 2021 (LoRA, section 4.1): a frozen weight W [out, in] gets a trainable update
delta W = (alpha / r) * B @ A, with A [r, in] and B [out, r], so a layer computes

    y = x @ W.T  +  (alpha / r) * dropout(x) @ A.T @ B.T

A starts random and B at zero, so the update is zero at step 0: the adapted model *is* the base model
until the first optimizer step. Only A and B train (r * (in + out) numbers per layer instead of
in * out), which is why LoRA needs no gradients or optimizer state for the base weights.

    apply_lora(model, LoraSettings(rank=8, alpha=16, targets=("q", "v")))   # swaps layers in place
    lora_parameter_names(model)      # what the optimizer trains
    merge_lora(model)                # folds B @ A into W and swaps plain layers back

Target names are short (``q, k, v, o, gate, up, down``) and map to the canonical module names of
``model.py`` (``blocks.{i}.attn.q_proj`` ...). The base layer may be an ``nn.Linear`` or QLoRA's frozen
4-bit ``NF4Linear`` (``finetune/nf4.py``): LoRA only needs ``base(x)`` and the layer's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scratchlm.errors import ConfigError

# short target name -> attribute path inside a Block
TARGETS: dict[str, str] = {
    "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# PEFT and HF call the same layers by their module names; accept those too.
ALIASES: dict[str, str] = {path.split(".")[1]: short for short, path in TARGETS.items()}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scaling, dropout and target layers of a LoRA adapter.

    ``use_rslora`` scales by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023), as PEFT's option of
    the same name does; it is here so that adapters made with it load correctly.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_targets(targets: str | Sequence[str], mlp: str = "swiglu") -> tuple[str, ...]:
    """Short target names from ``"q,k,v"`` or a list; HF module names (``q_proj``) are accepted too.

    Raises a ConfigError that lists the valid names when one is unknown (``gate`` exists with SwiGLU only).
    """
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    names = [n for n in names if n]
    valid = [t for t in TARGETS if mlp == "swiglu" or t != "gate"]
    out = []
    for name in names:
        short = ALIASES.get(name, name)
        if short not in valid:
            raise ConfigError(f"unknown LoRA target {name!r}; valid targets for this model: {', '.join(valid)} "
                              f"(or their module names {', '.join(TARGETS[t].split('.')[1] for t in valid)})")
        if short not in out:
            out.append(short)
    if not out:
        raise ConfigError(f"no LoRA targets given; choose some of: {', '.join(valid)}")
    return tuple(out)


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update (``base``, ``lora_A``, ``lora_B``).

    ``lora_A`` and ``lora_B`` are bias-free ``nn.Linear`` layers, so their weights are A [r, in] and
    B [out, r], the shapes and names PEFT uses.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        weight = base_weight_like(base)
        kw = dict(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def reset_lora(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform, as PEFT does); B = 0 (LoRA paper, 4.1)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling multiplies the small [.., r] activation rather than the [.., out] one, and the update is
        # added into the base output in place (no op saves that output): two fewer full-size temporaries per
        # layer, which is most of LoRA's activation memory beyond what the base model itself needs.
        if self.scaling == 0:  # switched off (align.run.adapters_disabled: the reference model): the base alone
            return self.base(x)
        update = self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)
        return self.base(x).add_(update)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B @ A [out, in] that merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def base_weight_like(base: nn.Module) -> torch.Tensor:
    """A tensor on the base layer's device and in its compute dtype (an NF4 layer stores bytes)."""
    if isinstance(base, nn.Linear):
        return base.weight
    return torch.empty(0, dtype=getattr(base, "compute_dtype", torch.float32), device=next(base.buffers()).device)


def target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Canonical module name -> module for every block's chosen layers (``blocks.3.attn.q_proj``)."""
    out = {}
    for i, block in enumerate(model.blocks):
        for short in targets:
            path = TARGETS[short]
            module = block.get_submodule(path)
            out[f"blocks.{i}.{path}"] = module
    return out


def apply_lora(model: nn.Module, settings: LoraSettings, seed: int | None = None) -> dict[str, LoRALinear]:
    """Wrap every target layer of ``model`` in a ``LoRALinear`` (in place) and freeze everything else.

    ``seed`` fixes the random A matrices. Returns the new layers by canonical module name.
    """
    targets = parse_targets(settings.targets, model.config.mlp)
    for p in model.parameters():
        p.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    layers = {}
    try:
        for name, module in target_modules(model, targets).items():
            if isinstance(module, LoRALinear):
                raise ConfigError(f"{name} already has a LoRA adapter; merge it first (merge_lora)")
            layer = LoRALinear(module, settings.rank, settings.alpha, settings.dropout, settings.use_rslora)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer)
            layers[name] = layer
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names of the A and B weights: what LoRA trains."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under canonical names (``blocks.0.attn.q_proj.lora_A.weight``)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += (alpha / r) B @ A) and put plain layers back.

    The merged model computes the same function with no extra cost per token. A 4-bit base cannot
    hold the sum exactly: it is dequantized to a float ``nn.Linear`` first.
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        if not isinstance(base, nn.Linear):
            base = base.to_linear()  # NF4Linear -> float nn.Linear
        base.weight += layer.delta_weight().to(base.weight.dtype)
        base.weight.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, base)
    return model
