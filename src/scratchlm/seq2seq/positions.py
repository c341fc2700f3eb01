"""Sinusoidal position encodings (Vaswani et al. 2017, section 3.5), for any real-valued positions.

    PE(pos, 2i)     = sin(pos / base^(2i / dim))
    PE(pos, 2i + 1) = cos(pos / base^(2i / dim))

Each pair of channels turns at its own frequency, from one turn per 2*pi positions down to one per
2*pi*base, so that PE(pos + k) is a fixed rotation of PE(pos) and attention can learn relative offsets. The
table is computed, never learned or saved. Positions may be fractional: diffusion models embed their noise
step this way (Ho et al. 2020, appendix B), so ``sinusoidal_encoding(t, dim)`` serves a timestep tensor too.
"""

from __future__ import annotations

import torch


def sinusoidal_encoding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The encodings of ``positions`` (any shape, integer or float): float32 [*positions.shape, dim], sines on
    the even channels and cosines on the odd ones, as in the paper."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"sinusoidal encodings need a positive even dimension, got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim  # 2i / dim
    angles = positions.to(torch.float32)[..., None] / base ** exponents  # (..., dim / 2)
    # Interleave: channel 2i holds sin, channel 2i + 1 holds cos of the same angle.
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The encodings of positions 0 .. n_positions - 1: float32 [n_positions, dim]."""
    return sinusoidal_encoding(torch.arange(n_positions), dim, base)
