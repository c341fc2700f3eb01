"""The classic transfer-learning controls: which layers train, when, and how fast.

ULMFiT (Howard & Ruder 2018) fine-tunes a pretrained network from the top down, because the lower layers hold
the general features and the upper ones the task-specific ones:

* **freezing** the first N blocks (and the embeddings below them): they never change (``--freeze-layers N``);
* **gradual unfreezing** (section 3.3): train only the top group first, then unfreeze one more block every K
  steps, going down (``--unfreeze-every K``);
* **discriminative learning rates** (section 3.2): each group learns at ``decay`` times the rate of the group
  above it, eta^(l-1) = eta^l / 2.6 in the paper (``--layer-lr-decay 0.38``); the same rule is "layer-wise
  learning-rate decay" in ELECTRA and BEiT.

Layer groups, bottom to top: 0 = the embeddings, 1..n = the n transformer blocks, n + 1 = everything above them
(final norm, LM head, a task head). A parameter's group comes from its name, with or without a wrapper's prefix
(``body.`` of a ``heads.HeadModel``), and LoRA matrices belong to the block they adapt.

    controls = TransferControls(n_layers=30, freeze_layers=10, unfreeze_every=20, layer_lr_decay=0.5)
    train(..., trainable=controls.trainable(names), lr_scale=controls.lr_scale,
          before_step=controls.before_step(model))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from scratchlm.errors import ConfigError

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = ("tok_embeddings.", "pos_embeddings.", "type_embeddings.", "embed_norm.")


def layer_group(name: str, n_layers: int) -> int:
    """The layer group of parameter ``name``: 0 embeddings, 1..n_layers the blocks, n_layers + 1 the top."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    bare = name.removeprefix("body.")
    if bare.startswith(_EMBEDDINGS):
        return 0
    return n_layers + 1


@dataclass(frozen=True)
class TransferControls:
    """Freezing, gradual unfreezing and discriminative learning rates for a model of ``n_layers`` blocks."""

    n_layers: int
    freeze_layers: int = 0  # the first N blocks (and the embeddings) never train
    unfreeze_every: int | None = None  # gradual unfreezing: one more block (from the top) every K steps
    layer_lr_decay: float = 1.0  # each group's rate is this times the rate of the group above

    def __post_init__(self) -> None:
        if not 0 <= self.freeze_layers <= self.n_layers:
            raise ConfigError(f"--freeze-layers must be between 0 and the model's {self.n_layers} blocks, "
                              f"got {self.freeze_layers}")
        if self.unfreeze_every is not None and self.unfreeze_every < 1:
            raise ConfigError(f"--unfreeze-every must be a positive number of steps, got {self.unfreeze_every}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"--layer-lr-decay must be in (0, 1] (1: one rate for every layer; ULMFiT uses "
                              f"1/2.6 = 0.38), got {self.layer_lr_decay}")

    @property
    def active(self) -> bool:
        return bool(self.freeze_layers or self.unfreeze_every or self.layer_lr_decay != 1.0)

    def group(self, name: str) -> int:
        return layer_group(name, self.n_layers)

    def trainable(self, names: Iterable[str]) -> list[str]:
        """The names among ``names`` that may ever train: not in the frozen embeddings or first blocks."""
        lowest = self.freeze_layers + 1 if self.freeze_layers else 0
        return [n for n in names if self.group(n) >= lowest]

    def lr_scale(self, name: str) -> float:
        """``layer_lr_decay ** (distance from the top group)``: 1 for the top group."""
        return self.layer_lr_decay ** (self.n_layers + 1 - self.group(name))

    def lowest_unfrozen(self, step: int) -> int:
        """The lowest group that trains at ``step`` (0-based) under gradual unfreezing: the top group alone for
        the first ``unfreeze_every`` steps, then one block more each ``unfreeze_every`` steps."""
        floor = self.freeze_layers + 1 if self.freeze_layers else 0
        if self.unfreeze_every is None:
            return floor
        return max(floor, self.n_layers + 1 - step // self.unfreeze_every)

    def before_step(self, model: nn.Module, trainable: Iterable[str]) -> Callable[[int], None] | None:
        """For ``train(before_step=...)``: sets ``requires_grad`` of the ``trainable`` parameters for each step
        (None when there is no gradual unfreezing). A parameter without a gradient is not updated, so the blocks
        still frozen stay bit for bit as they were, and their optimizer state starts when they thaw."""
        if self.unfreeze_every is None:
            return None
        params = dict(model.named_parameters())
        chosen = [(params[n], self.group(n)) for n in trainable]

        def before_step(step: int) -> None:
            lowest = self.lowest_unfrozen(step)
            for p, group in chosen:
                p.requires_grad_(group >= lowest)

        return before_step

    def describe(self) -> str:
        parts = []
        if self.freeze_layers:
            parts.append(f"embeddings and blocks 0-{self.freeze_layers - 1} frozen")
        if self.unfreeze_every:
            parts.append(f"gradual unfreezing: the top first, one more block every {self.unfreeze_every} steps")
        if self.layer_lr_decay != 1.0:
            parts.append(f"learning rate x{self.layer_lr_decay:g} per layer group going down (embeddings at "
                         f"x{self.layer_lr_decay ** (self.n_layers + 1):.2g})")
        return "; ".join(parts)
