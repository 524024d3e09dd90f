"""The SDE baselines off-policy, where the PPO clip binds, and Flow-GRPO's KL term on known inputs.

The on-policy tests (tests/algorithms/test_sde_baselines.py) run at ratio 1, where min and max of the clipped and
unclipped surrogates agree; here the parameters move after the rollout, so the log-ratios leave the clip range and
the loss must be the PPO formula -mean(min(A rho, A clip(rho, 1 - eps, 1 + eps))), computed by hand from the
stored (old) log-probs and log-probs recomputed with torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

from neighbor_grpo.algorithms.common import Minibatch
from neighbor_grpo.algorithms.dance_grpo import DanceGRPO, DanceGRPOConfig
from neighbor_grpo.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from neighbor_grpo.algorithms.mix_grpo import MixGRPO, MixGRPOConfig

from tiny_velocity import LATENT, TinyVelocity  # tests/algorithms/tiny_velocity.py

P, G = 2, 4

pytestmark = pytest.mark.usefixtures("single_thread")


def algorithms(eps_clip: float):
    return {
        "flow_grpo": FlowGRPO(FlowGRPOConfig(group_size=G, rollout_steps=4, num_minibatches=1, eps_clip=eps_clip), seed=3),
        "dance_grpo": DanceGRPO(DanceGRPOConfig(group_size=G, rollout_steps=6, num_minibatches=1, eps_clip=eps_clip),
                                seed=3),
        "mix_grpo": MixGRPO(MixGRPOConfig(group_size=G, rollout_steps=8, window_size=2, window_interval=2,
                                          num_minibatches=1, eps_clip=eps_clip), seed=3),
    }


def hand_ppo_loss(algorithm, net, rollout, advantages, batch, eps_clip):
    """-mean over samples of min(A rho, A clip(rho)), averaged over the batch's steps; also the clipped share."""
    cond = rollout.cond.repeat_interleave(G)
    losses, clipped = [], []
    for j in batch.steps:
        x = rollout.states[j].reshape(P * G, *LATENT)
        x_next = rollout.states[j + 1].reshape(P * G, *LATENT)
        with torch.no_grad():
            mean, std = algorithm._mean_std(x, net(x, rollout.sigmas[j], cond), j, rollout)
        new = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
        old = rollout.log_probs[j].reshape(P * G)
        rho = (new - old).exp()
        A = advantages.reshape(P * G)
        surrogate = [min(float(a * r), float(a * min(max(r, 1 - eps_clip), 1 + eps_clip))) for a, r in zip(A, rho)]
        losses.append(-sum(surrogate) / len(surrogate))
        clipped.append(float(((rho - 1).abs() > eps_clip).double().mean()))
    return sum(losses) / len(losses), sum(clipped) / len(clipped)


@pytest.mark.parametrize("eps_clip", [1e-4, 0.02])
@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo"])
def test_off_policy_loss_is_the_ppo_formula_where_the_clip_binds(name, eps_clip):
    torch.manual_seed(5)
    net = TinyVelocity()
    algorithm = algorithms(eps_clip)[name]
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["0", "2"], [0, 1], 2, LATENT)
    [batch] = algorithm.minibatches(rollout, 2)
    assert torch.equal(batch.members, torch.arange(G).expand(P, G))  # one minibatch: every candidate
    rollout = algorithm.prepare_old_policy(net, rollout, [batch])
    with torch.no_grad():  # the policy moves after the rollout: the stored log-probs are now the old policy's
        for parameter in net.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    advantages = torch.tensor([[1.5, -0.5, 0.8, -1.8], [-1.0, 2.0, -0.7, -0.3]])
    loss, stats = algorithm.loss(net, rollout, advantages, batch)
    expected, clipped_share = hand_ppo_loss(algorithm, net, rollout, advantages, batch, eps_clip)
    assert clipped_share > 0.25  # the clip binds on a good share of the samples
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(clipped_share)
    # the test tells min from max: the pessimistic bound differs from the optimistic one here
    optimistic = -hand_ppo_loss(algorithm, net, rollout, -advantages, batch, eps_clip)[0]
    assert abs(optimistic - expected) > 1e-3


