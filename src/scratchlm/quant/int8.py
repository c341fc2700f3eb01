"""Per-output-channel symmetric 8-bit weights: quantize, dequantize, and a linear layer that uses them.

Row n of a weight matrix W [N, K] keeps one float scale, and every weight becomes an integer in -127..127:

    scale[n] = max_k |W[n, k]| / 127,   q = round(W / scale)        quantize
    W ~ q * scale                                                   dequantize

The rounding error of one weight is at most scale / 2, about 0.4% of the row's largest weight: small
enough that greedy generation usually does not change at all. Storage is 1 byte per weight plus 4 bytes
per row (a quarter of float32, half of bfloat16).

Portable format (files, and other code that wants int8 weights):

    qweight  int8    [N, K]
    scales   float32 [N]

Because the scale belongs to an output row, it can be applied after the product:
``x @ W.T = (x @ q.T) * scale``. That is what PyTorch's ``torch.ops.aten._weight_int8pack_mm`` computes
without materialising float weights; see ``int8_linear`` for the path we pick and why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float matrix [N, K] per output row: returns ``(qweight int8 [N, K], scales float32 [N])``."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=-1) / 127).clamp_(min=torch.finfo(torch.float32).tiny)
    q = w / scales[:, None]
    q.round_().clamp_(-127, 127)  # in place: half the time of the same steps with a new tensor each
    return q.to(torch.int8).contiguous(), scales.contiguous()


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix [N, K] that the int8 tensors stand for."""
    return (qweight.float() * scales[:, None]).to(dtype)


# Measured on a 2-core AMD EPYC (Zen 5), torch 2.13, one thread, SmolLM2 weight shapes (benchmarks/quant_kernels.py):
# one token: _weight_int8pack_mm with bfloat16 activations 15 ms, float32 dense 64 ms, bfloat16 dense 44 ms;
# the same kernel with float32 activations 400 ms (not vectorized). 512 tokens: int8pack 1.35 s, converting
# the int8 weight to bfloat16 and using the dense bfloat16 product 0.83 s. Hence: bfloat16 activations
# always, the fused kernel for a few rows, dequantize-and-multiply for many.
KERNEL_DTYPE = torch.bfloat16
KERNEL_MAX_ROWS = 16


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for int8 ``qweight`` [N, K] and per-row ``scales`` [N]; x is [..., K].

    Computes in bfloat16 and returns x's dtype. Few rows (decoding): PyTorch's fused kernel reads the int8
    weights directly, 1 byte per weight. Many rows (prefill): the product is compute-bound, so the weight
    is converted to bfloat16 for the dense matrix product and the row scales are applied to its output.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
    if x2.shape[0] <= KERNEL_MAX_ROWS:
        # scales already in bfloat16 (Int8Linear keeps a copy): inductor's lowering of this kernel needs a
        # stored tensor there, not a conversion (AssertionError under torch.compile, measured).
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales if scales.dtype == KERNEL_DTYPE
                                               else scales.to(KERNEL_DTYPE))
    else:
        y = F.linear(x2, qweight.to(KERNEL_DTYPE)) * scales.to(KERNEL_DTYPE)
    y = y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored as int8 with one scale per output row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("kernel_scales", scales.to(KERNEL_DTYPE), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear``; computes in ``dtype`` (default: the layer's own)."""
        return cls(*quantize_int8(linear.weight), linear.bias, dtype or linear.weight.dtype)

    def portable(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qweight, self.scales

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (the reference for tests)."""
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return int8_linear(x, self.qweight, self.kernel_scales, self.bias)
        w = dequantize_int8(self.qweight, self.scales, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
