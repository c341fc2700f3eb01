"""A small U-Net that predicts the noise in a digit image, given the step and a text embedding.

    x_t [B, 1, 16, 16] --conv--> 16x16 x c --down--> 8x8 x 2c --down--> 4x4 x 2c --Block (attention)-->
                                     |                   |                                 |
    eps [B, 1, 16, 16] <--conv-- 16x16 x c <--up-- 8x8 x 2c <-------------up---------------+   (skips concatenated)

Each stage is a residual block (GroupNorm, SiLU, 3x3 conv, twice) that adds the conditioning vector to its
features: the step t as sinusoidal features through an MLP (DDPM, appendix B, from the transformer's positional
encoding) plus the caption's CLIP text embedding through a linear layer. At 4x4 the 16 positions go through one
``scratchlm.model.Block``, our transformer layer with bidirectional attention, as DDPM's U-Net attends at 16x16.

Classifier-free guidance (Ho & Salimans 2022) needs the same network without a caption: ``drop`` [B] replaces the
text embedding of the chosen rows by a learned "no caption" vector (done for 10% of training rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ConfigError, ModelFileError
from scratchlm.model import AttentionMask, Block
from scratchlm.vision.vit import block_config


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the U-Net; ``cond_dim`` is the width of the text embeddings it is conditioned on."""

    image_size: int = 16
    channels: int = 32  # at full resolution; twice that below
    cond_dim: int = 64
    n_heads: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"invalid U-Net config: {name} must be a positive integer, got {value!r}")
        if self.image_size % 4:
            raise ConfigError(f"invalid U-Net config: image_size {self.image_size} must be a multiple of 4")
        if self.channels % 8 or (2 * self.channels) % self.n_heads:
            raise ConfigError(f"invalid U-Net config: channels {self.channels} must be a multiple of 8 and twice "
                              f"it divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ModelFileError(f"unknown U-Net config fields {unknown}")
        return cls(**data)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of steps t [B] (Vaswani et al. 2017, section 3.5; DDPM appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the conditioning; GroupNorm, SiLU, conv; plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """eps_theta(x_t, t, text embedding): the predicted noise [B, 1, S, S]."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig()
        c, emb_dim = self.config.channels, 4 * self.config.channels
        self.time_mlp = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(self.config.cond_dim, emb_dim)
        self.null_cond = nn.Parameter(torch.zeros(emb_dim))  # "no caption", for classifier-free guidance
        self.conv_in = nn.Conv2d(1, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb_dim)
        self.pool1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)  # S -> S/2
        self.down2 = ResBlock(2 * c, 2 * c, emb_dim)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)  # S/2 -> S/4
        self.mid1 = ResBlock(2 * c, 2 * c, emb_dim)
        n_positions = (self.config.image_size // 4) ** 2
        self.attn = Block(block_config(2 * c, 1, self.config.n_heads, n_positions))
        self.mid2 = ResBlock(2 * c, 2 * c, emb_dim)
        self.up2 = ResBlock(4 * c, 2 * c, emb_dim)  # after the S/4 -> S/2 upsampling, with the S/2 skip
        self.up1 = ResBlock(3 * c, c, emb_dim)  # after S/2 -> S, with the full-resolution skip
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting zero noise: a stable first step
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = False  # set by the training loop; unused at this size

    def embedding(self, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector [B, 4c]: step features plus the caption's (or the null caption's) projection."""
        text = self.cond_proj(cond)
        if drop is not None:
            text = torch.where(drop[:, None], self.null_cond.expand_as(text), text)
        return self.time_mlp(timestep_features(t, self.config.channels)) + text

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(t, cond, drop)
        h1 = self.down1(self.conv_in(x), emb)  # (B, c, S, S)
        h2 = self.down2(self.pool1(h1), emb)  # (B, 2c, S/2, S/2)
        h = self.mid1(self.pool2(h2), emb)  # (B, 2c, S/4, S/4)
        B, C, H, W = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, H*W, 2c): each position a token
        positions = torch.arange(H * W, device=x.device).expand(B, -1)
        tokens = self.attn(tokens, None, None, positions, AttentionMask(None, False, H * W))
        h = self.mid2(tokens.transpose(1, 2).reshape(B, C, H, W), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), h2], dim=1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
