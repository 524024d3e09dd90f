"""GRPO-Guard as Flow-GRPO's `guard_ratio_norm` / `guard_grad_reweight` (spec competitors.md 4.6): on-policy zero
and antisymmetry of the normalised log-ratio, its closed form, unbiasedness, the step-uniform gradient, ratio 1
before the first update, the loss against the reference formula where the clip binds, the config's refusal of
CPS, and a short training run on the built-in model."""

from __future__ import annotations

import math

import pytest
import torch

from neighbor_grpo.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from neighbor_grpo.algorithms.grpo_guard import grad_reweight, ratio_norm_bias, ratio_norm_log_ratio
from neighbor_grpo.algorithms.sde import flow_grpo_mean_std, gaussian_log_prob, ppo_clipped_loss
from neighbor_grpo.config.train_config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("single_thread")
from tiny_velocity import LATENT, TinyVelocity  # tests/algorithms/tiny_velocity.py

P, G = 2, 4
D = 64


def _transition(seed: int = 0, std: float = 0.05):
    generator = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(3, D, generator=generator, dtype=torch.float64)
    z = torch.randn(3, D, generator=generator, dtype=torch.float64)
    delta = 0.01 * torch.randn(3, D, generator=generator, dtype=torch.float64)
    return old_mean, old_mean + std * z, z, delta


def _guard(x_next, old_mean, mean, std):
    log_ratio = gaussian_log_prob(x_next, mean, std) - gaussian_log_prob(x_next, old_mean, std)
    return ratio_norm_log_ratio(log_ratio, mean, old_mean, std, batch_dims=1), log_ratio


def test_on_policy_zero_and_antisymmetry():
    std = 0.05
    old_mean, x_next, _, delta = _transition()
    assert torch.equal(_guard(x_next, old_mean, old_mean, std)[0], torch.zeros(3, dtype=torch.float64))
    plus, vanilla_plus = _guard(x_next, old_mean, old_mean + delta, std)
    minus, vanilla_minus = _guard(x_next, old_mean, old_mean - delta, std)
    torch.testing.assert_close(minus, -plus, rtol=1e-9, atol=1e-15)
    bias = ratio_norm_bias(old_mean + delta, old_mean, std, batch_dims=1)
    torch.testing.assert_close(vanilla_plus + vanilla_minus, -2 * bias)  # vanilla is not antisymmetric: -b each
    assert (bias > 0).all()


def test_closed_form():
    std = 0.05
    old_mean, x_next, z, delta = _transition(seed=1, std=std)
    guard, _ = _guard(x_next, old_mean, old_mean + delta, std)
    torch.testing.assert_close(guard, ((x_next - old_mean) * delta).mean(-1) / std, rtol=1e-6, atol=0)
    torch.testing.assert_close(guard, (z * delta).mean(-1), rtol=1e-6, atol=0)


def test_unbiased_where_vanilla_is_shifted_by_minus_b():
    std, n = 0.02, 20_000
    generator = torch.Generator().manual_seed(2)
    old_mean = torch.zeros(1, D, dtype=torch.float64).expand(n, D)
    delta = 0.05 * torch.randn(1, D, generator=generator, dtype=torch.float64).expand(n, D)
    x_next = old_mean + std * torch.randn(n, D, generator=generator, dtype=torch.float64)
    guard, vanilla = _guard(x_next, old_mean, old_mean + delta, std)
    standard_error = float(guard.std()) / math.sqrt(n)
    assert abs(float(guard.mean())) < 4 * standard_error
    b = float(ratio_norm_bias(old_mean[:1] + delta[:1], old_mean[:1], std, batch_dims=1))
    assert float(vanilla.mean()) == pytest.approx(-b, abs=4 * float(vanilla.std()) / math.sqrt(n))
    assert b > 100 * standard_error / std  # the vanilla shift is far outside the noise


@pytest.mark.parametrize("j", [0, 1, 4, 8])
def test_step_uniform_gradient_inside_the_clip(j):
    """grad_v L_j = A rho c_j z / D, c_0 = 1 and c_j = 1 + eta^2 / 2 for j >= 1, whatever the noise level."""
    eta, grid = 0.7, [3 * u / (1 + 2 * u) for u in torch.linspace(1, 0, 11).tolist()]  # shifted 10-step grid
    s, s_next = grid[j], grid[j + 1]
    generator = torch.Generator().manual_seed(j)
    x = torch.randn(1, D, generator=generator, dtype=torch.float64)
    v_old = torch.randn(1, D, generator=generator, dtype=torch.float64)
    old_mean, std = flow_grpo_mean_std(x, v_old, s, s_next, eta, grid[1])
    z = torch.randn(1, D, generator=generator, dtype=torch.float64)
    x_next = old_mean + std * z
    v = (v_old + 1e-3 * torch.randn(1, D, generator=generator, dtype=torch.float64)).requires_grad_()
    mean, _ = flow_grpo_mean_std(x, v, s, s_next, eta, grid[1])
    log_ratio = gaussian_log_prob(x_next, mean, std) - gaussian_log_prob(x_next, old_mean, std)
    rho = ratio_norm_log_ratio(log_ratio, mean, old_mean, std, batch_dims=1).exp()
    A = torch.tensor([0.8], dtype=torch.float64)
    loss = grad_reweight(s, s_next) * ppo_clipped_loss(rho, A, eps_clip=0.5)
    (grad,) = torch.autograd.grad(loss, v)
    c = 1.0 if j == 0 else 1 + eta**2 / 2
    torch.testing.assert_close(grad, A * rho.detach() * c * z / D, rtol=1e-9, atol=1e-15)


