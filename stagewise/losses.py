"""Losses and estimators of preference alignment, as small pure functions over tensors.

Each is checked in tests against values derived by hand or a plain loop:
- `bradley_terry_loss`: reward-model training on preference pairs (InstructGPT), with an
  optional margin and the reward-centring term of Eisenstein et al. (2023);
- `dpo_loss` (Rafailov et al., 2023) and `ipo_loss` (Azar et al., 2023);
- `gae`: generalised advantage estimation over response tokens;
- `ppo_policy_loss` and `ppo_value_loss`: the clipped PPO objectives, with the clip fraction
  and approximate KL that PPO implementations log;
- `kl_per_token`: the per-token KL estimate used inside the RLHF reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2.
    chosen, rejected: (B,) rewards."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss.mean()


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    """(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), per pair (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Sigmoid DPO: mean of -log sigmoid(beta * logits). Inputs are sequence log-probs (B,)."""
    return -F.logsigmoid(beta * dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)).mean()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: mean of (logits - 1 / (2 beta))^2. As in TRL, the inputs are length-averaged
    log-probs, so the target margin does not depend on response length."""
    return ((dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2).mean()


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k1 estimate log pi(a_t) - log ref(a_t) at the sampled tokens; its sum over a response
    is an unbiased estimate of KL(pi || ref) for that prompt."""
    return logprobs - ref_logprobs


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, T) by generalised advantage estimation.

    rewards, values: (B, T) per response token; mask (B, T) True on real tokens (a response's
    tokens come first, padding after). The value after the last real token is 0 (episode end):
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t = delta_t + gamma * lam * A_{t+1}
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
    Also returns the clip fraction and approximate KL (mean of (ratio - 1) - log ratio)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": masked_mean((ratio - 1) - log_ratio, mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats
