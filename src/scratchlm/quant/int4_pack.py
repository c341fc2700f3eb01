"""The byte layout of PyTorch's packed int4 CPU weights: pack 4-bit codes into it directly, and read them back.

``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` takes the codes as int32 [N, K] (4 bytes per 4-bit code:
SmolLM2's int4 layers made 420 MiB of int32 temporaries at every load, most of the load's page faults) and
returns uint8 [N, K/2]. Its layout (``weight_to_int4pack_kernel`` in ATen's ``cpu/int4mm_kernel.cpp``) groups
the rows in blocks of ``BLOCK_N`` (64 with AVX-512, 32 otherwise); a block of ``nb`` rows is stored as [K, nb/2]
bytes, column after column, and each byte holds two rows of one column:

    "halves"  (a full block on an AVX-512 or AVX2 build)   low nibble row j, high nibble row j + nb/2
    "pairs"   (a shorter last block, or a scalar build)    low nibble row 2j, high nibble row 2j + 1

Which one this build uses is not exposed, so ``kernel_layout`` packs a probe with PyTorch's own function once
and keeps the first candidate that gives the same bytes; with none, callers use PyTorch's function (and the
prefill path below is off). Reading the layout back gives the prefill path its weights: for many rows the
dense bfloat16 product (oneDNN) is faster than the int4 kernel, so the codes are dequantized into a reused
bfloat16 buffer, one layer at a time (``dequantize_packed_t``).
"""

from __future__ import annotations

import functools
import threading

import torch

from scratchlm.quant.kernels import int4_kernel_available

# (rows per block, full blocks as "halves"): AVX-512, AVX2, scalar builds of ATen's packing (see above)
CANDIDATES = ((64, True), (32, True), (32, False))


def _pack(codes: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """Codes uint8 [N, K] (0..15) -> the packed uint8 [N, K/2] of layout ``(block, halves)``."""
    n, k = codes.shape
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    flat = out.view(-1)
    full = n - n % block
    # the full blocks, then the last, shorter block (one block of its own size)
    for start, rows, size, split in ((0, full, block, halves), (full, n - full, n - full, False)):
        if rows == 0:
            continue
        part = codes[start : start + rows].view(rows // size, size, k)
        if split:  # low nibble from the first half of the block's rows
            lo, hi = part[:, : size // 2], part[:, size // 2 :]
        else:  # rows 2j and 2j + 1
            pairs = part.view(rows // size, size // 2, 2, k)
            lo, hi = pairs[:, :, 0], pairs[:, :, 1]
        # the bytes in row order first ([blocks, size/2, K], contiguous reads), then one transposing copy:
        # 3.5x faster than shifting and or-ing through transposed views (SmolLM2 shapes, one thread)
        both = torch.bitwise_left_shift(hi, 4)
        both.bitwise_or_(lo)
        dest = flat[start * k // 2 : (start + rows) * k // 2].view(rows // size, k, size // 2)
        dest.copy_(both.transpose(1, 2))
    return out


@functools.cache
def kernel_layout() -> tuple[int, bool] | None:
    """``(rows per block, halves)`` of PyTorch's int4 CPU packing on this build, or None when unknown (or when
    the kernel is missing)."""
    if not int4_kernel_available():
        return None
    gen = torch.Generator().manual_seed(0)
    matches = list(CANDIDATES)
    # 176 rows: two blocks of 64 and one of 48, or five of 32 and one of 16; 48 and 16: one short block
    for n in (176, 48, 16):
        codes = torch.randint(0, 16, (n, 64), generator=gen, dtype=torch.int32)
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        matches = [c for c in matches if torch.equal(_pack(codes.to(torch.uint8), *c).view(want.shape), want)]
    return matches[0] if matches else None


def pack_kernel_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (any integer dtype, values 0..15) -> PyTorch's packed int4 CPU weight, bit for bit
    what ``_convert_weight_to_int4pack_for_cpu(codes.int(), 2)`` returns, without the int32 copy."""
    layout = kernel_layout()
    if layout is None:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    packed = _pack(codes.to(torch.uint8).contiguous(), *layout)
    return packed.view(codes.shape[0], -1)


# One pair of buffers per thread (a server prefills on its own thread), grown to the largest layer and reused:
# SmolLM2's largest, gate and up fused, is 3,072 x 576: 3.4 MiB in bfloat16 and 6.8 MiB in float32.
_buffers = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first needed under torch.inference_mode() (generation): an inference tensor
        # could not be written again outside it (quantize_model's identity product, training code).
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[:numel]


def dequantize_packed_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The transposed weight W.T [K, N] (bfloat16) that the int4 kernel computes with, so that ``x @ W.T`` is
    one dense product. It lives in a buffer of this thread that the next call overwrites.

    The kernel dequantizes each weight as ``(q - 8) * scale + zero`` in float32; so does this, as ``q * scale +
    (zero - 8 * scale)`` in one float32 ``addcmul``, then rounds once to bfloat16: the same weights, bit for bit
    (tests/test_quant.py). Float32 first because PyTorch's bfloat16 element-wise kernels were slower.
    """
    block, halves = kernel_layout()  # callers check that it is known
    n, k = packed.shape[0], packed.shape[1] * 2
    w32 = _buffer("float32", k * n, torch.float32).view(k, n)
    flat = packed.view(-1)
    full = n - n % block
    for start, rows, size, split in ((0, full, block, halves), (full, n - full, n - full, False)):
        if rows == 0:
            continue
        src = flat[start * k // 2 : (start + rows) * k // 2].view(rows // size, k, size // 2).transpose(0, 1)
        dest = w32[:, start : start + rows].view(k, rows // size, size)  # [K, blocks, size]
        if split:
            lo, hi = dest[..., : size // 2], dest[..., size // 2 :]
        else:
            pairs = dest.view(k, rows // size, size // 2, 2)
            lo, hi = pairs[..., 0], pairs[..., 1]
        lo.copy_(src & 0x0F)
        hi.copy_(src >> 4)
    scales = scales_and_zeros[..., 0].float()  # [K / group, N]
    offsets = scales_and_zeros[..., 1].float() - 8 * scales
    grouped = w32.view(k // group_size, group_size, n)
    torch.addcmul(offsets[:, None, :], grouped, scales[:, None, :], out=grouped)
    return _buffer("bfloat16", k * n, torch.bfloat16).view(k, n).copy_(w32)
