"""A token-embedding table stored in int8 or int4, dequantized one looked-up row at a time.

A lookup touches a handful of rows per step, so there is nothing to gain in speed; what it saves is memory:
SmolLM2's 49,152 x 576 table is 113 MB in float32 and 28 MB in int8. When the LM head shares the table (tied
embeddings), the int8 head uses the very same int8 tensor. ``quantize_model`` keeps the table in int8 in
both modes (the int4 head cost too much accuracy); int4 rows are here for other callers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.quant.int4 import quantize_int4, unpack_int4
from scratchlm.quant.int8 import quantize_int8


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with int8 rows (``bits=8``) or group-wise int4 rows (``bits=4``), portable format."""

    def __init__(self, bits: int, tensors: dict[str, torch.Tensor], group_size: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.bits, self.group_size, self.compute_dtype = bits, group_size, dtype
        for name, tensor in tensors.items():  # int8: qweight, scales; int4: qweight, scales, mins
            self.register_buffer(name, tensor)
        self.num_embeddings = self.qweight.shape[0]
        self.embedding_dim = self.qweight.shape[1] * (2 if bits == 4 else 1)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, group_size: int | None = None,
                       dtype: torch.dtype | None = None) -> QuantEmbedding:
        """Quantize an ``nn.Embedding`` row by row (int8) or group by group (int4)."""
        w = embedding.weight
        if bits == 8:
            tensors = dict(zip(("qweight", "scales"), quantize_int8(w)))
        else:
            tensors = dict(zip(("qweight", "scales", "mins"), quantize_int4(w, group_size)))
        return cls(bits, tensors, group_size, dtype or w.dtype)

    def portable(self) -> dict[str, torch.Tensor]:
        names = ("qweight", "scales") if self.bits == 8 else ("qweight", "scales", "mins")
        return {name: getattr(self, name) for name in names}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.qweight)  # (..., C) int8 or (..., C/2) packed nibbles
        if self.bits == 8:
            return (rows.to(self.compute_dtype) * self.scales[input_ids, None].to(self.compute_dtype))
        shape = rows.shape[:-1]
        g = self.group_size
        codes = unpack_int4(rows.reshape(-1, rows.shape[-1])).float()  # (n, C)
        codes = codes.reshape(codes.shape[0], -1, g)
        flat_ids = input_ids.reshape(-1)
        w = codes * self.scales[flat_ids][..., None] + self.mins[flat_ids][..., None]
        return w.reshape(*shape, self.embedding_dim).to(self.compute_dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}"
