"""speed.async_scoring: decoding and scoring chunk k in a worker thread while chunk k+1 rolls out gives the same
iteration as scoring in turn, bit for bit on CPU, and really overlaps the two."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.rewards.retry import RewardFailed, with_retries
from neighbor_grpo.training.iteration import rollouts_and_scores, train_iteration
from neighbor_grpo.training.parts import build_training_parts

SETTINGS = ["prompts_per_iteration=3", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
            "neighbor_grpo.rollout_steps=4", "optim.lr=1e-2", "speed.rollout_chunk=1"]


class TinyNetReward:
    """A real (random, fixed) convolutional reward: every bit of the images moves its scores."""

    def __init__(self, channels: int = 1):
        generator = torch.Generator().manual_seed(5)
        self.conv = torch.randn(4, channels, 3, 3, generator=generator)
        self.head = torch.randn(4, generator=generator)
        self.threads: list[str] = []

    def __call__(self, images, prompts):
        self.threads.append(threading.current_thread().name)
        features = torch.nn.functional.conv2d(images, self.conv, padding=1).tanh().mean(dim=(2, 3))
        return (features @ self.head).sigmoid()


def run_iterations(async_scoring: bool, iterations: int = 3, reward=None):
    config = load_config(None, SETTINGS + [f"speed.async_scoring={str(async_scoring).lower()}"])
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    reward = reward or TinyNetReward()
    rewards = with_retries(WeightedRewards({"net": reward}, {"net": 1.0}))
    parts = build_training_parts(config, adapter)
    logs = []
    for iteration in range(iterations):
        values, skipped = train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params,
                                          parts.ema, parts.reference_velocity, list(config.prompts.train), iteration,
                                          lambda point: None, parts=parts)
        logs.append((values, skipped))
    return logs, [p.detach().clone() for p in adapter.net.parameters()], reward


def test_async_scoring_gives_bit_identical_weights_and_logs(single_thread):
    sync_logs, sync_params, sync_reward = run_iterations(False)
    async_logs, async_params, async_reward = run_iterations(True)
    for a, b in zip(sync_params, async_params):
        assert torch.equal(a, b)
    for (values, skipped), (values_async, skipped_async) in zip(sync_logs, async_logs):
        assert skipped == skipped_async == ""
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "adv_clipped_share"):
            assert values[key] == values_async[key], key
    assert set(sync_reward.threads) == {"MainThread"}
    assert all(name.startswith("ngrpo-scoring") for name in async_reward.threads)
    assert len(async_reward.threads) == 3 * 3  # one call per chunk (3 chunks of 1 group) per iteration


def test_a_nan_score_skips_the_update_in_both_orders(single_thread):
    class NanOnSecondCall(TinyNetReward):
        def __call__(self, images, prompts):
            scores = super().__call__(images, prompts)
            return scores * float("nan") if len(self.threads) == 2 else scores

    for overlap in (False, True):
        logs, params, _ = run_iterations(overlap, iterations=1, reward=NanOnSecondCall())
        values, skipped = logs[0]
        assert skipped.startswith("reward scores: reward 'net' returned 4 non-finite"), skipped
        assert values == {}


def test_a_failing_reward_raises_through_the_worker(single_thread):
    def broken(images, prompts):
        raise ConnectionError("reward server unreachable")

    with pytest.warns(UserWarning, match="retrying once"), pytest.raises(RewardFailed, match="failed twice"):
        run_iterations(True, iterations=1, reward=broken)


def test_scoring_overlaps_the_next_rollout():
    """Rollouts of 0.2 s and scorings of 0.2 s: four chunks take about 5 x 0.2 s overlapped, 8 x 0.2 s in turn."""
    def roll(chunk):
        time.sleep(0.2)
        return chunk

    def score(piece):
        time.sleep(0.2)
        return {"r": torch.tensor([float(piece.start)])}, None, ""

    timings = {}
    for overlap in (False, True):
        started = time.perf_counter()
        pieces, scored = rollouts_and_scores([range(i, i + 1) for i in range(4)], roll, score, overlap)
        timings[overlap] = time.perf_counter() - started
        assert pieces == [range(i, i + 1) for i in range(4)]
        assert [float(s["r"]) for s, _, _ in scored] == [0.0, 1.0, 2.0, 3.0]
    assert timings[False] >= 1.6 and timings[True] < 1.4, timings
