"""CPS (Coefficients-Preserving Sampling) as Flow-GRPO's `sde_type: cps` (spec competitors.md 3.6): the Euler limit
at eta 0, the preserved marginal (data coefficient 1 - s', total noise std s'), Flow-GRPO's excess noise for
contrast, the 'code' and 'gaussian' log-probs on known inputs, the last step, ratio 1 before the first update, and
a short training run on the built-in model."""

from __future__ import annotations

import math

import pytest
import torch

from neighbor_grpo.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from neighbor_grpo.algorithms.sde import (cps_code_log_prob, cps_mean_std, cps_noise_std, cps_sde_step,
                                          flow_grpo_mean_std, gaussian_log_prob)

pytestmark = pytest.mark.usefixtures("single_thread")
from tiny_velocity import LATENT, TinyVelocity  # tests/algorithms/tiny_velocity.py

P, G = 2, 4


def test_eta_zero_is_the_euler_step():
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(5, 16, generator=generator, dtype=torch.float64), torch.randn(5, 16, generator=generator, dtype=torch.float64)
    for s, s_next in ((1.0, 0.9), (0.7, 0.45), (0.2, 0.0)):
        mean, sigma = cps_mean_std(x, v, s, s_next, eta=0.0)
        assert sigma == 0.0
        torch.testing.assert_close(mean, x + (s_next - s) * v, rtol=0, atol=1e-14)
        step = cps_sde_step(x, v, s, s_next, noise=torch.randn(5, 16, generator=generator), eta=0.0)
        torch.testing.assert_close(step.x_next, x + (s_next - s) * v, rtol=0, atol=1e-5)  # computed in float32


@pytest.mark.parametrize("eta", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("s, s_next", [(1.0, 0.9), (0.6, 0.4), (0.3, 0.05)])
def test_coefficients_preserve_the_forward_marginal(eta, s, s_next):
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 32, generator=generator, dtype=torch.float64), torch.randn(3, 32, generator=generator, dtype=torch.float64)
    x, v = (1 - s) * x0 + s * eps, eps - x0  # the oracle velocity
    mean, sigma = cps_mean_std(x, v, s, s_next, eta)
    noise_coefficient = math.sqrt(s_next**2 - sigma**2)
    torch.testing.assert_close(mean, (1 - s_next) * x0 + noise_coefficient * eps, rtol=0, atol=1e-12)
    assert sigma == pytest.approx(s_next * math.sin(eta * math.pi / 2))
    assert math.sqrt(noise_coefficient**2 + sigma**2) == pytest.approx(s_next, abs=1e-12)  # total noise std = s'


def test_monte_carlo_variance_given_x0_is_the_marginal_s_next_squared():
    s, s_next, eta, n = 0.8, 0.55, 0.8, 200_000
    generator = torch.Generator().manual_seed(2)
    x0 = torch.full((n,), 0.37)
    eps, z = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    x_next = cps_sde_step((1 - s) * x0 + s * eps, eps - x0, s, s_next, noise=z, eta=eta).x_next
    assert float(x_next.mean()) == pytest.approx((1 - s_next) * 0.37, abs=4 * s_next / math.sqrt(n))
    assert float(x_next.var()) == pytest.approx(s_next**2, rel=0.01)  # relative SE of a variance ~ sqrt(2/n)


def _flow_grpo_total_noise_std(s, s_next, eta, s_1):
    """eps-coefficient of Flow-GRPO's mean (oracle v, x0 = 0, eps = 1) and its injected noise, combined."""
    one = torch.ones(1, dtype=torch.float64)
    mean, std = flow_grpo_mean_std(s * one, one, s, s_next, eta, s_1)
    return math.sqrt(float(mean) ** 2 + std**2)


def test_flow_grpo_injects_more_noise_than_the_marginal_and_cps_does_not():
    # FlowCPS scripts/analysis/sde_noise_level.ipynb: uniform 17-point grid, eta 0.7 (spec 3.6 item 3)
    grid = [1 - k / 16 for k in range(17)]
    for j, expected in ((0, 0.9847), (7, 0.5056), (15, 0.0480)):
        assert _flow_grpo_total_noise_std(grid[j], grid[j + 1], 0.7, grid[1]) == pytest.approx(expected, abs=1e-4)
        one = torch.ones(1, dtype=torch.float64)
        mean, sigma = cps_mean_std(grid[j] * one, one, grid[j], grid[j + 1], 0.7)
        assert math.sqrt(float(mean) ** 2 + sigma**2) == pytest.approx(grid[j + 1], abs=1e-12)


