"""Neighbor GRPO's reference anchoring (config.ref_beta, on by default): its value and its gradient.

On a linear velocity v(x) = x W the term beta * mean ||v_theta - v_ref||^2 at the anchor states has a closed-form
gradient, 2 beta X^T (X W - X W_ref) / (n D), checked against autograd through NeighborGRPO.loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPO, NeighborGRPOConfig

LATENT = (1, 3, 3)
D = math.prod(LATENT)
P, G, B, N = 2, 5, 3, 4

pytestmark = pytest.mark.usefixtures("single_thread")


class LinearVelocity(nn.Module):
    """v(x, s, cond) = flatten(x) W: no bias, no dependence on s or cond, so the anchoring gradient is closed-form."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.3 * torch.randn(D, D, generator=generator, dtype=torch.float64))

    def forward(self, x, s, cond):
        return (x.reshape(x.shape[0], -1).to(self.weight.dtype) @ self.weight).to(x.dtype).reshape(x.shape)


def setup(ref_beta=1.0, **config):
    algorithm = NeighborGRPO(NeighborGRPOConfig(group_size=G, num_anchors=B, rollout_steps=N, ref_beta=ref_beta,
                                                train_step_fraction=0.5, **config), seed=1)
    net, reference = LinearVelocity(0), LinearVelocity(1)
    rollout = algorithm.rollout(net, torch.zeros(P, dtype=torch.long), ["a", "b"], [0, 1], 0, LATENT)
    rollout = rollout._replace(states=rollout.states.double(), velocities=rollout.velocities.double())
    return algorithm, net, reference, rollout, algorithm.minibatches(rollout, 0)


def anchor_states(rollout, batch) -> torch.Tensor:
    """(P * B, D) the anchors' stored states at the batch's step, gathered by plain indexing."""
    [j] = batch.steps
    return torch.stack([rollout.states[j][p, int(a)] for p in range(P) for a in batch.members[p]]).reshape(-1, D)


@pytest.mark.parametrize("ref_beta", [1.0, 0.3])
def test_anchoring_value_and_gradient_with_zero_advantages(ref_beta):
    """A = 0 leaves only the anchoring term: loss = beta * mean (v - v_ref)^2, dL/dW = 2 beta X^T (v - v_ref) / (nD)."""
    algorithm, net, reference, rollout, batches = setup(ref_beta)
    assert len(batches) == 2
    for batch in batches:
        net.zero_grad()
        loss, _ = algorithm.loss(net, rollout, torch.zeros(P, G, dtype=torch.float64), batch, reference_velocity=reference)
        loss.backward()
        X = anchor_states(rollout, batch)
        difference = X @ net.weight.detach() - X @ reference.weight.detach()  # v_theta - v_ref, (n, D)
        expected_value = ref_beta * difference.pow(2).mean()
        expected_grad = 2 * ref_beta * X.T @ difference / difference.numel()
        assert float(expected_value) > 1e-3  # the two models differ: the term is not trivially zero
        torch.testing.assert_close(loss.detach(), expected_value)
        torch.testing.assert_close(net.weight.grad, expected_grad)
        assert reference.weight.grad is None  # the reference is frozen: no gradient flows into it


def test_anchoring_gradient_with_respect_to_the_velocity_is_2_beta_difference_over_n():
    """Checked on v_theta itself: a velocity function that keeps its output lets autograd give dL/dv."""
    ref_beta = 0.7
    algorithm, net, reference, rollout, batches = setup(ref_beta)
    outputs = []

    def recording(x, s, cond):
        v = net(x, s, cond)
        v.retain_grad()
        outputs.append(v)
        return v

    batch = batches[0]
    loss, _ = algorithm.loss(recording, rollout, torch.zeros(P, G, dtype=torch.float64), batch, reference_velocity=reference)
    loss.backward()
    [v] = outputs
    X = anchor_states(rollout, batch)
    difference = (X @ net.weight.detach() - X @ reference.weight.detach()).reshape(v.shape)
    torch.testing.assert_close(v.grad, 2 * ref_beta * difference / difference.numel())


def test_anchoring_adds_exactly_its_term_to_the_policy_loss():
    """With real advantages: loss(with reference) - loss(without) is the anchoring term; ref_beta 0 turns it off."""
    algorithm, net, reference, rollout, batches = setup(2.0)
    advantages = torch.tensor([[1.0, -0.5, 0.2, -1.2, 0.5], [0.3, 0.3, -0.9, 0.1, 0.2]], dtype=torch.float64)
    off = NeighborGRPO(NeighborGRPOConfig(group_size=G, num_anchors=B, rollout_steps=N, ref_beta=0.0,
                                          train_step_fraction=0.5), seed=1)
    for batch in batches:
        with_reference, _ = algorithm.loss(net, rollout, advantages, batch, reference_velocity=reference)
        without, _ = algorithm.loss(net, rollout, advantages, batch)
        disabled, _ = off.loss(net, rollout, advantages, batch, reference_velocity=reference)
        X = anchor_states(rollout, batch)
        term = 2.0 * (X @ net.weight.detach() - X @ reference.weight.detach()).pow(2).mean()
        torch.testing.assert_close(with_reference.detach() - without.detach(), term)
        torch.testing.assert_close(disabled.detach(), without.detach())


def test_anchoring_is_on_by_default():
    assert NeighborGRPOConfig().ref_beta == 1.0
