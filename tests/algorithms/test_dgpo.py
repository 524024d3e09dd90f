"""DGPO's property tests (competitors.md 5.3): the policy loss is the gradient of the group preference
-log sigmoid(-S_g) up to G / (beta_dpo B); w_g = 1/2 at the reference, so there the gradient is half the
advantage-weighted flow-matching gradient; at theta = theta_old the ratio is exactly 1 and nothing is gated; shared
noise per group; the gate detaches exactly the over-confident side; the training times, the flow-sigma grid, the
EMA-old schedule and the switch of the rollout policy."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.algorithms.common import Rollout
from neighbor_grpo.algorithms.dgpo import (DGPO, GRID_START, DGPOConfig, dgpo_policy_loss, ema_old_decay,
                                           flow_matching_losses, gated, group_preference_nll, group_scores,
                                           group_weights, likelihood_ratio, overconfident, training_indices,
                                           training_noises)
from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import keyed_generator

P, G, D = 3, 5, 16


def draw(seed: int = 0):
    """(P, G, D) velocity target, a policy velocity and a reference one, and zero-mean-ish advantages (P, G)."""
    g = torch.Generator().manual_seed(seed)
    target, v, v_ref = (torch.randn(P, G, D, generator=g, dtype=torch.float64) for _ in range(3))
    a = torch.randn(P, G, generator=g, dtype=torch.float64)
    return target, v, v_ref, a - a.mean(-1, keepdim=True)


@pytest.mark.parametrize("beta_dpo", [10.0, 100.0, 0.5])
def test_gradient_is_the_group_preference_gradient(beta_dpo):
    """Gate off, kl_beta 0: grad L = (G / (beta_dpo B)) sum_g grad(-log sigmoid(-S_g)), B = P G."""
    target, v0, v_ref, a = draw(1)
    v0 = v0 * 0.3 + target * 0.7  # not at the reference: the weights differ from 1/2 and between groups
    l_ref = flow_matching_losses(v_ref, target)
    v = v0.clone().requires_grad_(True)
    dgpo_policy_loss(a, flow_matching_losses(v, target), l_ref, beta_dpo, G).backward()
    w = v0.clone().requires_grad_(True)
    group_preference_nll(group_scores(a, flow_matching_losses(w, target), l_ref, beta_dpo, G)).sum().backward()
    torch.testing.assert_close(v.grad, G / (beta_dpo * P * G) * w.grad, rtol=1e-10, atol=1e-14)
    weights = group_weights(group_scores(a, flow_matching_losses(v0, target), l_ref, beta_dpo, G))
    assert weights.std() > 1e-3  # the test exercises unequal group weights


def test_weight_is_one_half_at_the_reference_and_the_gradient_is_advantage_weighted_flow_matching():
    target, _, v_ref, a = draw(2)
    l_ref = flow_matching_losses(v_ref, target)
    assert torch.equal(group_weights(group_scores(a, l_ref, l_ref, 10.0, G)), torch.full((P,), 0.5, dtype=torch.float64))
    v = v_ref.clone().requires_grad_(True)
    dgpo_policy_loss(a, flow_matching_losses(v, target), l_ref, 10.0, G).backward()
    w = v_ref.clone().requires_grad_(True)
    (0.5 * a * flow_matching_losses(w, target)).mean().backward()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-12, atol=1e-15)


class Linear(torch.nn.Module):
    """v(x, s, c) = W x + s b + c: the same weights give the same velocities bitwise."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(0.3 * torch.randn(D, D, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(D, generator=g))

    def forward(self, x, s, cond):
        return x @ self.weight.T + s.view(-1, 1) * self.bias + cond


