"""Reward-to-candidate pairing in iteration.train_iteration: after the rollout's candidates are flattened for the
decoder and the reward and the scores viewed back to (prompts, candidates), each candidate must get its own
image's and its own prompt's reward, and the loss the advantage of that reward.

The reward depends on both the image (a fixed random projection of its pixels) and the prompt (its digit), and is
recomputed here from the rollout's own final states; a tiny built-in model keeps one iteration well under a second."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.algorithms.dance_grpo import DanceGRPOConfig
from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPOConfig
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.builtin.data import prompt_to_label
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.iteration import train_iteration

pytestmark = pytest.mark.usefixtures("single_thread")

G = 4
PROMPTS = [str(d) for d in range(10)]


def identity_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """A number that differs from image to image (a fixed projection of the pixels) plus 10 x the prompt's digit."""
    projection = torch.randn(images[0].numel(), generator=torch.Generator().manual_seed(11))
    return images.flatten(1) @ projection + 10.0 * torch.tensor([float(prompt_to_label(p)) for p in prompts])


class Recording:
    """Wraps an algorithm; keeps its rollout, the rewards its advantages saw, and the advantages each loss saw."""

    def __init__(self, inner):
        self.inner, self.config = inner, inner.config
        self.rewards, self.losses = [], []

    def rollout(self, *args, **kwargs):
        self.rollout_seen = self.inner.rollout(*args, **kwargs)
        return self.rollout_seen

    def advantages(self, rewards):
        self.rewards.append(rewards.clone())
        return self.inner.advantages(rewards)

    def loss(self, velocity, rollout, advantages, batch, reference_velocity=None):
        self.losses.append((list(rollout.prompt_indices), advantages.detach().clone()))
        return self.inner.loss(velocity, rollout, advantages, batch, reference_velocity)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def adapter():
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=1, cond_dim=16), seed=0)
    with torch.no_grad():  # the output layer starts at zero; give it weights so the candidates differ in detail
        generator = torch.Generator().manual_seed(1)
        for p in adapter.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return adapter


SMALL = {"neighbor_grpo": NeighborGRPOConfig(group_size=G, num_anchors=2, rollout_steps=4),
         "dance_grpo": DanceGRPOConfig(group_size=G, rollout_steps=4, num_minibatches=2)}


@pytest.mark.parametrize("micro_batch", [None, 1])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_candidate_gets_its_own_reward_and_advantage(adapter, name, micro_batch):
    config = load_config(None, [f"algorithm={name}", "prompts_per_iteration=3"]
                         + ([f"speed.micro_batch={micro_batch}"] if micro_batch else []))
    algorithm = Recording(ALGORITHMS[name](SMALL[name], seed=0))
    rewards = WeightedRewards({"identity": identity_reward})
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    values, skipped = train_iteration(config, adapter, rewards, algorithm, optimizer, params, None, None, PROMPTS, 2,
                                      lambda point: None)
    assert skipped == ""
    rollout = algorithm.rollout_seen
    P = len(rollout.prompts)
    # the reward of every (prompt, candidate), scored one image at a time from the rollout's own final state
    expected = torch.tensor([[float(identity_reward(adapter.decode(rollout.final[p, i][None]).clamp(0, 1),
                                                    [rollout.prompts[p]])) for i in range(G)] for p in range(P)])
    assert (expected[:, :, None] - expected[:, None, :]).abs().add(torch.eye(G)).min() > 1e-3  # all distinct
    [seen] = algorithm.rewards
    torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-4)
    assert values["reward_mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    advantages, _ = algorithm.inner.clip(algorithm.inner.advantages(expected))
    row = {index: p for p, index in enumerate(rollout.prompt_indices)}
    assert algorithm.losses
    for indices, loss_advantages in algorithm.losses:  # with micro-batches, each pass gets its prompts' rows
        torch.testing.assert_close(loss_advantages, advantages[[row[i] for i in indices]], rtol=1e-4, atol=1e-4)
