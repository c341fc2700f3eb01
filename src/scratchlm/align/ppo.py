"""PPO for language models (RLHF): the pieces of one update, each a small function on tensors.

InstructGPT (Ouyang et al. 2022) trains the policy with PPO (Schulman et al. 2017) against a reward model, with a
per-token KL penalty that keeps it near the reference model (Ziegler et al. 2019, eq. 2). One batch of rollouts:

    score        <- reward model (or a function) on (prompt, completion)        one number per completion
    r_t          <- -beta * KL_t  (+ score on the completion's last token)     per-token rewards
    r            <- r / std(r)                                                  reward whitening (optional)
    V_t          <- value head on the policy's hidden state before token t
    A_t, R_t     <- GAE(r, V, gamma, lambda); returns R = A + V                 (Schulman et al. 2016, eq. 16)
    A            <- whiten(A)
    for epoch in ppo_epochs, for minibatch:                                      several passes over the batch
        ratio    = exp(logp_new - logp_old)
        L_policy = mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps)))             (PPO paper, eq. 7)
        L_value  = 0.5 mean(max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2))     (as in OpenAI's lm-human-prefs)
        loss     = L_policy + vf_coef L_value

Tensors are ``[batch, positions]`` over the *response* positions, with ``mask`` 1 on real tokens and 0 on
padding; every mean is over real tokens only. The same estimators are in TRL's ``PPOTrainer`` and in
OpenAI's lm-human-prefs; the names here follow the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over the masked positions (Bessel's correction, as ``torch.var``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions; ``shift_mean=False`` divides by the std only and keeps
    the mean (reward whitening must not change the sign of a reward's average, only its scale)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probabilities of tokens drawn from the policy.

    Schulman, "Approximating KL divergence" (2020): with ``log_ratio = log p_ref - log p``,
    ``k1 = -log_ratio`` (unbiased, can be negative), ``k2 = log_ratio^2 / 2`` (biased, low variance) and
    ``k3 = (exp(log_ratio) - 1) - log_ratio`` (unbiased and never negative; GRPO's estimator, eq. 4).
    """
    log_ratio = ref_logprobs - logprobs
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1, k2 or k3")


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * KL_t`` with each completion's score added on its last real token.

    Returns ``(rewards, kl)`` [B, T], both zero on padding. Ziegler et al. 2019, eq. 2: the KL penalty is paid
    token by token, the score once at the end.
    """
    kl = kl_estimate(logprobs, ref_logprobs, "k1") * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of each row's last real token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eqs. 11-16) along each row.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lambda A_{t+1}``; the value after a
    row's last real token is 0 (the episode ends there), and padding contributes nothing. Returns
    ``(advantages, returns)`` with ``returns = advantages + values``.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        # On padding the "next" value and advantage stay 0, so a row's last real token sees V = 0 after it.
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise, averaged over real tokens.

    Returns the loss and statistics: the share of tokens where clipping was active (``clipfrac``) and the
    approximate KL between the new and old policies (``approx_kl``, k3).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
                 "approx_kl": float(masked_mean(kl_estimate(logprobs, old_logprobs, "k3"), mask))}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean(((clipped_values - returns) ** 2 > (values - returns) ** 2)
                                                  .float(), mask))}
    return loss, stats


@dataclass(frozen=True)
class PPOSettings:
    """The PPO hyperparameters (defaults as TRL's PPOConfig where it has the same knob)."""

    kl_coef: float = 0.05  # beta of the per-token KL penalty
    gamma: float = 1.0  # discount; 1 for text (the reward comes once, at the end)
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip epsilon
    vf_coef: float = 0.1  # weight of the value loss
    whiten_rewards: bool = True  # divide the per-token rewards by their std over the batch


@torch.no_grad()
def advantages_and_returns(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                           values: torch.Tensor, mask: torch.Tensor, settings: PPOSettings) -> dict[str, torch.Tensor]:
    """Everything PPO needs from one batch of rollouts, before the update: rewards, KL, advantages, returns."""
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, settings.kl_coef)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    advantages = masked_whiten(advantages, mask)
    return {"rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}