def tiny_rollout(seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    return Rollout(["a", "b", "c"], [0, 1, 2], torch.randn(P, D, generator=g), sigma_grid(10, 3.0, start=GRID_START),
                   torch.randn(2, P, G, D, generator=g), torch.zeros(1, P, G, D))


@pytest.mark.parametrize("at", ["old", "reference"])
def test_loss_gradient_at_the_old_policy_and_at_the_reference(at):
    """theta = theta_old: rho = 1 exactly, nothing gated, grad = grad mean_i w_g A_i l_i (+ the KL's, 0 at the
    reference). theta = reference: w_g = 1/2, grad = 1/2 grad mean_i A_i l_i (advantage-weighted flow matching)."""
    net, other = Linear(0), Linear(1)
    reference = net if at == "reference" else other
    algorithm = DGPO(DGPOConfig(group_size=G, kl_beta=0.0 if at == "old" else 1e-3), seed=0)
    algorithm.attach({"ema_old": lambda x, s, c: net(x, s, c)}, {"ema_old": net})
    data, a = tiny_rollout(), draw(3)[3].float()
    [batch] = algorithm.minibatches(data, iteration=4)
    loss, stats = algorithm.loss(net, data, a, batch, reference_velocity=lambda x, s, c: reference(x, s, c))
    assert stats["clip_fraction"] == 0  # rho = 1 bitwise: the gate never fires
    if at == "reference":
        assert stats["group_weight"] == pytest.approx(0.5, abs=1e-7)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    # the same gradient written out: per time, advantage-weighted flow matching with the group weights
    expected = 0.0
    x0 = data.final
    for j in batch.steps:
        eps = training_noises((D,), j, 0, 4, data.prompt_indices, batch.members, True, "cpu")
        s = data.sigmas[j].expand(P, G)
        x_s = (1 - s[..., None]) * x0 + s[..., None] * eps
        flat = lambda t: t.reshape(P * G, D)
        v = net(flat(x_s), s.reshape(-1), data.cond.repeat_interleave(G, 0)).view(P, G, D)
        l = flow_matching_losses(v, eps - x0)
        with torch.no_grad():
            l_ref = flow_matching_losses(reference(flat(x_s), s.reshape(-1), data.cond.repeat_interleave(G, 0)).view(P, G, D),
                                         eps - x0)
        w = torch.sigmoid((a * 10.0 * (l.detach() - l_ref) / G).sum(-1)) if at == "old" else torch.full((P,), 0.5)
        expected = expected + (w[:, None] * a * l).mean()
    torch.testing.assert_close(grads, torch.autograd.grad(expected / len(batch.steps), list(net.parameters())))


def test_shared_noise_is_one_per_group_and_keyed():
    members = torch.arange(4).expand(3, -1)
    noise = training_noises((6,), 2, 0, 7, [10, 11, 12], members, True, "cpu")
    assert all(torch.equal(noise[p, i], noise[p, 0]) for p in range(3) for i in range(4))
    assert not torch.equal(noise[0, 0], noise[1, 0]) and not torch.equal(noise[1, 0], noise[2, 0])
    assert not torch.equal(noise[0, 0], training_noises((6,), 3, 0, 7, [10], members[:1], True, "cpu")[0, 0])  # per time
    assert torch.equal(training_noises((6,), 2, 0, 7, [11], members[:1, 1:3], True, "cpu")[0, 0], noise[1, 0])
    own = training_noises((6,), 2, 0, 7, [10, 11, 12], members, False, "cpu")
    assert not torch.equal(own[0, 0], own[0, 1])


def test_gate_detaches_exactly_the_over_confident_side():
    a = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 0.0])
    ratio = torch.tensor([1.2, 1.01, 0.5, 0.7, 0.99, 1.5, 0.8, 1.3])
    mask = overconfident(a, ratio, 0.05)
    assert mask.tolist() == [True, False, False, True, False, False, True, False]  # A <= 0 counts as negative
    losses = torch.rand(8, dtype=torch.float64).requires_grad_(True)
    kept = gated(losses, mask)
    assert torch.equal(kept, losses.detach())
    (kept * torch.arange(1.0, 9.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(losses.grad == 0, mask)
    l, l_old = torch.tensor([0.3, 0.5]), torch.tensor([0.5, 0.3])
    torch.testing.assert_close(likelihood_ratio(l, l_old), torch.exp(torch.tensor([0.2, -0.2])))


def test_training_times_are_distinct_indices_up_to_trunc_and_shared():
    seen = set()
    for seed in range(300):
        index = training_indices(6, 4, keyed_generator(seed))
        assert len(set(index)) == 4 and all(0 <= j <= 6 for j in index)
        seen |= set(index)
    assert seen == set(range(7))  # trunc_steps itself included (range(trunc_steps + 1))
    algorithm = DGPO(DGPOConfig(group_size=G, num_minibatches=2), seed=3)
    batches = algorithm.minibatches(tiny_rollout(), 5)
    assert [len(b.steps) for b in batches] == [2, 2] and len({j for b in batches for j in b.steps}) == 4
    assert all(torch.equal(b.members, torch.arange(G).expand(P, -1)) for b in batches)  # whole groups
    assert [b.steps for b in DGPO(DGPOConfig(group_size=G, num_minibatches=2), seed=3).minibatches(tiny_rollout(), 5)] \
        == [b.steps for b in batches]


def test_flow_sigma_grid_of_the_reference():
    """flip(shift(1 - linspace(1, 1/1000, N + 1)))[:-1] then 0, shift 3 (competitors.md 5.1)."""
    expected = [.9997, .9639, .9227, .8746, .8178, .7496, .6663, .5621, .4283, .2498, 0.0]
    torch.testing.assert_close(sigma_grid(10, 3.0, start=GRID_START), torch.tensor(expected), atol=6e-5, rtol=0)


def test_ema_old_follows_after_every_step_and_the_rollout_switches_to_it():
    assert [ema_old_decay(k, 0.3) for k in (0, 100, 300, 5000)] == [0.0, pytest.approx(0.1), 0.3, 0.3]
    net, old = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3).requires_grad_(False)
    algorithm = DGPO(DGPOConfig(group_size=G, num_minibatches=2), seed=0)
    algorithm.attach({"ema_old": None}, {"ema_old": old})
    algorithm.steps.plan(iteration=0, planned=2)
    algorithm.after_step(net)  # k = 0 before it: d = 0, the old policy is the current one
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), net.parameters()))
    algorithm.steps.plan(iteration=150, planned=2)
    start = [p.clone() for p in old.parameters()]
    with torch.no_grad():
        net.weight.add_(1.0)
    algorithm.after_step(net)  # k = 300 before it: d = 0.3
    for updated, s0, current in zip(old.parameters(), start, net.parameters()):
        torch.testing.assert_close(updated, 0.3 * s0 + 0.7 * current.detach())
    switching = DGPO(DGPOConfig(switch_ema_ref=200, num_minibatches=1))
    assert not switching.rolls_out_with_old(200) and switching.rolls_out_with_old(201)


def test_a_group_split_over_processes_is_refused():
    algorithm = DGPO(DGPOConfig(group_size=G), seed=0)
    data = tiny_rollout()
    [batch] = algorithm.minibatches(data, 0)
    batch.members = batch.members[:, :2]
    with pytest.raises(ValueError, match="prompts_per_iteration >= the number of processes"):
        algorithm.loss(Linear(0), data, torch.zeros(P, G), batch, reference_velocity=Linear(1))


@pytest.mark.parametrize("override", ["dgpo.beta_dpo=0", "dgpo.kl_beta=-1", "dgpo.clip_range=1", "dgpo.trunc_steps=10",
                                      "dgpo.num_times=8", "dgpo.num_times=0", "dgpo.num_minibatches=5",
                                      "dgpo.ema_decay=1", "dgpo.rollout_solver=rk4", "dgpo.group_size=1",
                                      "dgpo.switch_ema_ref=-1"])
def test_bad_settings_name_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["algorithm=dgpo", override])