def test_log_probs_code_and_gaussian_on_known_inputs():
    mean = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    sigma = 0.3
    z = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    x_next = mean + sigma * z
    code = cps_code_log_prob(x_next, mean, sigma)
    assert float(code) == pytest.approx(-sigma**2 * (1 + 4 + 0.25 + 0) / 4)  # -mean_d(sigma^2 z^2)
    gaussian = gaussian_log_prob(x_next, mean, sigma)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_next).mean()
    assert float(gaussian) == pytest.approx(float(expected), rel=1e-6)
    # the two ratios differ by the step's temperature: log rho_code = 2 sigma^2 * mean_d log rho_true
    moved = mean + torch.tensor([[0.1, -0.2, 0.05, 0.3]])
    log_rho_code = cps_code_log_prob(x_next, moved) - code
    log_rho_gauss = gaussian_log_prob(x_next, moved, sigma) - gaussian
    assert float(log_rho_code) == pytest.approx(2 * sigma**2 * float(log_rho_gauss), rel=1e-5)


def test_last_step_is_deterministic_and_finite():
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    step = cps_sde_step(x, v, 0.1, 0.0, noise=torch.randn(2, 8), eta=0.8)
    assert cps_noise_std(0.0, 0.8) == 0.0 and step.std == 0.0
    torch.testing.assert_close(step.x_next, x - 0.1 * v)  # x0hat
    log_prob = cps_code_log_prob(step.x_next, step.mean)
    assert torch.equal(log_prob, torch.zeros(2)) and torch.isfinite(log_prob).all()


def _cps(logprob: str, old_policy: str, **extra) -> FlowGRPO:
    config = FlowGRPOConfig(group_size=G, rollout_steps=6, num_minibatches=2, sde_type="cps", cps_logprob=logprob,
                            old_policy=old_policy, fast_window_size=3, **extra)
    return FlowGRPO(config, seed=5)


@pytest.mark.parametrize("logprob", ["code", "gaussian"])
def test_ratio_is_exactly_one_before_the_first_update(logprob):
    torch.manual_seed(0)
    net = TinyVelocity()
    algorithm = _cps(logprob, "recompute")
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["a", "b"], [0, 1], 0, LATENT)
    window = torch.nonzero(rollout.sde_mask).flatten().tolist()
    assert len(window) == 3 and window[-1] < 3  # Fast: 3 steps starting in [0, N // 2 - 3]
    # ODE outside the window: the Euler step on the stored velocity
    for j in set(range(6)) - set(window):
        torch.testing.assert_close(rollout.states[j + 1], rollout.states[j] + (rollout.sigmas[j + 1] - rollout.sigmas[j]) * rollout.velocities[j])
    if logprob == "code":  # logp_rollout = -mean_d(sigma_j^2 z^2), about -sigma_j^2
        for j in window:
            sigma = float(cps_noise_std(float(rollout.sigmas[j + 1]), 0.8))
            assert float(rollout.log_probs[j].mean()) == pytest.approx(-sigma**2, rel=0.6)
    advantages = algorithm.advantages(torch.randn(P, G))
    batches = algorithm.minibatches(rollout, 0)
    old = algorithm.prepare_old_policy(net, rollout, batches)
    for batch in batches:
        loss, stats = algorithm.loss(net, old, advantages, batch)
        assert float(stats["ratio_max_dev"]) == 0.0 and torch.isfinite(loss)
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_rollout_log_probs_give_ratio_one_up_to_batching():
    torch.manual_seed(0)
    net = TinyVelocity()
    algorithm = _cps("gaussian", "rollout")
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["a", "b"], [0, 1], 0, LATENT)
    batch = algorithm.minibatches(rollout, 0)[0]
    _, stats = algorithm.loss(net, rollout, algorithm.advantages(torch.randn(P, G)), batch)
    assert float(stats["ratio_max_dev"]) < 1e-4