@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo"])
def test_off_policy_gradient_vanishes_where_the_clip_holds(name):
    """Advantages with the sign of (rho - 1) put every sample on the clipped branch of min(): no gradient. With the
    opposite signs every sample is on the unclipped branch: a gradient."""
    torch.manual_seed(6)
    net = TinyVelocity()
    algorithm = algorithms(1e-4)[name]
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["0", "2"], [0, 1], 2, LATENT)
    [batch] = algorithm.minibatches(rollout, 2)
    batch = Minibatch(steps=batch.steps[:1], members=batch.members)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        j = batch.steps[0]
        x = rollout.states[j].reshape(P * G, *LATENT)
        mean, std = algorithm._mean_std(x, net(x, rollout.sigmas[j], rollout.cond.repeat_interleave(G)), j, rollout)
        new = torch.distributions.Normal(mean, std).log_prob(rollout.states[j + 1].reshape(P * G, *LATENT)).mean((1, 2, 3))
    log_ratio = new - rollout.log_probs[j].reshape(P * G)
    assert (log_ratio.abs() > 2e-4).all()  # every ratio is outside [1 - 1e-4, 1 + 1e-4]
    for sign, expect_gradient in ((1.0, False), (-1.0, True)):
        net.zero_grad()
        loss, _ = algorithm.loss(net, rollout, sign * torch.sign(log_ratio).view(P, G), batch)
        loss.backward()
        largest = max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)
        assert (largest > 1e-6) == expect_gradient, (sign, largest)


# ---- Flow-GRPO's KL to the reference model on known inputs ------------------------------------------------------

class ConstantVelocity(nn.Module):
    """v(x) = c everywhere: the step means of two such models differ by (c - c_ref) (1 + sigma_t^2 (1 - s) / 2s) dt."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value, dtype=torch.float64))

    def forward(self, x, s, cond):
        return self.value.to(x.dtype).expand(x.shape)


def test_flow_grpo_kl_is_the_references_formula_on_constant_velocities():
    """train_sd3.py: ((mean - mean_ref)^2).mean(latent dims) / (2 std_dev_t^2), std_dev_t = a sqrt(s / (1 - s))
    (s_1 in the denominator at s = 1), not divided by the transition variance std_dev_t^2 |dt|; times kl_beta,
    averaged over samples and trained steps. With advantages 0 it is the whole loss."""
    a, beta, c, c_ref = 0.7, 0.04, 0.9, -0.4
    algorithm = FlowGRPO(FlowGRPOConfig(group_size=G, rollout_steps=4, num_minibatches=1, kl_beta=beta, noise_level=a))
    net, reference = ConstantVelocity(c), ConstantVelocity(c_ref)
    rollout = algorithm.rollout(net, torch.tensor([0, 1]), ["0", "1"], [0, 1], 0, LATENT)
    rollout = rollout._replace(states=rollout.states.double(), log_probs=rollout.log_probs.double())
    [batch] = algorithm.minibatches(rollout, 0)
    assert batch.steps == [0, 1, 2]  # every SDE step, the first one from s = 1 included
    grid = [float(s) for s in rollout.sigmas]
    kl_values, gradients = [], []
    for j in batch.steps:
        s, dt = grid[j], grid[j + 1] - grid[j]
        sigma_t = a * math.sqrt(s / (1 - (grid[1] if s == 1 else s)))
        factor = (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt  # d mean / d v
        kl_values.append((c - c_ref) ** 2 * factor**2 / (2 * sigma_t**2))
        gradients.append(2 * (c - c_ref) * factor**2 / (2 * sigma_t**2))
    expected = beta * sum(kl_values) / len(kl_values)
    loss, stats = algorithm.loss(net, rollout, torch.zeros(P, G, dtype=torch.float64), batch, reference_velocity=reference)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(stats["kl_loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(net.value.grad) == pytest.approx(beta * sum(gradients) / len(gradients), rel=1e-6)
    assert reference.value.grad is None
    # kl_beta 0 (the reference's base config) drops the term
    off = FlowGRPO(FlowGRPOConfig(group_size=G, rollout_steps=4, num_minibatches=1, kl_beta=0.0, noise_level=a))
    loss_off, _ = off.loss(net, rollout, torch.zeros(P, G, dtype=torch.float64), batch, reference_velocity=reference)
    assert float(loss_off.detach()) == 0.0
