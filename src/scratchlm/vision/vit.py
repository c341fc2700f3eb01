"""A vision transformer (ViT, Dosovitskiy et al. 2020) built from scratchlm's own transformer blocks.

    image [B, S, S] -> patches [B, N, p*p] -> linear patch embedding + learned positions, a [CLS] token first
    -> n_layers x Block (bidirectional attention, pre-norm) -> final norm -> the [CLS] state [B, C]

An image is read as a sentence of patches: an 8x8 digit cut into 2x2 patches is 16 "words" of 4 pixels. From the
embedding on, the blocks are ``scratchlm.model.Block``, the same code as the language models', with
``causal=False`` so that every patch sees every other.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.model import AttentionMask, Block, make_norm


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [B, S, S] (or [B, 1, S, S]) cut into patches [B, (S/p)^2, p*p], row by row."""
    if images.dim() == 4:
        images = images[:, 0]
    B, S, _ = images.shape
    n = S // patch_size
    patches = images.reshape(B, n, patch_size, n, patch_size).permute(0, 1, 3, 2, 4)  # (B, n, n, p, p)
    return patches.reshape(B, n * n, patch_size * patch_size)


def block_config(d_model: int, n_layers: int, n_heads: int, n_positions: int, dropout: float = 0.0) -> ModelConfig:
    """The ModelConfig of a bidirectional pre-norm stack (GPT-2's LayerNorm and GELU MLP, ViT's choices)."""
    return ModelConfig(vocab_size=1, context_length=n_positions, d_model=d_model, n_layers=n_layers,
                       n_heads=n_heads, positions="learned", norm="layernorm", mlp="gelu", bias=True,
                       causal=False, dropout=dropout, gelu_approximate="none", name="vit")


class VisionTransformer(nn.Module):
    """Images [B, S, S] in, one vector per image [B, d_model] out (the [CLS] token's final state)."""

    def __init__(self, image_size: int, patch_size: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the image size {image_size}")
        self.patch_size = patch_size
        n_patches = (image_size // patch_size) ** 2
        self.config = block_config(d_model, n_layers, n_heads, n_patches + 1)
        self.patch_embed = nn.Linear(patch_size * patch_size, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embeddings = nn.Parameter(torch.randn(1, n_patches + 1, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layers))
        self.final_norm = make_norm(self.config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(images, self.patch_size))  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embeddings  # (B, N+1, C)
        mask = AttentionMask(None, False, x.shape[1])  # every patch sees every patch
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        for block in self.blocks:
            x = block(x, None, None, positions, mask)
        return self.final_norm(x[:, 0])