def test_off_policy_clip_binds_with_the_code_log_prob():
    torch.manual_seed(0)
    net = TinyVelocity()
    algorithm = _cps("code", "recompute", eps_clip=1e-5)
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["a", "b"], [0, 1], 0, LATENT)
    batches = algorithm.minibatches(rollout, 0)
    old = algorithm.prepare_old_policy(net, rollout, batches)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    advantages = algorithm.advantages(torch.randn(P, G))
    loss, stats = algorithm.loss(net, old, advantages, batches[0])
    # by hand: code log-prob recomputed from the CPS mean, PPO clip, averaged over the window's steps
    members = batches[0].members
    cond = old.cond.repeat_interleave(members.shape[1])
    expected = []
    for j in batches[0].steps:
        take = lambda t: torch.stack([t[p, members[p]] for p in range(P)])
        x, x_next = take(old.states[j]).flatten(0, 1), take(old.states[j + 1]).flatten(0, 1)
        mean, _ = cps_mean_std(x, net(x, old.sigmas[j], cond), float(old.sigmas[j]), float(old.sigmas[j + 1]), 0.8)
        ratio = (-(x_next - mean).pow(2).flatten(1).mean(1) - take(old.log_probs[j]).flatten()).exp()
        A = take(advantages).flatten()
        expected.append(torch.maximum(-A * ratio, -A * ratio.clamp(1 - 1e-5, 1 + 1e-5)).mean())
    assert float(loss.detach()) == pytest.approx(float(torch.stack(expected).detach().mean()), rel=1e-5)
    assert float(stats["clip_fraction"]) > 0


def test_two_iterations_train_on_the_built_in_model(tmp_path):
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.logs import read_metrics
    from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
    from neighbor_grpo.rewards import WeightedRewards
    from neighbor_grpo.training.trainer import train

    config = load_config(None, ["algorithm=flow_grpo", "iterations=2", "prompts_per_iteration=2", "eval.every=2",
                                "eval.samples_per_prompt=2", "flow_grpo.group_size=4", "flow_grpo.rollout_steps=6",
                                "flow_grpo.sde_type=cps", "flow_grpo.fast_window_size=3", "flow_grpo.eps_clip=1e-5",
                                "optim.lr=1e-3"])
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    start = [p.detach().clone() for p in adapter.net.parameters()]
    rewards = WeightedRewards({"brightness_for_test": lambda images, prompts: images.mean(dim=(1, 2, 3))},
                              {"brightness_for_test": 1.0})
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=rewards)
    assert result.iterations == 2
    _, rows = read_metrics(result.run_dir / "metrics.csv")
    trained = [row for row in rows if row["ratio_mean"]]  # the other rows are the evaluations
    assert len(trained) == 2 and all(math.isfinite(float(row["ratio_mean"])) for row in trained)
    assert any(not torch.equal(a, b) for a, b in zip(start, adapter.net.parameters()))


@pytest.mark.parametrize("sde_type", ["cps", "sde"])
def test_kl_is_the_mean_squared_step_mean_difference_scaled_only_for_flow_grpo(sde_type):
    """The logged KL term: kl_beta mean_d (mu - mu_ref)^2 for CPS (FlowCPS: no variance, its sigma is 0 at s' = 0);
    Flow-GRPO's own SDE divides it by 2 sigma_t^2 (the noise scale, train_sd3.py)."""
    from neighbor_grpo.algorithms.common import gather_members
    from neighbor_grpo.algorithms.sde import flow_grpo_noise_scale

    torch.manual_seed(3)
    net, reference = TinyVelocity(), TinyVelocity()
    config = FlowGRPOConfig(group_size=G, rollout_steps=6, num_minibatches=1, sde_type=sde_type, kl_beta=0.3)
    algorithm = FlowGRPO(config, seed=5)
    rollout = algorithm.rollout(net, torch.tensor([0, 2]), ["a", "b"], [0, 1], 0, LATENT)
    [batch] = algorithm.minibatches(rollout, 0)
    _, stats = algorithm.loss(net, rollout, torch.zeros(P, G), batch, reference_velocity=reference)
    sigmas = [float(s) for s in rollout.sigmas]
    expected = []
    with torch.no_grad():
        for j in batch.steps:
            x = gather_members(rollout.states[j], batch.members).flatten(0, 1)
            s = rollout.sigmas[j]
            cond = torch.tensor([0, 2]).repeat_interleave(G)
            if sde_type == "cps":
                mean, _ = cps_mean_std(x, net(x, s, cond), sigmas[j], sigmas[j + 1], 0.8)
                mean_ref, _ = cps_mean_std(x, reference(x, s, cond), sigmas[j], sigmas[j + 1], 0.8)
                scale = 1.0
            else:
                mean, _ = flow_grpo_mean_std(x, net(x, s, cond), sigmas[j], sigmas[j + 1], 0.7, sigmas[1])
                mean_ref, _ = flow_grpo_mean_std(x, reference(x, s, cond), sigmas[j], sigmas[j + 1], 0.7, sigmas[1])
                scale = 1 / (2 * flow_grpo_noise_scale(sigmas[j], 0.7, sigmas[1]) ** 2)
            expected.append(0.3 * scale * float((mean - mean_ref).pow(2).flatten(1).mean(-1).mean()))
    assert min(expected) > 0
    assert float(stats["kl_loss"]) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
