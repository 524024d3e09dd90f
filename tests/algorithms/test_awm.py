"""AWM's property tests (competitors.md 2.5): the on-policy loss is advantage-weighted flow matching, the ghuber
weighting's derivative, the pure-SFT limit, the stratified time sampler, and the EMA policy's update."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.algorithms.awm import (AWM, AWMConfig, awm_policy_loss, ema_decay, strata, stratified_indices,
                                          weighted_error)
from neighbor_grpo.algorithms.common import Minibatch, Rollout
from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import keyed_generator

D = 64


def draw(seed: int, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, D, generator=g, dtype=torch.float64) for _ in range(3))


def test_weighting_derivative_and_p_one_limit():
    err = torch.tensor([1e-4, 0.03, 0.7, 4.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.1, 0.4, 0.8, 1.0], dtype=torch.float64)
    weighted_error(err, s, "ghuber", 0.25).sum().backward()
    torch.testing.assert_close(err.grad, s * (err.detach() + 1e-10).pow(-0.75))
    torch.testing.assert_close(weighted_error(err.detach(), s, "ghuber", 1.0), s * err.detach())
    torch.testing.assert_close(weighted_error(err.detach(), s, "t2"), s**2 * err.detach())


def test_on_policy_gradient_is_advantage_weighted_flow_matching():
    """grad L_policy = mean_i Ahat_i s_i (err_i + 1e-10)^(p - 1) grad err_i."""
    x0, eps, v = draw(0)
    v.requires_grad_(True)
    s = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    a_hat = torch.tensor([1.0, -0.4, 0.0, 0.6], dtype=torch.float64)
    awm_policy_loss(v, x0, eps, s, a_hat, "ghuber", 0.25).backward()
    residual = v.detach() - (eps - x0)
    err = residual.pow(2).mean(-1)
    expected = (a_hat * s * (err + 1e-10).pow(-0.75)).unsqueeze(-1) * 2 * residual / D / 4
    torch.testing.assert_close(v.grad, expected)


def test_pure_sft_limit_and_zero_sum_groups():
    x0, eps, v = draw(1)
    s = torch.full((4,), 0.6, dtype=torch.float64)

    def grad(a_hat, x0=x0, eps=eps):
        w = v.clone().requires_grad_(True)
        awm_policy_loss(w, x0, eps, s, a_hat, "ghuber", 0.25).backward()
        return w.grad

    torch.testing.assert_close(grad(torch.full((4,), 0.3, dtype=torch.float64)),
                               0.3 * grad(torch.ones(4, dtype=torch.float64)))
    same = lambda t: t[:1].expand(4, D)  # identical samples, times and noises in the group
    w = same(v).clone().requires_grad_(True)
    awm_policy_loss(w, same(x0), same(eps), s, torch.tensor([1.0, -0.5, -0.25, -0.25], dtype=torch.float64),
                    "ghuber", 0.25).backward()
    assert w.grad.sum(0).abs().max() < 1e-15


def test_strata_of_the_reference():
    assert strata(14, 0.9, 6, "discrete_wo_init") == [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    assert strata(14, 0.9, 6, "discrete") == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    for seed in range(200):
        index = stratified_indices(strata(14, 0.9, 6, "discrete_wo_init"), keyed_generator(seed))
        assert index[0] == 1 and all(lo <= i < hi for i, (lo, hi) in zip(index, [(1, 2), (2, 4), (4, 6), (6, 8),
                                                                                  (8, 10), (10, 12)]))
        assert not {0, 12, 13} & set(index)
    seen = {i for seed in range(200) for i in stratified_indices(strata(14, 0.9, 6, "discrete"), keyed_generator(seed))}
    assert seen == set(range(12))  # every index of every stratum is drawn
    with pytest.raises(ValueError, match="empty stratum"):
        strata(4, 0.9, 4, "discrete_wo_init")


def rollout(P=2, G=4, N=14):
    return Rollout(["a", "b"][:P], list(range(P)), torch.zeros(P, 3), sigma_grid(N, 3.0),
                   torch.randn(2, P, G, 5), torch.zeros(1, P, G, 5))


def test_minibatch_times_are_shared_and_per_sample_times_differ():
    shared = AWM(AWMConfig(group_size=4, num_minibatches=2), seed=0)
    batches = shared.minibatches(rollout(), 3)
    times = shared._times(rollout(), batches[0])
    assert times.shape == (6, 2, 2) and torch.equal(times, times[:, :1, :1].expand_as(times))
    bins = strata(14, 0.9, 6, "discrete")
    assert all(lo <= j < hi for batch in batches for j, (lo, hi) in zip(batch.steps, bins))
    torch.testing.assert_close(times[:, 0, 0], sigma_grid(14, 3.0)[batches[0].steps])
    per_sample = AWM(AWMConfig(group_size=4, times_per="sample"), seed=0)
    batch = per_sample.minibatches(rollout(), 3)[0]
    times = per_sample._times(rollout(), batch)
    assert times.shape == (6, 2, 4) and not torch.equal(times, times[:, :1, :1].expand_as(times))


def test_ema_policy_update_and_its_kl_vanish_with_zero_decay():
    assert [ema_decay(k, 0.3, "linear") for k in (0, 100, 300, 5000)] == [0.0, pytest.approx(0.1), 0.3, 0.3]
    assert ema_decay(0, 0.3, "constant") == 0.3
    net, ema = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5).requires_grad_(False)
    algorithm = AWM(AWMConfig(group_size=4, ema_decay=0.0, kl_beta=0.0, num_times=2, rollout_steps=4), seed=0)
    velocity = lambda module: (lambda x, s, cond: module(x))
    algorithm.attach({"ema_policy": velocity(ema)}, {"ema_policy": ema})
    algorithm.steps.plan(0, 1)
    algorithm.after_step(net)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), net.parameters()))
    data = rollout(N=4)
    batch = algorithm.minibatches(data, 1)[0]
    loss, stats = algorithm.loss(velocity(net), data, torch.zeros(2, 4), batch)
    assert stats["kl_ema"] == 0
    loss.backward()
    assert all(p.grad.abs().max() == 0 for p in net.parameters())


@pytest.mark.parametrize("override", ["awm.time_sampler=uniform", "awm.num_times=0", "awm.num_times=13",
                                      "awm.weighting=l1", "awm.ghuber_p=0", "awm.ema_decay=1", "awm.ema_ramp=cosine",
                                      "awm.times_per=step", "awm.advantage_max=0", "awm.ema_beta=-1"])
def test_bad_settings_name_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["algorithm=awm", override])


def awm_loss(config: AWMConfig, data: Rollout, advantages: torch.Tensor, policy, reference=None, ema=None):
    velocity = lambda module: (lambda x, s, cond: module(x))
    algorithm = AWM(config, seed=0)
    if ema is not None:
        algorithm.attach({"ema_policy": velocity(ema)}, {"ema_policy": ema})
    batch = algorithm.minibatches(data, 1)[0]
    return algorithm.loss(velocity(policy), data, advantages, batch,
                          velocity(reference) if reference is not None else None)


def test_advantage_is_divided_by_adv_clip_and_scaled_by_advantage_max():
    """Ahat = A / adv_clip * advantage_max (the loss is linear in Ahat): doubling adv_clip halves the loss,
    advantage_max 3 triples it."""
    torch.manual_seed(0)
    data, net = rollout(N=4), torch.nn.Linear(5, 5)
    advantages = torch.tensor([[0.5, -0.25, 0.75, -1.0], [0.1, 0.2, -0.3, 0.0]])  # inside every clip range here
    base = dict(group_size=4, num_times=2, rollout_steps=4, kl_beta=0.0, ema_beta=0.0)
    one, _ = awm_loss(AWMConfig(**base, adv_clip=1.0, advantage_max=1.0), data, advantages, net)
    two, _ = awm_loss(AWMConfig(**base, adv_clip=2.0, advantage_max=1.0), data, advantages, net)
    scaled, _ = awm_loss(AWMConfig(**base, adv_clip=2.0, advantage_max=3.0), data, advantages, net)
    assert abs(float(one)) > 1e-3
    assert float(two) == pytest.approx(float(one) / 2, rel=1e-6)
    assert float(scaled) == pytest.approx(3 * float(one) / 2, rel=1e-6)


def test_both_kl_terms_measure_their_own_network():
    """With kl_beta and ema_beta both on, kl_ref is against the reference and kl_ema against the EMA policy: an EMA
    policy equal to the trained one gives kl_ema 0 while the reference's KL is positive, and the loss adds
    kl_beta kl_ref + ema_beta kl_ema to the policy term."""
    torch.manual_seed(1)
    data, net, reference = rollout(N=4), torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)
    ema = torch.nn.Linear(5, 5).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    config = AWMConfig(group_size=4, num_times=2, rollout_steps=4, kl_beta=0.5, ema_beta=2.0)
    advantages = torch.zeros(2, 4)  # the policy term is 0: the loss is the KL terms alone
    loss, stats = awm_loss(config, data, advantages, net, reference, ema)
    assert stats["kl_ema"] == 0 and stats["kl_ref"] > 1e-3
    assert float(loss) == pytest.approx(0.5 * float(stats["kl_ref"]), rel=1e-6)
    ema.weight.data.add_(0.1)  # now the EMA policy differs by 0.1 per weight: kl_ema > 0, kl_ref unchanged
    loss, moved = awm_loss(config, data, advantages, net, reference, ema)
    assert moved["kl_ema"] > 1e-4 and moved["kl_ref"] == stats["kl_ref"]
    assert float(loss) == pytest.approx(0.5 * float(moved["kl_ref"]) + 2.0 * float(moved["kl_ema"]), rel=1e-6)
