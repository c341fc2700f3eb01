"""Running the diffusion backwards: DDPM and DDIM sampling, classifier-free guidance, and image-to-image (SDEdit).

At each step the network predicts the noise eps in x_t, guided towards the caption (Ho & Salimans 2022, eq. 6):

    eps = eps(x_t, no caption) + w * (eps(x_t, caption) - eps(x_t, no caption))     # w = 1: plain conditioning

which gives an estimate of the clean image, x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped to the
data's range [-1, 1]. Then:

- DDPM (Ho et al. 2020, eqs. 6-7) draws x_{t-1} from the posterior q(x_{t-1} | x_t, x0): its mean
  (sqrt(abar_{t-1}) beta_t x0 + sqrt(alpha_t) (1 - abar_{t-1}) x_t) / (1 - abar_t), its variance
  beta_t (1 - abar_{t-1}) / (1 - abar_t). Every one of the T steps is visited.
- DDIM (Song et al. 2020, eq. 12 with eta = 0) jumps deterministically along a subsequence of the steps:
  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps. 50 steps instead of 1000.

Image-to-image (SDEdit, Meng et al. 2021) noises a given image to step strength * T with the forward process and
denoises from there under the new caption: low strength keeps the drawing, high strength follows the caption.
"""

from __future__ import annotations

import torch

from scratchlm.diffusion.schedule import NoiseSchedule
from scratchlm.errors import ConfigError

SAMPLERS = ("ddim", "ddpm")


def guided_noise(model, x: torch.Tensor, t: int, cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The classifier-free guided noise estimate for x [B, 1, S, S] at step t under captions ``cond`` [B, E]."""
    steps = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    if guidance == 1.0:
        return model(x, steps, cond)
    # One pass over both halves: the captioned rows, then the same rows without caption.
    drop = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.bool)]).to(x.device)
    eps_cond, eps_free = model(torch.cat([x, x]), torch.cat([steps, steps]), torch.cat([cond, cond]), drop).chunk(2)
    return eps_free + guidance * (eps_cond - eps_free)


def step_sequence(sampler: str, num_steps: int, start: int, schedule_steps: int) -> list[int]:
    """The steps visited, from ``start`` down to 0: all of them (DDPM) or ``num_steps`` evenly spaced (DDIM)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0 <= start < schedule_steps:
        raise ConfigError(f"the first step must lie in [0, {schedule_steps - 1}], got {start}")
    if sampler == "ddpm":
        return list(range(start, -1, -1))
    if num_steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {num_steps}")
    count = min(num_steps, start + 1)
    return sorted({round(start * i / max(count - 1, 1)) for i in range(count)}, reverse=True)


@torch.no_grad()
def denoise(model, schedule: NoiseSchedule, x: torch.Tensor, cond: torch.Tensor, steps: list[int],
            sampler: str = "ddim", guidance: float = 3.0, generator: torch.Generator | None = None,
            progress=None) -> torch.Tensor:
    """Run the reverse process over ``steps`` (descending) from x = x_{steps[0]}; returns x_0 in [-1, 1]."""
    abar = schedule.alphas_cumprod.to(x.device)
    for i, t in enumerate(steps):
        eps = guided_noise(model, x, t, cond, guidance)
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        prev = steps[i + 1] if i + 1 < len(steps) else -1
        abar_prev = abar[prev] if prev >= 0 else torch.ones((), device=x.device)
        if prev < 0:
            x = x0
        elif sampler == "ddim":
            eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()  # the noise consistent with the clipped x0
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        else:  # DDPM: one step of the posterior, prev = t - 1
            beta, alpha = schedule.betas[t].to(x.device), schedule.alphas[t].to(x.device)
            mean = (abar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - abar_prev) * x) / (1 - abar[t])
            variance = beta * (1 - abar_prev) / (1 - abar[t])
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = mean + variance.sqrt() * noise
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, cond: torch.Tensor, image_size: int, sampler: str = "ddim",
           num_steps: int = 50, guidance: float = 3.0, seed: int = 0, progress=None) -> torch.Tensor:
    """Images [B, 1, S, S] in [-1, 1] generated from pure noise under captions ``cond`` [B, E]."""
    generator = torch.Generator(device=cond.device).manual_seed(seed)
    x = torch.randn((len(cond), 1, image_size, image_size), generator=generator, device=cond.device)
    steps = step_sequence(sampler, num_steps, schedule.num_steps - 1, schedule.num_steps)
    return denoise(model, schedule, x, cond, steps, sampler, guidance, generator, progress)


@torch.no_grad()
def img2img(model, schedule: NoiseSchedule, images: torch.Tensor, cond: torch.Tensor, strength: float,
            sampler: str = "ddim", num_steps: int = 50, guidance: float = 3.0, seed: int = 0,
            progress=None) -> torch.Tensor:
    """SDEdit: ``images`` [B, 1, S, S] in [-1, 1] noised to step strength * T, then denoised under ``cond``."""
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--strength must lie in (0, 1], got {strength}: 0.3 keeps the drawing, 0.8 follows "
                          "the prompt")
    generator = torch.Generator(device=cond.device).manual_seed(seed)
    start = max(1, round(strength * schedule.num_steps)) - 1
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    x = schedule.q_sample(images, torch.full((len(images),), start, dtype=torch.long, device=images.device), noise)
    count = max(1, round(num_steps * strength))  # DDIM visits as many steps per unit of noise as in `sample`
    steps = step_sequence(sampler, count, start, schedule.num_steps)
    return denoise(model, schedule, x, cond, steps, sampler, guidance, generator, progress)
