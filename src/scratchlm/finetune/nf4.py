"""QLoRA's frozen base: weights stored as 4-bit NormalFloat (NF4) with double quantization, on any device.

Dettmers et al. 2023 (QLoRA), section 3:

* **NF4.** Pretrained weights are close to normally distributed, so the 16 levels are placed at quantiles
  of N(0, 1) rather than evenly: each level then receives about the same share of weights. The levels
  are asymmetric so that 0 is exact (8 positive and 7 negative quantiles plus zero), scaled to [-1, 1].
* **Blocks.** The flattened weight is cut into blocks of 64; each block is divided by its absolute
  maximum (``absmax``) and every value is replaced by the index of the nearest level: 4 bits.
* **Double quantization.** The float32 absmax constants cost 32/64 = 0.5 bit per weight. They are
  quantized again: minus their mean, in blocks of 256, as 8-bit floats with one float32 scale per block
  (the paper's "8-bit Floats with a blocksize of 256"; we use torch's float8_e4m3fn). That costs
  8/64 + 32/(64*256) = 0.127 bit per weight: 4.127 bits in all, 0.516 bytes instead of 4.

Why our own NF4 rather than the int4 format of ``scratchlm.quant`` (issue 5): QLoRA needs gradients with
respect to a layer's *input* through a frozen 4-bit weight, on CPU. ``quant.Int4Linear`` runs PyTorch's
``_weight_int4pack_mm_for_cpu`` kernel, which has no backward, so its backward would dequantize the weight
anyway; NF4 + double quantization is also the format the QLoRA recipe was validated with, and it is smaller
(0.516 bytes per weight against 0.625 for int4 with float32 scale and minimum per group of 64).

Forward and backward both dequantize the weight into a temporary float matrix and use an ordinary matrix
product (as bitsandbytes does); the float weight is never kept, so memory holds only the 4-bit form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError

BLOCK_SIZE = 64  # weights per absmax constant (QLoRA's choice)
ABSMAX_BLOCK = 256  # absmax constants per second-level scale
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending (QLoRA appendix E; bitsandbytes' ``create_normal_map``).

    The positive half takes N(0,1) quantiles at 8 evenly spaced probabilities from ``offset`` down to 0.5,
    the negative half 7 from ``offset``; ``offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2`` keeps the outermost
    quantile finite. Each half is scaled so that its extreme level is exactly +-1.
    """
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


