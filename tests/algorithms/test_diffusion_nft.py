"""DiffusionNFT's property tests (competitors.md 1.6): the loss's gradient at theta = theta_old is the
advantage-weighted flow-matching gradient whatever beta, the proximal identity, the optimality map, the adaptive
weight's scale invariance, the old policy's soft-update schedule, and the training times."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.algorithms.diffusion_nft import (DiffusionNFT, DiffusionNFTConfig, implicit_policies,
                                                    nft_policy_loss, old_policy_decay, optimality_probability,
                                                    regression_error, training_times)
from neighbor_grpo.algorithms.forward_process import sample_generators, soft_update, training_noises
from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.maths.flow import sigma_grid

D = 64


def draw(seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0, eps, v_old = (torch.randn(batch, D, generator=g, dtype=torch.float64) for _ in range(3))
    return x0, eps, v_old


@pytest.mark.parametrize("advantage", [-7.0, -1.3, 0.0, 2.2])
@pytest.mark.parametrize("beta", [1.0, 0.1, 1e-3])
def test_gradient_at_the_old_policy_is_advantage_weighted_flow_matching(advantage, beta):
    """grad_v L = 2 clip(A, -5, 5) s^2 (v_old - v_tgt) / (w D), w = max(mean_d |x0hat_old - x0|, 1e-5): no beta."""
    x0, eps, v_old = draw()
    s = torch.tensor([0.63], dtype=torch.float64)
    v = v_old.clone().requires_grad_(True)
    r = optimality_probability(torch.tensor([advantage], dtype=torch.float64), 5.0)
    nft_policy_loss(v, v_old, x0, eps, s, r, beta, scale=5.0 / beta).sum().backward()
    x_s = (1 - s) * x0 + s * eps
    w = ((x_s - s * v_old) - x0).abs().mean().clamp_min(1e-5)
    expected = 2 * max(-5.0, min(5.0, advantage)) * s**2 * (v_old - (eps - x0)) / (w * D)
    torch.testing.assert_close(v.grad, expected, rtol=1e-7, atol=1e-12)
    if advantage == 0.0:
        assert v.grad.abs().max() < 1e-12


@pytest.mark.parametrize("advantage, beta", [(2.2, 1.0), (-1.3, 0.1), (9.0, 0.5)])
def test_proximal_identity_and_its_minimiser(advantage, beta):
    """Adaptive weight off: L(v) - L(v_old) = 2 clip(A) mean(Delta e) + 5 beta mean(Delta^2); minimiser
    v_old - clip(A) e / (5 beta)."""
    x0, eps, v_old = draw(1)
    s = torch.tensor([0.4], dtype=torch.float64)
    r = optimality_probability(torch.tensor([advantage], dtype=torch.float64), 5.0)
    loss = lambda v: nft_policy_loss(v, v_old, x0, eps, s, r, beta, 5.0 / beta, adaptive=False)
    delta = torch.randn(1, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    e = v_old - (eps - x0)
    clipped = max(-5.0, min(5.0, advantage))
    torch.testing.assert_close(loss(v_old + delta) - loss(v_old),
                               2 * clipped * (delta * e).mean(-1) + 5 * beta * delta.pow(2).mean(-1))
    best = (v_old - clipped * e / (5 * beta)).requires_grad_(True)
    loss(best).sum().backward()
    assert best.grad.abs().max() < 1e-12


def test_optimality_map_and_implicit_policies():
    advantages = torch.linspace(-12, 12, 97)
    r = optimality_probability(advantages, 5.0)
    assert r.min() == 0 and r.max() == 1
    torch.testing.assert_close(r, 0.5 + 0.5 * (advantages / 5).clamp(-1, 1))
    _, _, v_old = draw(3)
    v = torch.randn_like(v_old)
    for beta in (1.0, 0.1, 1e-3, 2.0):
        plus, minus = implicit_policies(v, v_old, beta)
        torch.testing.assert_close(plus + minus, 2 * v_old)


@pytest.mark.parametrize("factor", [0.01, 7.0])
def test_adaptive_weight_is_scale_invariant(factor):
    """Scaling the residual x0hat - x0 by c > 0 scales the weight by c: the gradient is unchanged."""
    x0, eps, _ = draw(4)
    s = torch.tensor([0.5], dtype=torch.float64)
    direction = torch.randn(1, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def gradient(c):
        v = ((eps - x0) + c * direction).requires_grad_(True)
        regression_error(v, x0, eps, s, adaptive=True).sum().backward()
        return v.grad

    torch.testing.assert_close(gradient(factor), gradient(1.0))


def test_paper_scale_is_the_code_loss_over_adv_clip_per_beta():
    x0, eps, v_old = draw(6, batch=3)
    v = v_old + 0.1 * torch.randn_like(v_old)
    s, r = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    code = nft_policy_loss(v, v_old, x0, eps, s, r, 0.1, scale=5.0 / 0.1)
    paper = nft_policy_loss(v, v_old, x0, eps, s, r, 0.1, scale=1.0)
    torch.testing.assert_close(code, 50 * paper)


def test_old_policy_schedules():
    assert [old_policy_decay(k, 1) for k in (0, 100, 500, 1000)] == [0.0, pytest.approx(0.1), 0.5, 0.5]
    assert [old_policy_decay(k, 2) for k in (0, 74, 75, 175, 10_000)] == [0.0, 0.0, 0.0, pytest.approx(0.75), 0.999]
    assert old_policy_decay(12345, 0) == 0.0
    with pytest.raises(ValueError, match="old_decay"):
        old_policy_decay(1, 3)


def test_soft_update_formula_and_eta_zero_copies():
    net, old = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old.requires_grad_(False)
    before = [p.clone() for p in old.parameters()]
    soft_update(old, net, 0.3)
    for updated, start, current in zip(old.parameters(), before, net.parameters()):
        torch.testing.assert_close(updated, 0.3 * start + 0.7 * current.detach())
    soft_update(old, net, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), net.parameters()))


def test_soft_update_runs_once_after_the_iterations_last_step():
    net = torch.nn.Linear(2, 2)
    algorithm = DiffusionNFT(DiffusionNFTConfig(num_minibatches=2, group_size=4, rollout_steps=4), seed=0)
    old = torch.nn.Linear(2, 2).requires_grad_(False)
    algorithm.attach({"old_policy": None}, {"old_policy": old})
    start = [p.clone() for p in old.parameters()]
    algorithm.steps.plan(iteration=0, planned=2)
    algorithm.after_step(net)
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), start))  # not after the first of two steps
    algorithm.after_step(net)  # k = 2: eta = 0.002
    for updated, s0, current in zip(old.parameters(), start, net.parameters()):
        torch.testing.assert_close(updated, 0.002 * s0 + 0.998 * current.detach())


def test_grid_times_are_distinct_grid_points_all_but_one_per_sample():
    sigmas = sigma_grid(10, shift=3.0)
    members = torch.tensor([[0, 3], [1, 2]])
    generators = sample_generators(0, 5, [4, 7], members, 11)
    times = training_times(sigmas, 9, "grid", generators)  # (9, P, M)
    assert times.shape == (9, 2, 2)
    for p in range(2):
        for m in range(2):
            column = times[:, p, m]
            assert len(set(column.tolist())) == 9 and all(t in sigmas[:-1].tolist() for t in column.tolist())
    assert not torch.equal(times[:, 0, 0], times[:, 0, 1])  # a permutation per sample
    again = training_times(sigmas, 9, "grid", sample_generators(0, 5, [7], members[1:], 11))
    assert torch.equal(again[:, 0], times[:, 1])  # keyed per sample, not by batch position


def test_training_noise_is_fresh_per_time_and_keyed_per_sample():
    members = torch.tensor([[0, 1, 2]])
    noise = training_noises((4,), 3, 0, 1, [5], members, "cpu")
    assert not torch.equal(noise[0], noise[1])
    one_member = training_noises((4,), 3, 0, 1, [5], members[:, 2:], "cpu")
    assert torch.equal(one_member[:, 0, 0], noise[:, 0, 2])
    shared = training_noises((4,), 3, 0, 1, [5], members, "cpu", per_time=False)
    assert torch.equal(shared[0], shared[2])


@pytest.mark.parametrize("override", ["diffusion_nft.beta=0", "diffusion_nft.loss_scale=both",
                                      "diffusion_nft.old_decay=3", "diffusion_nft.rollout_policy=ema",
                                      "diffusion_nft.time_sampling=logit", "diffusion_nft.timestep_fraction=0",
                                      "diffusion_nft.kl_beta=-1", "diffusion_nft.rollout_solver=rk4"])
def test_bad_settings_name_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["algorithm=diffusion_nft", override])


def test_old_and_current_policy_agree_bitwise_before_the_first_update():
    from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
    from neighbor_grpo.training.parts import build_training_parts

    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    parts = build_training_parts(load_config(None, ["algorithm=diffusion_nft"]), adapter)
    x, cond = torch.randn(3, *adapter.latent_shape()), adapter.encode_prompts(["1", "2", "3"])
    s = torch.tensor([1.0, 0.5, 0.01])
    assert torch.equal(parts.algorithm.old_velocity(x, s, cond), parts.velocity(x, s, cond))


def test_code_loss_scale_is_adv_clip_over_beta_in_the_loss():
    """DiffusionNFT.loss with loss_scale 'code' is adv_clip / beta (here 4 / 0.1 = 40) times the 'paper' loss."""
    from neighbor_grpo.algorithms.common import Rollout

    torch.manual_seed(2)
    net, old = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5).requires_grad_(False)
    data = Rollout(["a", "b"], [0, 1], torch.zeros(2, 3), sigma_grid(4, 3.0), torch.randn(2, 2, 4, 5),
                   torch.zeros(1, 2, 4, 5))
    advantages = torch.tensor([[1.0, -2.0, 0.5, 0.5], [3.0, -1.0, -1.5, -0.5]])
    velocity = lambda module: (lambda x, s, cond: module(x))

    def loss(scale: str) -> float:
        algorithm = DiffusionNFT(DiffusionNFTConfig(group_size=4, rollout_steps=4, beta=0.1, adv_clip=4.0,
                                                    kl_beta=0.0, loss_scale=scale), seed=0)
        algorithm.attach({"old_policy": velocity(old)}, {"old_policy": old})
        return float(algorithm.loss(velocity(net), data, advantages, algorithm.minibatches(data, 0)[0])[0])

    assert abs(loss("paper")) > 1e-4
    assert loss("code") == pytest.approx(40 * loss("paper"), rel=1e-6)
