"""Group-wise rewards: pairwise_win_rate scores each sample by its wins against the rest of its group (Pref-GRPO),
with any pointwise reward as the comparator; in training each chunk holds whole groups, so it sees them whole."""

from __future__ import annotations

import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.group_rewards import win_rates
from neighbor_grpo.training.iteration import train_iteration
from neighbor_grpo.training.parts import build_training_parts


def test_win_rates_count_wins_and_half_ties_within_each_group_only():
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 9.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert win_rates(scores, groups).tolist() == [1.0, 0.0, 0.5, 0.5, 0.5, 0.5]  # a group of one: 1/2
    soft = win_rates(scores, groups, temperature=2.0)
    torch.testing.assert_close(soft[0], (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(0.5))) / 2)


def test_pairwise_win_rate_from_a_registered_comparator():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, groups = ["a"] * 6, torch.tensor([4, 4, 4, 9, 9, 9])
    spec = {"name": "pairwise_win_rate", "kwargs": {"comparator": {"name": "jpeg_compressibility",
                                                                   "kwargs": {"quality": 80}}}}
    rewards = build_rewards([spec])
    assert rewards.rewards["pairwise_win_rate"].needs == ("group_ids",)
    rates = rewards.score(images, prompts, group_ids=groups)["pairwise_win_rate"]
    sizes = build_rewards([spec["kwargs"]["comparator"]]).score(images, prompts)["jpeg_compressibility"]
    for i in range(6):  # by hand: wins against the two others of the group
        others = [j for j in range(6) if groups[j] == groups[i] and j != i]
        expected = sum(float(sizes[i] > sizes[j]) + 0.5 * float(sizes[i] == sizes[j]) for j in others) / 2
        assert rates[i] == expected
    assert rates.view(2, 3).mean(dim=1).tolist() == [0.5, 0.5]


CALLS: list[int] = []


def brightness_comparator():
    """A pointwise comparator named by dotted path; records each call's batch size."""
    def brightness(images, prompts):
        CALLS.append(len(prompts))
        return images.mean(dim=(1, 2, 3))
    return brightness


def test_in_training_every_group_is_scored_whole_in_both_scoring_orders(single_thread):
    """Chunks of one group, scored in turn or overlapped: win rates average exactly 1/2 per group, so reward_mean
    is 1/2; a group cut across two calls would not give that."""
    for overlap in ("false", "true"):
        config = load_config(None, ["prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                                    "neighbor_grpo.rollout_steps=4", "speed.rollout_chunk=1",
                                    f"speed.async_scoring={overlap}"])
        adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
        CALLS.clear()
        rewards = build_rewards([{"name": "pairwise_win_rate",
                                  "kwargs": {"comparator": {"name": f"{__name__}:brightness_comparator"}}}])
        parts = build_training_parts(config, adapter)
        values, skipped = train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params,
                                          parts.ema, parts.reference_velocity, list(config.prompts.train), 0,
                                          lambda point: None, parts=parts)
        assert not skipped and values["reward_mean"] == 0.5 and CALLS == [4, 4]
        assert values["reward_std"] > 0
