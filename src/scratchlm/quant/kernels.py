"""Which of PyTorch's low-bit CPU kernels this machine has, probed once; a fallback is announced once.

PyTorch ships ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (int4 weights, float activations) since 2.5,
but a build or CPU may lack it. We call it on a tiny problem and compare with the plain product; on any
failure the int4 layers dequantize and use ``F.linear`` instead, and we say so once on stderr.
"""

from __future__ import annotations

import functools
import sys

import torch

_announced: set[str] = set()


def announce_fallback(kind: str, reason: str) -> None:
    """Print once per process that ``kind`` runs on the slower fallback path, and why."""
    if kind in _announced:
        return
    _announced.add(kind)
    print(f"scratchlm: no {kind} kernel on this machine ({reason}); using the dequantize fallback "
          "(correct, but slower)", file=sys.stderr)


def int4_ops():
    """PyTorch's (pack, matmul) pair for int4 weights on CPU; raises AttributeError where missing."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu, torch.ops.aten._weight_int4pack_mm_for_cpu


@functools.cache
def int4_kernel_available() -> bool:
    """True when PyTorch's packed int4 CPU kernel exists here and gives the right answer."""
    try:
        pack, matmul = int4_ops()
        n, k, g = 16, 64, 32
        codes = (torch.arange(n * k, dtype=torch.int32).reshape(n, k) * 7) % 16
        packed = pack(codes, 2)
        sz = torch.stack([torch.full((k // g, n), 0.5), torch.zeros(k // g, n)], dim=-1).bfloat16()
        x = torch.randn(2, k, generator=torch.Generator().manual_seed(0)).bfloat16()
        got = matmul(x, packed, g, sz).float()
        want = x.float() @ ((codes.float() - 8) * 0.5).t()
        ok = torch.allclose(got, want, atol=0.05, rtol=0.02)
        reason = "it gave wrong results"
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    if not ok:
        announce_fallback("int4", reason)
    return ok


def kernel_fits(out_features: int, in_features: int) -> bool:
    """The int4 kernel packs rows in blocks of 16 and columns in tiles of 32."""
    return out_features % 16 == 0 and in_features % 32 == 0
