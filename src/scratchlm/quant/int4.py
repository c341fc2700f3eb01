"""Group-wise asymmetric 4-bit weights: quantize, dequantize, and a linear layer that uses them.

Each row of a weight matrix W [N, K] is cut into groups of ``group_size`` consecutive input columns. A group
keeps its own minimum and step (as llama.cpp's Q4_1 does), and every weight becomes one of 16 levels:

    q = round((w - min) / scale)  in 0..15,   scale = (max - min) / 15        quantize
    w ~ q * scale + min                                                      dequantize

so the error of one weight is at most scale / 2. At 4 bits plus two float32 numbers per group of 64 the
matrix takes 0.625 bytes per weight instead of 4.

The *portable* format is what files hold and what other code (QLoRA's frozen base, exporters) may reuse:

    qweight  uint8   [N, K/2]      two 4-bit codes per byte: column 2j in the low nibble, 2j+1 in the high one
    scales   float32 [N, K/group]
    mins     float32 [N, K/group]

For speed, ``Int4Linear`` repacks it once into the layout of PyTorch's CPU kernel
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (a matrix product that unpacks the codes on the fly, so the
float weights never exist in memory). That kernel computes ``(q - 8) * scale + zero`` per group, so its
``zero`` is our ``min + 8 * scale``. Where the kernel is missing, the layer dequantizes and calls
``F.linear`` (correct, slower, and said once).

``group_size="channel"`` keeps one step and minimum per output row (``scales``/``mins`` [N, 1]); the kernel
then gets that row's pair repeated for every 32 columns, which is the same matrix, exactly. ``bits=3``
(``quantize_int4(..., bits=3)``, GPTQ) uses the codes 0..7 of the same container: the file format and the
kernel do not change, only the grid is coarser (3-bit weights take 4 bits of storage here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError
from scratchlm.quant.int4_pack import dequantize_packed_t, kernel_layout, pack_kernel_codes
from scratchlm.quant.kernels import int4_kernel_available, kernel_fits

GROUP_SIZES = (32, 64, 128)
CHANNEL = "channel"  # one step and minimum per output row
BITS = (4, 3)
KERNEL_GROUP = 32  # the kernel's group for a per-channel layer (its pair repeated): any K the kernel packs


def group_width(group_size: int | str, in_features: int) -> int:
    """Input columns per group: ``group_size``, or every column for ``"channel"``."""
    return in_features if group_size == CHANNEL else group_size


def check_group_size(group_size: int | str, in_features: int | None = None, name: str = "weight") -> None:
    """Raise a ConfigError unless ``group_size`` is allowed and divides ``in_features``."""
    if group_size == CHANNEL:
        return
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"unsupported int4 group size {group_size}; choose one of "
                          f"{', '.join(map(str, GROUP_SIZES))} or {CHANNEL}")
    if in_features is not None and in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"choose {' or '.join(map(str, fits))}" if fits else "this layer cannot be quantized to int4"
        raise ConfigError(f"int4 group size {group_size} does not divide the {in_features} input features of "
                          f"{name}: {hint}")


def fit_grid(w: torch.Tensor, bits: int = 4, refine_steps: int = 6
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid of each group of ``w`` [..., group]: ``(scales, mins, codes)``, codes in 0..2**bits - 1.

    The grid starts at each group's [min, max] and is then refined (``refine_steps`` rounds): with the codes
    fixed, the least-squares line ``w ~ q * scale + min`` through the group gives a better scale and minimum,
    and the codes are rounded again; each group keeps the grid with the smallest squared error.
    """
    top = 2**bits - 1
    w = w.detach().float()
    tiny = torch.finfo(torch.float32).tiny
    lo = w.amin(dim=-1)
    scales = ((w.amax(dim=-1) - lo) / top).clamp(min=tiny)  # a constant group: any step works (q = 0)

    def sq_error(q: torch.Tensor, scales: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return (q * scales[..., None] + lo[..., None] - w).square().sum(dim=-1)

    q = round_to_grid(w, scales[..., None], lo[..., None], bits)
    best = sq_error(q, scales, lo)
    for _ in range(refine_steps):
        q_mean, w_mean = q.mean(dim=-1), w.mean(dim=-1)
        var = (q - q_mean[..., None]).square().mean(dim=-1)
        cov = ((q - q_mean[..., None]) * (w - w_mean[..., None])).mean(dim=-1)
        new_scales = torch.where(var > 0, cov / var.clamp(min=tiny), scales).clamp(min=tiny)
        new_lo = torch.where(var > 0, w_mean - new_scales * q_mean, lo)
        new_q = round_to_grid(w, new_scales[..., None], new_lo[..., None], bits)
        err = sq_error(new_q, new_scales, new_lo)
        better = err < best
        scales, lo = torch.where(better, new_scales, scales), torch.where(better, new_lo, lo)
        best = torch.minimum(err, best)
        q = torch.where(better[..., None], new_q, q)
    return scales, lo, q


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The nearest codes (as floats, 0..2**bits - 1) of ``w`` on the grid ``q * scale + min`` (broadcast)."""
    return torch.round((w - mins) / scales).clamp(0, 2**bits - 1)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> the packed uint8 [N, K/2] of the portable format."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def quantize_int4(weight: torch.Tensor, group_size: int | str = 64, refine_steps: int = 6, bits: int = 4,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float matrix [N, K] to 4-bit codes: returns ``(qweight, scales, mins)`` (portable format).

    Round to nearest on a per-group grid (``fit_grid``): an outlier no longer stretches the grid for the
    other 31-127 weights, and weights that were already on a 4-bit grid land back on it. Measured on
    SmolLM2's Q4_1 weights requantized in groups of 64 (1,024 held-out tokens): perplexity 121 with min/max
    alone, 112 refined, against 74 in float32. ``group_size`` may be ``"channel"`` (scales [N, 1]);
    ``bits=3`` uses codes 0..7.
    """
    n, k = weight.shape
    check_group_size(group_size, k)
    if bits not in BITS:
        raise ConfigError(f"unsupported bit width {bits}; choose one of {', '.join(map(str, BITS))}")
    g = group_width(group_size, k)
    scales, lo, q = fit_grid(weight.reshape(n, k // g, g), bits, refine_steps)
    return pack_codes(q.reshape(n, k)), scales.contiguous(), lo.contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes [N, K] (uint8 values 0..15) of a packed [N, K/2] matrix."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix [N, K] that the portable int4 tensors stand for: ``q * scale + min`` per group."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    g = group_width(group_size, k)
    w = q.reshape(n, k // g, g) * scales[..., None] + mins[..., None]
    return w.reshape(n, k).to(dtype)


# The kernel's float32 path is not vectorized: over SmolLM2's shapes, one token takes 10 ms with bfloat16
# activations and 600-1100 ms with float32 ones (2-core AMD EPYC, torch 2.13). So it always gets bfloat16.
KERNEL_DTYPE = torch.bfloat16


# Rows from which int4_linear dequantizes into bfloat16 instead of calling the kernel. Per layer in isolation
# (benchmarks/int4_prefill.py, quiet machine, 2026-12-02 07:40) the two are level at about 128 rows; inside
# a server engine its 128-token prefill steps (133 rows) ran 10% slower dequantizing, and one such step alone 10%
# faster (three alternated rounds each, RESULTS.md): within the machine's noise, so the threshold stays 256.
PREFILL_MIN_ROWS = 256


def pack_for_kernel(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    dtype: torch.dtype = KERNEL_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable tensors -> (packed weight, scales-and-zeros [K/group, N, 2]) for the PyTorch CPU kernel."""
    packed = pack_kernel_codes(unpack_int4(qweight))  # PyTorch's layout, without its int32 copy of the codes
    zeros = mins + 8 * scales  # the kernel's dequantization is (q - 8) * scale + zero
    scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(dtype)
    return packed, scales_and_zeros


def kernel_grid(scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's ``scales_and_zeros`` [G, N, 2] -> portable float32 ``(scales, mins)`` [N, G]."""
    sz = scales_and_zeros.float()
    scales, zeros = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
    return scales, zeros - 8 * scales


def stored_grid(scales: torch.Tensor, mins: torch.Tensor, out_features: int, in_features: int,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(scales, mins)`` that an ``Int4Linear`` built from these computes with: the kernel keeps the step
    and ``min + 8 * step`` in bfloat16, so where it is used they are rounded exactly as ``pack_for_kernel``
    and ``portable`` round them; the fallback keeps them as they are. (Quantization-aware training uses this
    to train with the very weights the quantized layer will hold.)"""
    device = torch.device(device)
    if not (device.type == "cpu" and kernel_fits(out_features, in_features) and int4_kernel_available()):
        return scales, mins
    zeros = mins + 8 * scales
    return kernel_grid(torch.stack([scales.t(), zeros.t()], dim=-1).to(KERNEL_DTYPE))


# PyTorch runs an elementwise operation on several threads from this many elements on (at::internal::GRAIN_SIZE).
GRAIN_SIZE = 32768
SERIAL_CAST_MAX = 4 * GRAIN_SIZE


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` for the small activations around the int4 kernel, on the calling thread.

    A conversion of more than ``GRAIN_SIZE`` elements opens an OpenMP region, and waking the other threads costs
    more than converting a decode step's [16, 3072] product (SmolLM2's gate and up for 16 rows): in a 16-row step
    on 2 threads that one conversion per layer took 15% of the time (profile on a busy 2-core machine), the
    conversions under the grain well under 1%. Up to ``SERIAL_CAST_MAX`` elements it is done in row blocks under
    the grain instead: the same elementwise conversion, so the result is identical. SmolLM2 int4, 16-row step,
    2 threads, alternating 6 rounds at load 12: 0.86x the wall time and 0.84x the CPU time, same logits."""
    n = t.numel()
    if t.dtype == dtype or n <= GRAIN_SIZE or n > SERIAL_CAST_MAX or t.dim() < 2 or torch.compiler.is_compiling():
        return t.to(dtype)
    rows = t.reshape(-1, t.shape[-1])
    out = torch.empty(rows.shape, dtype=dtype, device=t.device)
    step = max(1, GRAIN_SIZE // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i: i + step].copy_(rows[i: i + step])
    return out.reshape(t.shape)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W in the kernel's packed int4 layout; x is [..., K], any float dtype.

    Computes in the dtype of ``scales_and_zeros`` (bfloat16 for speed) and returns x's dtype. Few rows
    (decoding): the int4 kernel, which reads 4 bits per weight. From ``PREFILL_MIN_ROWS`` rows (prefill) the
    product is compute-bound and the kernel, which unpacks every weight again for each 4 rows, is slower than
    dequantizing the layer once into a reused bfloat16 buffer for the dense product (``quant.int4_pack``).
    """
    shape = x.shape
    x2 = cast(x.reshape(-1, shape[-1]), scales_and_zeros.dtype)
    if (x2.shape[0] >= PREFILL_MIN_ROWS and scales_and_zeros.dtype == torch.bfloat16
            and not torch.compiler.is_compiling() and kernel_layout() is not None):
        y = torch.mm(x2, dequantize_packed_t(packed, scales_and_zeros, group_size))
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    y = cast(y, x.dtype).reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(x.dtype)


class Int4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored group-wise in 4 bits.

    Holds the portable tensors only when the kernel is missing (fallback); otherwise the kernel's packed
    copy with bfloat16 scales, which ``portable()`` turns back into the portable format (for saving): a
    layer saved and loaded again computes exactly as before. ``dtype`` is the dtype of the bias.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.compute_dtype = dtype
        n, k = self.out_features, self.in_features
        self.use_kernel = qweight.device.type == "cpu" and kernel_fits(n, k) and int4_kernel_available()
        # a per-channel layer is a group-32 layer whose groups of a row share one pair: the same matrix
        self.kernel_group = KERNEL_GROUP if group_size == CHANNEL else group_size
        if self.use_kernel:
            if group_size == CHANNEL:
                scales, mins = (t.expand(n, k // KERNEL_GROUP) for t in (scales, mins))
            packed, sz = pack_for_kernel(qweight, scales, mins)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", sz)
        else:
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)
            self.register_buffer("mins", mins)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | str = 64, dtype: torch.dtype | None = None,
                    bits: int = 4) -> Int4Linear:
        """Quantize an ``nn.Linear`` (round to nearest); computes in ``dtype`` (default: the layer's own)."""
        dtype = dtype or linear.weight.dtype
        return cls(*quantize_int4(linear.weight, group_size, bits=bits), group_size, linear.bias, dtype)

    def portable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qweight, scales, mins)`` in the portable format, recovered exactly from whatever is stored."""
        if not self.use_kernel:
            return self.qweight, self.scales, self.mins
        # The kernel's layout depends on the CPU (its block width follows the vector unit), so instead of
        # decoding it, run it on the identity with scale 1 and zero 8: the product is then exactly q.
        n, k, g = self.out_features, self.in_features, self.kernel_group
        unit = torch.stack([torch.ones(k // g, n), torch.full((k // g, n), 8.0)], dim=-1).to(KERNEL_DTYPE)
        q = int4_linear(torch.eye(k), self.packed, unit, g).t().round().to(torch.uint8)  # [N, K], exact in bf16
        sz = self.scales_and_zeros.float()
        if self.group_size == CHANNEL:
            sz = sz[:1]  # every group of a row holds the same pair
        return pack_codes(q), *kernel_grid(sz)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer computes with (the reference for tests)."""
        return dequantize_int4(*self.portable(), self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return int4_linear(x, self.packed, self.scales_and_zeros, self.kernel_group, self.bias)
        w = dequantize_int4(self.qweight, self.scales, self.mins, self.group_size, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={'int4pack' if self.use_kernel else 'dequantize fallback'}")