def _guarded(old_policy: str, eps_clip: float = 4e-6) -> FlowGRPO:
    config = FlowGRPOConfig(group_size=G, rollout_steps=5, num_minibatches=2, guard_ratio_norm=True,
                            guard_grad_reweight=True, old_policy=old_policy, eps_clip=eps_clip, global_std=False)
    return FlowGRPO(config, seed=7)


def _rollout(algorithm, net):
    return algorithm.rollout(net, torch.tensor([0, 2]), ["a", "b"], [0, 1], 0, LATENT)


def test_ratio_is_exactly_one_before_the_first_update():
    torch.manual_seed(0)
    net = TinyVelocity()
    algorithm = _guarded("recompute")
    rollout = _rollout(algorithm, net)
    batches = algorithm.minibatches(rollout, 0)
    assert batches[0].steps == [0, 1, 2, 3]  # every step but the last
    old = algorithm.prepare_old_policy(net, rollout, batches)
    advantages = algorithm.advantages(torch.randn(P, G))
    for batch in batches:
        loss, stats = algorithm.loss(net, old, advantages, batch)
        assert float(stats["ratio_max_dev"]) == 0.0
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    # from the rollout's own log-probs and velocities: 1 up to batching
    _, stats = algorithm.loss(net, rollout, advantages, batches[0])
    assert float(stats["ratio_max_dev"]) < 1e-6


@pytest.mark.parametrize("norm, reweight", [(True, True), (True, False), (False, True)])
def test_off_policy_loss_is_the_reference_formula_where_the_clip_binds(norm, reweight):
    torch.manual_seed(0)
    net = TinyVelocity()
    algorithm = _guarded("recompute", eps_clip=1e-3)
    algorithm.config.guard_ratio_norm, algorithm.config.guard_grad_reweight = norm, reweight
    rollout = _rollout(algorithm, net)
    batches = algorithm.minibatches(rollout, 0)
    old = algorithm.prepare_old_policy(net, rollout, batches)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    advantages = algorithm.advantages(torch.randn(P, G))
    loss, stats = algorithm.loss(net, old, advantages, batches[0])
    # by hand (train_sd3_GRPO_Guard.py L893-L937) with torch.distributions for the log-densities
    members = batches[0].members
    cond = old.cond.repeat_interleave(members.shape[1])
    take = lambda t: torch.stack([t[p, members[p]] for p in range(P)]).flatten(0, 1)
    expected = []
    for j in batches[0].steps:
        s, s_next, s_1 = float(old.sigmas[j]), float(old.sigmas[j + 1]), float(old.sigmas[1])
        x, x_next = take(old.states[j]), take(old.states[j + 1])
        with torch.no_grad():
            mean, std = flow_grpo_mean_std(x, net(x, old.sigmas[j], cond), s, s_next, 0.7, s_1)
            old_mean, _ = flow_grpo_mean_std(x, take(old.velocities[j]), s, s_next, 0.7, s_1)
        log_p = lambda m: torch.distributions.Normal(m, std).log_prob(x_next).flatten(1).mean(1)
        log_ratio = log_p(mean) - log_p(old_mean)
        if norm:
            log_ratio = (log_ratio + (mean - old_mean).pow(2).flatten(1).mean(1) / (2 * std**2)) * std
        ratio, A = log_ratio.exp(), take(advantages)
        step = torch.maximum(-A * ratio, -A * ratio.clamp(1 - 1e-3, 1 + 1e-3)).mean()
        expected.append(step / (math.sqrt(s - s_next) ** 2) if reweight else step)
    assert float(loss.detach()) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
    assert float(stats["clip_fraction"]) > 0


def test_config_refuses_cps_with_either_guard_flag():
    for flag in ("guard_ratio_norm", "guard_grad_reweight"):
        with pytest.raises(ConfigError) as error:
            load_config(None, ["algorithm=flow_grpo", "flow_grpo.sde_type=cps", f"flow_grpo.{flag}=true"])
        message = str(error.value)
        assert "\n" not in message and "flow_grpo.sde_type" in message and "flow_grpo.guard_ratio_norm" in message
    assert load_config(None, ["flow_grpo.guard_ratio_norm=true", "flow_grpo.guard_grad_reweight=true"]).flow_grpo.guard_ratio_norm


def test_two_iterations_train_on_the_built_in_model(tmp_path):
    from neighbor_grpo.bench.compare import PAPER_SETTINGS
    from neighbor_grpo.training.logs import read_metrics
    from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
    from neighbor_grpo.rewards import WeightedRewards
    from neighbor_grpo.training.trainer import train

    config = load_config(None, PAPER_SETTINGS["grpo_guard"] + [
        "iterations=2", "prompts_per_iteration=2", "eval.every=2", "eval.samples_per_prompt=2", "flow_grpo.group_size=4",
        "flow_grpo.rollout_steps=4", "optim.lr=1e-3"])
    assert config.flow_grpo.guard_ratio_norm and config.flow_grpo.guard_grad_reweight
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)
    start = [p.detach().clone() for p in adapter.net.parameters()]
    rewards = WeightedRewards({"brightness_for_test": lambda images, prompts: images.mean(dim=(1, 2, 3))},
                              {"brightness_for_test": 1.0})
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=rewards)
    _, rows = read_metrics(result.run_dir / "metrics.csv")
    trained = [row for row in rows if row["ratio_mean"]]  # the other rows are the evaluations
    assert result.iterations == 2 and len(trained) == 2
    assert all(math.isfinite(float(row["ratio_mean"])) for row in trained)
    assert any(not torch.equal(a, b) for a, b in zip(start, adapter.net.parameters()))
