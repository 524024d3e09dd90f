"""neighbor_grpo/training/iteration.py: rollout and scoring per chunk of whole groups give the one-chunk iteration."""

from __future__ import annotations

import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.iteration import group_chunks, train_iteration
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.rewards import WeightedRewards


def test_group_chunks_cover_the_slots_in_order():
    assert group_chunks(range(2, 7), 2) == [range(2, 4), range(4, 6), range(6, 7)]
    assert group_chunks(range(0, 3), None) == [range(0, 3)]


def one_iteration(chunk: int | None):
    config = load_config(None, ["prompts_per_iteration=3", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                                "neighbor_grpo.rollout_steps=4", "optim.lr=1e-2",
                                f"speed.rollout_chunk={'null' if chunk is None else chunk}"])
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    seen = []

    def reward(images, prompts):  # pairs each score with its own image: candidate order must survive the chunks
        seen.append(list(prompts))
        return images.mean(dim=(1, 2, 3))

    rewards = WeightedRewards({"brightness": reward}, {"brightness": 1.0})
    parts = build_training_parts(config, adapter)
    values, skipped = train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params,
                                      parts.ema, parts.reference_velocity, list(config.prompts.train), 0,
                                      lambda point: None, parts=parts)
    return values, skipped, [p.detach().clone() for p in adapter.net.parameters()], seen


def test_chunked_rollout_equals_one_chunk():
    whole, skipped, params, seen_whole = one_iteration(None)
    chunked, skipped_chunked, params_chunked, seen_chunked = one_iteration(1)
    assert not skipped and not skipped_chunked
    assert len(seen_whole) == 1 and len(seen_chunked) == 3  # one scoring call per chunk
    assert sum(seen_chunked, []) == seen_whole[0]
    for key in ("reward_mean", "reward_std", "loss"):
        assert abs(whole[key] - chunked[key]) < 1e-5, key
    for a, b in zip(params, params_chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
