"""ModelCallCounter (training/iteration.py): per-sample forward passes of the velocity net, split by grad mode."""

import math

import pytest
import torch
from torch import nn

from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPO, NeighborGRPOConfig
from neighbor_grpo.training.iteration import ModelCallCounter

LATENT = (1, 4, 4)
D = math.prod(LATENT)


pytestmark = pytest.mark.usefixtures("single_thread")


class TinyVelocity(nn.Module):
    """v(x, s, label): an MLP over the flattened latent, the flow time and an embedded integer label."""

    def __init__(self, seed: int = 0, classes: int = 4, hidden: int = 16):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(classes, 4)
            self.mlp = nn.Sequential(nn.Linear(D + 1 + 4, hidden), nn.SiLU(), nn.Linear(hidden, D))

    def forward(self, x, s, cond):
        n = x.shape[0]
        s_column = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1).expand(n, 1)
        return self.mlp(torch.cat([x.reshape(n, -1), s_column, self.embed(cond)], dim=1)).reshape(x.shape)


def call(net, n):
    return net(torch.randn(n, *LATENT), torch.tensor(0.5), torch.zeros(n, dtype=torch.long))


def test_counter_splits_no_grad_and_with_grad_samples():
    net = TinyVelocity()
    counter = ModelCallCounter(net)
    with torch.no_grad():
        call(net, 5)
        call(net, 2)
    with torch.inference_mode():
        call(net, 4)
    out = call(net, 3)  # grad enabled: a training pass
    out.sum().backward()  # backward passes are not forward passes
    call(net, 1)
    # per-sample counts; the submodules' own forwards are not counted again
    assert (counter.no_grad, counter.train) == (11, 4)
    assert counter.reset() == (11, 4)  # (no_grad, train), then zeroed
    assert (counter.no_grad, counter.train) == (0, 0)
    call(net, 6)
    assert counter.reset() == (0, 6)
    counter.remove()
    call(net, 7)
    with torch.no_grad():
        call(net, 7)
    assert counter.reset() == (0, 0)


def test_counter_around_a_neighbor_grpo_iteration():
    P, G, B, N = 2, 6, 2, 8
    net = TinyVelocity()
    counter = ModelCallCounter(net)
    for old_policy, extra in (("rollout", 0), ("recompute", 1)):
        algorithm = NeighborGRPO(NeighborGRPOConfig(group_size=G, num_anchors=B, rollout_steps=N, old_policy=old_policy,
                                                    rollout_solver="dpm++2m"), seed=0)
        K = algorithm.config.trained_steps
        cond = torch.arange(P)
        rollout = algorithm.rollout(net, cond, ["a", "b"], [0, 1], 0, LATENT)
        assert counter.reset() == (N * P * G, 0)
        batches = algorithm.minibatches(rollout, 0)
        rollout = algorithm.prepare_old_policy(net, rollout, batches)
        advantages = torch.randn(P, G)
        advantages -= advantages.mean(-1, keepdim=True)
        for batch in batches:
            loss, _ = algorithm.loss(net, rollout, advantages, batch)
            loss.backward()
        assert counter.reset() == (extra * K * P * B, K * P * B)
    counter.remove()