LEVELS = nf4_levels()
# Midpoints between neighbouring levels: bucketize against them gives the nearest level's index.
_MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2
# Every byte holds two codes (low nibble first); this table turns a byte into its two levels at once.
_PAIR_TABLE = torch.stack([LEVELS[torch.arange(256) & 15], LEVELS[torch.arange(256) >> 4]], dim=-1)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> dict[str, torch.Tensor]:
    """A float tensor -> NF4 codes with double-quantized block constants (a dict of tensors).

    Keys: ``codes`` uint8 [ceil(n/2)] (two codes per byte), ``absmax_q`` uint8 (float8 bits), one per block,
    ``absmax_scale`` float32, one per 256 blocks, ``absmax_mean`` float32 [1].
    """
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block_size
    blocks = F.pad(flat, (0, pad)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.bucketize(blocks / absmax[:, None], _MIDPOINTS.to(flat.device)).to(torch.uint8).reshape(-1)
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    packed = codes[0::2] | (codes[1::2] << 4)
    # Double quantization: centre the (all positive) constants, then 8-bit floats with a scale per 256.
    mean = absmax.mean()
    centred = absmax - mean
    pad2 = (-centred.numel()) % ABSMAX_BLOCK
    groups = F.pad(centred, (0, pad2)).reshape(-1, ABSMAX_BLOCK)
    scale = (groups.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    absmax_q = (groups / scale[:, None]).reshape(-1)[: centred.numel()].to(FP8).view(torch.uint8)
    return {"codes": packed.contiguous(), "absmax_q": absmax_q.contiguous(), "absmax_scale": scale.contiguous(),
            "absmax_mean": mean.reshape(1)}


def dequantize_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_mean: torch.Tensor) -> torch.Tensor:
    """The block constants back from their 8-bit form: float8 * scale of its group of 256 + mean."""
    values = absmax_q.view(FP8).float()
    scale = absmax_scale.repeat_interleave(ABSMAX_BLOCK)[: values.numel()]
    return values * scale + absmax_mean


def dequantize_nf4(q: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                   block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """The float tensor of ``shape`` that ``quantize_nf4``'s output stands for."""
    n = 1
    for s in shape:
        n *= s
    absmax = dequantize_absmax(q["absmax_q"], q["absmax_scale"], q["absmax_mean"])
    table = _PAIR_TABLE.to(q["codes"].device)
    levels = table.index_select(0, q["codes"].int()).reshape(-1)  # (2 * bytes,) two levels per byte
    blocks = levels[: absmax.numel() * block_size].reshape(-1, block_size) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly; the input gradient re-dequantizes W instead of keeping it."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight_float(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.weight_float(grad_y.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 with double quantization (bias kept as is)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, quantized: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        for key, value in (quantized or quantize_nf4(weight)).items():
            self.register_buffer(key, value)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        return cls(linear.weight, linear.bias, linear.weight.dtype)

    def quantized(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("codes", "absmax_q", "absmax_scale", "absmax_mean")}

    def weight_float(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight [out, in] (a temporary: it is not kept)."""
        return dequantize_nf4(self.quantized(), (self.out_features, self.in_features), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` holding the dequantized weight (for merging an adapter into it)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(self.weight_float(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block {BLOCK_SIZE}, double-quant"


class NF4Embedding(nn.Module):
    """A frozen token embedding in NF4; when rows fill whole blocks only the looked-up rows are dequantized."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype | None = None,
                 quantized: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        for key, value in (quantized or quantize_nf4(weight)).items():
            self.register_buffer(key, value)

    def quantized(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("codes", "absmax_q", "absmax_scale", "absmax_mean")}

    def weight_float(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), (self.num_embeddings, self.embedding_dim), dtype or self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        d = self.embedding_dim
        if d % BLOCK_SIZE:
            return F.embedding(ids, self.weight_float())
        # Row r is bytes [r*d/2, (r+1)*d/2) of the codes and blocks [r*d/64, (r+1)*d/64) of the constants.
        flat = ids.reshape(-1)
        per_row = d // BLOCK_SIZE
        absmax = dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean).reshape(-1, per_row)[flat]
        codes = self.codes.reshape(-1, d // 2)[flat]  # (N, d/2)
        levels = _PAIR_TABLE.to(codes.device).index_select(0, codes.reshape(-1).int()).reshape(-1, per_row, BLOCK_SIZE)
        rows = (levels * absmax[..., None]).reshape(*ids.shape, d)
        return rows.to(self.compute_dtype)


def quantize_base(model: nn.Module) -> nn.Module:
    """Replace every frozen weight matrix of a Transformer with its NF4 form, in place.

    The linear layers of every block, the token embedding and the LM head (one shared NF4 tensor when
    tied, as the float model shares one matrix). Norms, biases and learned positions stay in float: they
    are a tiny share of the weights and LoRA's inputs pass through them.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, NF4Linear.from_linear(module))
    embedding = model.tok_embeddings
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError("quantize_base expects a float model (its embedding is already quantized)")
    weight = embedding.weight
    q_embed = NF4Embedding(weight, weight.dtype)
    model.tok_embeddings = q_embed
    if model.config.tie_embeddings:
        model.lm_head = NF4Linear(weight, None, weight.dtype, quantized=q_embed.quantized())
    else:
        model.lm_head = NF4Linear.from_linear(model.lm_head)
    return model


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the base model's weights: every parameter and buffer except LoRA's A and B, each
    storage counted once (a tied head shares the embedding's)."""
    seen: set[int] = set()
    total = 0
    tensors = [p for n, p in model.named_parameters() if ".lora_" not in n] + list(model.buffers())
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
