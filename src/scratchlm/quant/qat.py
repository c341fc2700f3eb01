"""Quantization-aware training (QAT): train through the weights the quantized model will really hold.

Post-training quantization rounds weights the training never saw rounded. QAT (Jacob et al. 2018, section 3;
torchao's "fake quantization") computes the forward with each weight replaced by its quantized value
(``q * scale + min``, computed in float), so the loss, and the optimizer, see the rounding:

    forward:  y = x @ Q(W).T            backward:  dL/dW := dL/dQ(W)   (straight-through, Bengio et al. 2013)

The float ("latent") weights W keep training in full precision underneath; rounding has zero gradient almost
everywhere, so the straight-through estimator passes the gradient of Q(W) to W unchanged.

Q is *exactly* what ``quantize_model(model, "int4", group_size)`` (and ``scratchlm quantize --to int4``) does:
round to nearest with ``quantize_int4``'s grid for the linear layers, int8 per row for the token embedding and
the LM head, and the same bfloat16 rounding of scales that the int4 layer's kernel applies. So the saved model
(the latent weights) becomes, under that command, exactly the weights it was trained with: no second rounding.

    prepare_qat(model, group_size=32)       # in place: layers compute with fake-quantized weights
    ...train...                             # save model.canonical_state_dict() as usual (the latent weights)

With LoRA (``finetune.lora``) the quantity that is quantized is the merged weight ``W + (alpha/r) B A``, the
weight ``scratchlm merge`` writes, so merge-then-quantize gives the trained forward too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.finetune.lora import LoRALinear
from scratchlm.quant.int4 import check_group_size, dequantize_int4, quantize_int4, stored_grid
from scratchlm.quant.int8 import dequantize_int8, quantize_int8

MODES = ("int4",)


def fake_quantize_int4(weight: torch.Tensor, group_size: int | str) -> torch.Tensor:
    """The float weight [N, K] that ``Int4Linear.from_linear`` of ``weight`` computes with (no gradient)."""
    n, k = weight.shape
    qweight, scales, mins = quantize_int4(weight, group_size)
    scales, mins = stored_grid(scales, mins, n, k, weight.device)
    return dequantize_int4(qweight, scales, mins, group_size, weight.dtype)


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """The float weight [N, K] that the int8 embedding (and the int8 LM head) of ``weight`` holds."""
    return dequantize_int8(*quantize_int8(weight), weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: its gradient goes to the latent weight unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward, with ``weight``'s gradient path (when one is being recorded)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return _StraightThrough.apply(weight, quantized)
    return quantized


class _FakeQuantized:
    """Mixin for a layer with a ``weight``: ``quantized_weight()`` is its fake-quantized value, recomputed only
    when the weight changed (an optimizer's in-place update bumps the tensor's version counter)."""

    qat_bits: int
    qat_group_size: int | str | None

    def fake_quant(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.qat_bits == 8:
                return fake_quantize_int8(weight)
            return fake_quantize_int4(weight, self.qat_group_size)

    def quantized_weight(self) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr())
        cache = getattr(self, "_qat_cache", None)
        if cache is None or cache[0] != key:
            self._qat_cache = cache = (key, self.fake_quant(self.weight.detach()))
        return straight_through(self.weight, cache[1])


class QATLinear(_FakeQuantized, nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight; same parameters, same names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.qat_group_size}" if self.qat_bits == 4 else ""
        return f"{super().extra_repr()}, fake-quantized int{self.qat_bits}{group}"


class QATEmbedding(_FakeQuantized, nn.Embedding):
    """``nn.Embedding`` whose rows are fake-quantized to int8 (``quantize_model`` stores the table in int8)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.quantized_weight(), self.padding_idx)


class QATLoRALinear(_FakeQuantized, LoRALinear):
    """A LoRA layer whose forward uses the fake-quantized merged weight ``W + (alpha/r) B A``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same sum, in the same order, as merge_lora: merging then quantizing gives this very weight
        merged = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        return F.linear(x, straight_through(merged, self.fake_quant(merged.detach())), self.base.bias)


def _swap(module: nn.Module, cls: type, bits: int, group_size: int | str | None) -> nn.Module:
    """``module`` turned into ``cls`` in place: its parameters (and whatever shares them) stay the same objects."""
    module.__class__ = cls
    module.qat_bits, module.qat_group_size = bits, group_size
    return module


def prepare_qat(model: nn.Module, mode: str = "int4", group_size: int | str = 32) -> nn.Module:
    """Make ``model`` (float) compute with the weights ``quantize_model(model, mode, group_size)`` would give.

    In place: each linear layer of the blocks trains through int4 fake quantization, the token embedding and
    the LM head through int8; a LoRA layer (``finetune.lora.LoRALinear``) quantizes its merged weight. The
    parameters, their names and their sharing (tied embeddings) do not change. Returns the model.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown QAT mode {mode!r}; choose one of {', '.join(MODES)}")
    lora = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(name.startswith(f"{p}.") for p in lora)]
    for name, m in linears:
        if name != "lm_head":
            check_group_size(group_size, m.in_features, name)
    for name in lora:
        check_group_size(group_size, model.get_submodule(name).in_features, name)
        layer = model.get_submodule(name)
        if not isinstance(layer.dropout, nn.Identity):
            raise ConfigError("QAT quantizes the merged LoRA weight, which leaves no place for LoRA dropout: "
                              "use --dropout 0 with --qat")
        _swap(layer, QATLoRALinear, 4, group_size)
    for name, m in linears:
        if type(m) is nn.Linear:
            _swap(m, QATLinear, 8 if name == "lm_head" else 4, group_size)
    emb = getattr(model, "tok_embeddings", None)
    if type(emb) is nn.Embedding:
        _swap(emb, QATEmbedding, 8, None)
    model.qat = {"mode": mode, "group_size": group_size}
    return model
