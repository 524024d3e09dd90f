"""Group-wise rewards: a reward that scores a prompt's group of samples together (`needs = ("group_ids",)`).

`pairwise_win_rate` is the reward of Pref-GRPO (Wang et al., 2025): every sample is compared with every other sample of
its group and scores the share of comparisons it wins. Pref-GRPO compares pairs with a pairwise preference judge;
here any pointwise reward is the comparator (i beats j when it scores higher; ties count half, or, with a
`temperature`, the Bradley-Terry probability sigmoid((s_i - s_j) / temperature)). Win rates are bounded and
centred (a group's mean is always 1/2), so a reward model's scale and drift cannot leak into the advantages.
"""

from __future__ import annotations

from typing import Sequence

import torch

from neighbor_grpo.rewards import build_rewards, check_scores, register_reward, reward_needs, score_one


def win_rates(scores: torch.Tensor, group_ids: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """Each sample's share of wins against the other members of its group (1/2 for a group of one)."""
    difference = scores[:, None] - scores[None, :]
    if temperature > 0:
        wins = torch.sigmoid(difference / temperature)
    else:
        wins = (difference > 0).float() + 0.5 * (difference == 0).float()
    same_group = group_ids[:, None] == group_ids[None, :]
    others = same_group & ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    count = others.sum(dim=1)
    rates = (wins * others).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, rates, torch.full_like(rates, 0.5))


class PairwiseWinRate:
    """Win rate within the group, judged by a pointwise comparator reward."""

    def __init__(self, comparator, comparator_name: str, temperature: float = 0.0):
        self.comparator, self.comparator_name, self.temperature = comparator, comparator_name, temperature
        self.needs = tuple(sorted({"group_ids"} | (reward_needs(comparator, comparator_name) - {"video"})))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor,
                 **inputs) -> torch.Tensor:
        inputs["group_ids"] = group_ids
        scores = check_scores(score_one(self.comparator_name, self.comparator, images, prompts, inputs),
                              len(prompts), self.comparator_name)
        return win_rates(scores, group_ids.to(scores.device), self.temperature)


@register_reward("pairwise_win_rate")
def make_pairwise_win_rate(comparator: dict, temperature: float = 0.0,
                           device: str | torch.device = "cpu") -> PairwiseWinRate:
    """`comparator`: a reward entry {name, kwargs} (any registered reward or dotted path)."""
    if not isinstance(comparator, dict) or "name" not in comparator:
        raise ValueError(f"pairwise_win_rate: comparator must be a reward entry {{name, kwargs}}, got {comparator!r}")
    if temperature < 0:
        raise ValueError(f"pairwise_win_rate: temperature must be >= 0 (0: hard wins), got {temperature}")
    built = build_rewards([{"name": comparator["name"], "kwargs": comparator.get("kwargs") or {}}], device=device)
    (name, reward), = built.rewards.items()
    return PairwiseWinRate(reward, name, temperature)
