"""The noise schedule of a denoising diffusion model (DDPM, Ho et al. 2020) and its forward process.

The forward process adds a little Gaussian noise at each of T steps,

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                          (DDPM eq. 2)

and has a closed form for jumping from the clean image straight to step t (eq. 4):

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,        eps ~ N(0, I)

The model learns to predict eps from x_t and t; sampling (``sampling.py``) runs the process backwards.

Two schedules of beta_t: "linear" from 1e-4 to 0.02 over T = 1000 (DDPM section 4), and "cosine" (Nichol &
Dhariwal 2021, eq. 17), abar_t = f(t) / f(0) with f(t) = cos((t/T + s) / (1 + s) * pi / 2)^2, betas capped at 0.999:
it destroys small images less abruptly than the linear one.
Steps are numbered 0 .. T-1 here (the paper's 1 .. T).
"""

from __future__ import annotations

import math

import torch

from scratchlm.errors import ConfigError

SCHEDULES = ("linear", "cosine")


def make_betas(kind: str, num_steps: int) -> torch.Tensor:
    """beta_t for t = 0 .. num_steps-1 (float64) of the ``linear`` or ``cosine`` schedule."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if num_steps < 2:
        raise ConfigError(f"a diffusion needs at least 2 steps, got {num_steps}")
    if kind == "linear":
        # DDPM's 1e-4 .. 0.02 was chosen for T = 1000; scaled so that other T destroy the image as much.
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    s = 0.008
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class NoiseSchedule:
    """beta_t, alpha_t = 1 - beta_t and abar_t (``alphas_cumprod``) of one schedule, as float32 tensors [T]."""

    def __init__(self, kind: str = "cosine", num_steps: int = 1000):
        self.kind, self.num_steps = kind, num_steps
        betas = make_betas(kind, num_steps)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: step ``t`` [B] of the forward process, in one jump."""
        abar = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_step(self, x_prev: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """One step of the forward process: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise (step 0 from x_0)."""
        beta = self.betas[t]
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_steps": self.num_steps}
