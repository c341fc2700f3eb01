"""GRPO (Shao et al. 2024, DeepSeekMath section 4.1): PPO without a value network.

Each prompt is answered ``G`` times; the group's rewards are their own baseline:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          outcome supervision, eq. 3 (every token of
                                                                   completion i gets A_i)
    L   = -1/G sum_i 1/|o_i| sum_t [ min(ratio A_i, clip(ratio, 1-eps, 1+eps) A_i) - beta KL_k3 ]   (eq. 3)

where ``ratio = pi(o_it) / pi_old(o_it)`` and ``KL_k3`` is the unbiased, non-negative estimator of
KL(pi || pi_ref) (eq. 4; ``ppo.kl_estimate``). A group whose completions all score the same carries no signal
(all its advantages are 0). ``beta = 0`` drops the reference model altogether, as recent recipes do (DAPO).
"""

from __future__ import annotations

import torch

from scratchlm.align.ppo import kl_estimate, masked_mean


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages for ``rewards`` [N] ordered prompt by prompt (``group_size`` per prompt).

    The std is the unbiased one (``torch.std``, as TRL's GRPOTrainer); ``scale=False`` only subtracts the group
    mean (Dr. GRPO, Liu et al. 2025, which argues the division biases towards easy and impossible prompts).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size).float()
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2,
              kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """GRPO's objective as a loss: per-token clipped surrogate minus ``kl_coef`` * KL_k3, averaged over each
    completion's tokens, then over completions (eq. 3).

    ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``mask`` are [N, T] over response positions;
    ``advantages`` is [N] (one per completion). ``ref_logprobs`` may be None when ``kl_coef`` is 0.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(logprobs.dtype)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)
    per_token = -surrogate
    stats = {}
    if kl_coef:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")
        per_token = per_token + kl_coef * kl
        stats["kl"] = float(masked_mean(kl.detach(), mask))
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        stats["clipfrac"] = float(masked_mean(((ratio - 1.0).abs() > clip).float(), mask))
    return loss, stats
