"""Group-relative advantages: Eq. 11's quasi-norm reweighting, standard GRPO, and clipping."""

from __future__ import annotations

import torch


def center_in_group(rewards: torch.Tensor) -> torch.Tensor:
    """a_i = r_i - mean(r) inside each group; rewards have shape (prompts, G)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


def power_mean(values: torch.Tensor, p: float) -> torch.Tensor:
    """M_p(a) = (mean_k |a_k|^p)^(1/p) over the group (last) dimension, kept for broadcasting."""
    if p <= 0:
        raise ValueError(f"quasi-norm p must be > 0; got {p}")
    return values.abs().pow(p).mean(dim=-1, keepdim=True).pow(1.0 / p)


def quasi_norm_advantages(rewards: torch.Tensor, p: float = 0.8, adv_eps: float = 1e-4) -> torch.Tensor:
    """Eq. 11: A_i = a_i / (M_p(a) + adv_eps); p = 2 is standard GRPO with the population std."""
    centered = center_in_group(rewards)
    return centered / (power_mean(centered, p) + adv_eps)


def std_advantages(rewards: torch.Tensor, eps: float = 1e-4, unbiased: bool = False) -> torch.Tensor:
    """Standard GRPO: (r - mean) / (std + eps) per group (population std unless `unbiased`)."""
    return center_in_group(rewards) / (rewards.std(dim=-1, correction=1 if unbiased else 0, keepdim=True) + eps)


def clip_advantages(advantages: torch.Tensor, adv_clip: float, recenter: bool = False) -> tuple[torch.Tensor, float]:
    """Clip to [-adv_clip, adv_clip] (0 disables); optionally re-centre each group. Returns (A, clipped share)."""
    if adv_clip <= 0:
        return advantages, 0.0
    clipped_share = (advantages.abs() > adv_clip).float().mean().item()
    clipped = advantages.clamp(-adv_clip, adv_clip)
    if recenter:
        clipped = center_in_group(clipped)
    return clipped, clipped_share


def combine_reward_advantages(rewards: dict[str, torch.Tensor], weights: dict[str, float], normalize: str,
                              advantage_fn, batch_eps: float = 1e-4) -> torch.Tensor:
    """Several rewards (each (prompts, G)) to one advantage per sample:
    'each': every reward's group advantages, weighted and summed (a reward on a larger scale cannot drown the others);
    'sum': the group advantages of the weighted sum of the scores (Flow-GRPO, DiffusionNFT);
    'advantages': GDPO's form (arXiv 2601.05242): 'each', then normalised over the whole batch,
    (A - mean_batch A) / (std_batch A + batch_eps), so the advantage scale does not grow with the number of rewards
    or their weights."""
    if normalize == "each":
        return sum(weights.get(name, 1.0) * advantage_fn(value) for name, value in rewards.items())
    if normalize == "sum":
        return advantage_fn(sum(weights.get(name, 1.0) * value for name, value in rewards.items()))
    if normalize == "advantages":
        combined = sum(weights.get(name, 1.0) * advantage_fn(value) for name, value in rewards.items())
        return (combined - combined.mean()) / (combined.std(correction=0) + batch_eps)
    raise ValueError(f"reward_normalization must be 'each', 'sum' or 'advantages'; got {normalize!r}")
