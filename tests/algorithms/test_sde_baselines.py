"""SDE baselines (Flow-GRPO, DanceGRPO, MixGRPO): steps against the spec's formulas, log-probs against
torch.distributions, ratio 1 before the first update, the sign of the gradient, noise/window structure and
model-evaluation counts, on a tiny conditional velocity MLP."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.algorithms.dance_grpo import DanceGRPO, DanceGRPOConfig
from neighbor_grpo.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from neighbor_grpo.algorithms.mix_grpo import MixGRPO, MixGRPOConfig, dpmpp_2m_step, window_steps
from neighbor_grpo.algorithms.sde import (dance_grpo_sde_step, flow_grpo_sde_step, gaussian_log_prob,
                                          transition_log_prob)
from neighbor_grpo.maths.flow import predict_x0, sigma_grid
from neighbor_grpo.maths.solvers import dpmpp_2m

LATENT = (1, 4, 4)
P = 2


class TinyVelocity(nn.Module):
    """v(x, s, label): a small MLP on the flattened latent, flow time and an embedded integer label."""

    def __init__(self, classes: int = 3, hidden: int = 32):
        super().__init__()
        dim = math.prod(LATENT)
        self.inp = nn.Linear(dim + 1, hidden)
        self.label = nn.Embedding(classes, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x, s, cond):
        s = s.reshape(-1).expand(x.shape[0]) if s.numel() == 1 else s.reshape(-1)
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), s[:, None].to(x)], 1)) + self.label(cond))
        return self.out(h).view_as(x)


class Counted:
    """Velocity function that counts per-sample evaluations, split into with-grad and no-grad."""

    def __init__(self, net):
        self.net, self.train, self.no_grad = net, 0, 0

    def __call__(self, x, s, cond):
        if torch.is_grad_enabled():
            self.train += x.shape[0]
        else:
            self.no_grad += x.shape[0]
        return self.net(x, s, cond)


def configs(old_policy="rollout", **extra):
    """Small configs of every baseline (and MixGRPO-Flash), keyed by a readable name."""
    return {
        "flow_grpo": FlowGRPO(FlowGRPOConfig(group_size=4, rollout_steps=4, old_policy=old_policy, **extra), seed=3),
        "dance_grpo": DanceGRPO(DanceGRPOConfig(group_size=4, rollout_steps=6, old_policy=old_policy, **extra), seed=3),
        "mix_grpo": MixGRPO(MixGRPOConfig(group_size=4, rollout_steps=8, window_size=2, window_interval=2,
                                          old_policy=old_policy, **extra), seed=3),
        "mix_grpo_flash": MixGRPO(MixGRPOConfig(group_size=4, rollout_steps=10, window_size=3, window_interval=2,
                                                flash=True, old_policy=old_policy, **extra), seed=3),
    }


def make_rollout(algorithm, velocity, iteration=1):
    cond = torch.tensor([0, 2])
    return algorithm.rollout(velocity, cond, ["0", "2"], [0, 1], iteration, LATENT)


# ---- (a) the steps are the spec's formulas ------------------------------------------------------------------

GRID = [(1.0, 0.9), (0.9, 0.75), (0.5, 0.3), (0.1, 0.0)]


@pytest.mark.parametrize("s,s_next", GRID)
def test_flow_grpo_step_is_the_spec_formula(s, s_next):
    x, v, z = torch.randn(3, 5, *LATENT, dtype=torch.float64).unbind(0)
    a, s_1 = 0.7, 0.9
    denominator = 1 - (s_1 if s == 1 else s)  # the reference's torch.where(sigma == 1, sigma_max, sigma)
    sigma_t = a * math.sqrt(s / denominator)
    dt = s_next - s
    mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    x_next = mean + sigma_t * math.sqrt(-dt) * z
    step = flow_grpo_sde_step(x, v, s, s_next, z, noise_level=a, s_1=s_1)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.x_next, x_next)
    assert step.std == pytest.approx(sigma_t * math.sqrt(-dt))


def test_flow_grpo_first_step_needs_s1_and_is_finite():
    x = torch.randn(2, *LATENT)
    with pytest.raises(ValueError, match="s_1"):
        flow_grpo_sde_step(x, x, 1.0, 0.9, torch.zeros_like(x))
    step = flow_grpo_sde_step(x, x, 1.0, 0.9, torch.zeros_like(x), noise_level=0.7, s_1=0.9)
    assert step.std == pytest.approx(0.7)  # sqrt(1 / (1 - s_1)) * sqrt(1 - s_1) = 1
    assert torch.isfinite(step.mean).all()


@pytest.mark.parametrize("s,s_next", GRID)
def test_dance_grpo_step_is_the_spec_formula(s, s_next):
    x, v, z = torch.randn(3, 5, *LATENT, dtype=torch.float64).unbind(0)
    eta = 0.3
    mean = x + (s_next - s) * v
    x0hat = x - s * v
    score = -(x - (1 - s) * x0hat) / s**2
    mean = mean + -0.5 * eta**2 * score * (s_next - s)
    std = eta * math.sqrt(s - s_next)
    step = dance_grpo_sde_step(x, v, s, s_next, z, eta=eta)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.x_next, mean + std * z)
    assert step.std == pytest.approx(std)


def test_steps_draw_their_noise_from_the_given_generator():
    x, v = torch.randn(2, 3, *LATENT).unbind(0)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    drawn = dance_grpo_sde_step(x, v, 0.5, 0.4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn.x_next, dance_grpo_sde_step(x, v, 0.5, 0.4, z).x_next)
    with pytest.raises(ValueError):
        dance_grpo_sde_step(x, v, 0.5, 0.4)


# ---- (b) the log-prob is the Gaussian's, averaged over latent dims ------------------------------------------

@pytest.mark.parametrize("std", [0.05, 0.7, 2.0])
def test_gaussian_log_prob_is_normal_log_prob_averaged_over_dims(std):
    mean, x_next = torch.randn(2, 6, *LATENT, dtype=torch.float64).unbind(0)
    expected = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std), expected)
    # batch_dims=2 keeps (P, M) and averages the latent dims only
    torch.testing.assert_close(gaussian_log_prob(x_next.view(2, 3, *LATENT), mean.view(2, 3, *LATENT), std, batch_dims=2),
                               expected.view(2, 3))


# ---- (c) ratio 1 before the first update --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash"])
@pytest.mark.parametrize("old_policy", ["recompute", "rollout"])
def test_ratio_is_one_before_the_first_update(name, old_policy):
    torch.manual_seed(0)
    velocity = TinyVelocity()
    algorithm = configs(old_policy)[name]
    rollout = make_rollout(algorithm, velocity)
    advantages, _ = algorithm.clip(algorithm.advantages(torch.randn(P, 4)))
    batches = algorithm.minibatches(rollout, 1)
    assert batches
    rollout = algorithm.prepare_old_policy(velocity, rollout, batches)
    for batch in batches:
        loss, stats = algorithm.loss(velocity, rollout, advantages, batch)
        assert torch.isfinite(loss)
        assert {"ratio_mean", "clip_fraction", "approx_kl"} <= set(stats)
        if old_policy == "recompute":  # same batching as the training pass: bitwise
            assert stats["ratio_mean"] == 1.0 and stats["ratio_max_dev"] == 0.0 and stats["approx_kl"] == 0.0
        else:  # the rollout batched all P*G samples at once: equal to float tolerance
            assert stats["ratio_max_dev"] < 1e-6
        assert stats["clip_fraction"] == 0.0


# ---- (d) the sign of the gradient -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo"])
def test_a_gradient_step_raises_the_log_prob_of_high_advantage_samples(name):
    torch.manual_seed(1)
    net = TinyVelocity()
    algorithm = configs("recompute", num_minibatches=1)[name]
    rollout = make_rollout(algorithm, net)
    advantages = algorithm.advantages(torch.randn(P, 4))
    [batch] = algorithm.minibatches(rollout, 1)
    rollout = algorithm.prepare_old_policy(net, rollout, [batch])

    def log_probs():
        with torch.no_grad():
            return torch.stack([transition_log_prob(net, rollout, j, batch.members, algorithm._mean_std)[0] for j in batch.steps])

    before = log_probs()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss, _ = algorithm.loss(net, rollout, advantages, batch)
    loss.backward()
    optimizer.step()
    change = log_probs() - before  # (K, P, G)
    # On-policy, the step follows +sum_i A_i grad log pi_i: the advantage-weighted log-prob must rise.
    assert float((advantages * change).sum()) > 0
    top, bottom = advantages.argmax(dim=1), advantages.argmin(dim=1)
    rows = torch.arange(P)
    assert float(change[:, rows, top].mean()) > float(change[:, rows, bottom].mean())


# ---- (e) noise and window structure -------------------------------------------------------------------------

def test_dance_grpo_group_shares_one_initial_noise_and_flow_grpo_does_not():
    velocity = TinyVelocity()
    dance = make_rollout(configs()["dance_grpo"], velocity)
    flow = make_rollout(configs()["flow_grpo"], velocity)
    for p in range(P):
        assert all(torch.equal(dance.states[0, p, 0], dance.states[0, p, i]) for i in range(1, 4))
        assert not any(torch.equal(flow.states[0, p, 0], flow.states[0, p, i]) for i in range(1, 4))
    assert not torch.equal(dance.states[0, 0, 0], dance.states[0, 1, 0])  # prompts get their own noise
    # the SDE noise still differs per candidate, so the shared start fans out
    assert not torch.equal(dance.states[1, 0, 0], dance.states[1, 0, 1])


@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash"])
def test_rollouts_are_keyed_and_their_last_step_is_deterministic(name):
    velocity = TinyVelocity()
    algorithm = configs()[name]
    first, again, other = (make_rollout(algorithm, velocity, it) for it in (4, 4, 5))
    assert torch.equal(first.states, again.states) and torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.states[-1], other.states[-1])
    # the last step is never stochastic: it lands on x0hat (the image DanceGRPO decodes)
    assert not bool(first.sde_mask[-1])
    torch.testing.assert_close(first.states[-1], predict_x0(first.states[-2], first.velocities[-1], float(first.sigmas[-2])))
    assert torch.all(first.log_probs[~first.sde_mask] == 0) and torch.all(first.log_probs[first.sde_mask] != 0)


def test_flow_grpo_trains_all_steps_but_the_last_and_fast_mode_a_window():
    velocity = TinyVelocity()
    rollout = make_rollout(FlowGRPO(FlowGRPOConfig(group_size=4, rollout_steps=10)), velocity)
    assert rollout.sde_mask.tolist() == [True] * 9 + [False]
    fast = FlowGRPO(FlowGRPOConfig(group_size=4, rollout_steps=10, fast_window_size=2), seed=3)
    windows = set()
    for iteration in range(12):
        mask = fast.sde_mask(iteration)
        steps = torch.nonzero(mask).flatten().tolist()
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and steps[1] < 5  # inside [0, N // 2)
        windows.add(steps[0])
    assert len(windows) > 1


def test_mix_grpo_window_slides_with_the_iteration_and_rolls_back():
    # N = 8: trainable starts 0..5 (the reference's max_timesteps = N - 2), cut at step 6
    assert [window_steps(it, 8, 2, 1, 2) for it in (0, 1, 2, 3, 10, 11, 12)] == \
        [[0, 1], [0, 1], [1, 2], [1, 2], [5], [5], [0, 1]]
    assert window_steps(100, 8, 2, 1, 2, roll_back=False) == [5]
    assert window_steps(4, 25, 4, 2, 1) == [8, 9, 10, 11]


def test_mix_grpo_is_stochastic_only_inside_the_window_and_euler_elsewhere():
    velocity = TinyVelocity()
    algorithm = configs()["mix_grpo"]
    for iteration in (0, 2, 4):
        rollout = make_rollout(algorithm, velocity, iteration)
        window = algorithm.window(iteration)
        assert torch.nonzero(rollout.sde_mask).flatten().tolist() == window
        assert window == [iteration // 2, iteration // 2 + 1]
        for j in range(len(rollout.sigmas) - 1):
            if j not in window:
                euler = rollout.states[j] + (float(rollout.sigmas[j + 1]) - float(rollout.sigmas[j])) * rollout.velocities[j]
                torch.testing.assert_close(rollout.states[j + 1], euler)
        assert [b.steps for b in algorithm.minibatches(rollout, iteration)] == [window] * algorithm.config.num_minibatches


def test_dpmpp_2m_step_replays_the_library_solver():
    torch.manual_seed(2)
    net = TinyVelocity()
    cond = torch.tensor([1, 1, 2])
    sigmas = sigma_grid(7, shift=3.0)
    states, velocities = [], []
    final = dpmpp_2m(lambda x, s: net(x, s, cond), torch.randn(3, *LATENT), sigmas,
                     callback=lambda j, x, v: (states.append(x), velocities.append(v)))
    states.append(final)
    grid = sigmas.double().tolist()
    for j in range(len(grid) - 1):
        previous = predict_x0(states[j - 1], velocities[j - 1], grid[j - 1]) if j > 0 else None
        step = dpmpp_2m_step(states[j], velocities[j], grid[j], grid[j + 1], previous, grid[j - 1] if j > 0 else None)
        torch.testing.assert_close(step, states[j + 1])


def test_mix_grpo_flash_compresses_the_ode_part_after_the_window():
    velocity = TinyVelocity()
    algorithm = configs()["mix_grpo_flash"]  # N = 10, window 3
    rollout = make_rollout(algorithm, velocity, iteration=2)  # window [1, 2, 3]
    window = algorithm.window(2)
    assert window == [1, 2, 3]
    full = sigma_grid(10)
    # the full grid up to the step after the window, then int(0.4 * (10 - 3)) = 2 points down to 0
    torch.testing.assert_close(rollout.sigmas[:5], full[:5])
    assert len(rollout.sigmas) == 6 and float(rollout.sigmas[-1]) == 0.0
    grid = rollout.sigmas.double().tolist()
    for j in range(4, len(grid) - 1):  # after the window: DPM-Solver++ with the previous step as history
        previous = predict_x0(rollout.states[j - 1], rollout.velocities[j - 1], grid[j - 1])
        expected = dpmpp_2m_step(rollout.states[j], rollout.velocities[j], grid[j], grid[j + 1], previous, grid[j - 1])
        torch.testing.assert_close(rollout.states[j + 1], expected)


# ---- (f) model evaluations -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash"])
@pytest.mark.parametrize("minibatch_by", ["samples", "steps"])
def test_model_evaluations_per_rollout_and_per_update(name, minibatch_by):
    counted = Counted(TinyVelocity())
    algorithm = configs("recompute", minibatch_by=minibatch_by)[name]
    rollout = make_rollout(algorithm, counted)
    G, N = rollout.group_size, len(rollout.sigmas) - 1
    assert (counted.no_grad, counted.train) == (N * P * G, 0)
    counted.no_grad = 0
    batches = algorithm.minibatches(rollout, 1)
    trained = sorted({j for b in batches for j in b.steps})
    assert set(trained) <= set(torch.nonzero(rollout.sde_mask).flatten().tolist())
    if minibatch_by == "samples":  # every candidate exactly once per trained step
        members = torch.cat([b.members for b in batches], dim=1).sort(dim=1).values
        assert torch.equal(members, torch.arange(G).expand(P, G))
        assert len(batches) == algorithm.config.num_minibatches
    else:
        assert [b.steps for b in batches] == [[j] for j in trained]
    rollout = algorithm.prepare_old_policy(counted, rollout, batches)
    assert (counted.no_grad, counted.train) == (len(trained) * P * G, 0)  # recompute: one no-grad pass
    advantages = algorithm.advantages(torch.randn(P, G))
    for batch in batches:
        algorithm.loss(counted, rollout, advantages, batch)
    assert counted.train == len(trained) * P * G


def test_dance_grpo_trains_a_random_fraction_of_the_steps_before_the_last():
    velocity = TinyVelocity()
    algorithm = DanceGRPO(DanceGRPOConfig(group_size=4, rollout_steps=11), seed=0)
    rollout = make_rollout(algorithm, velocity)
    picks = {tuple(algorithm.minibatches(rollout, it)[0].steps) for it in range(6)}
    assert all(len(steps) == 6 and max(steps) < 10 for steps in picks)  # int(0.6 * 10) of steps 0..9
    assert len(picks) > 1


# ---- advantages and the KL --------------------------------------------------------------------------------

def test_advantage_statistics_follow_each_reference():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    flow = FlowGRPO(FlowGRPOConfig(global_std=False))
    torch.testing.assert_close(flow.advantages(rewards), centered / (rewards.std(dim=1, correction=0, keepdim=True) + 1e-4))
    flow_global = FlowGRPO(FlowGRPOConfig(global_std=True))
    torch.testing.assert_close(flow_global.advantages(rewards), centered / (rewards.std(correction=0) + 1e-4))
    for algorithm in (DanceGRPO(), MixGRPO()):
        torch.testing.assert_close(algorithm.advantages(rewards), centered / (rewards.std(dim=1, keepdim=True) + 1e-8))


def test_flow_grpo_kl_is_zero_against_itself_and_positive_against_another_model():
    torch.manual_seed(3)
    net, other = TinyVelocity(), TinyVelocity()
    algorithm = FlowGRPO(FlowGRPOConfig(group_size=4, rollout_steps=4, kl_beta=0.04, num_minibatches=1))
    rollout = make_rollout(algorithm, net)
    [batch] = algorithm.minibatches(rollout, 1)
    advantages = algorithm.advantages(torch.randn(P, 4))
    _, same = algorithm.loss(net, rollout, advantages, batch, reference_velocity=net)
    loss, different = algorithm.loss(net, rollout, advantages, batch, reference_velocity=other)
    assert same["kl_loss"] == 0.0 and different["kl_loss"] > 0
    assert loss.requires_grad


def test_registered_under_their_names():
    assert ALGORITHMS["flow_grpo"] is FlowGRPO and ALGORITHMS["dance_grpo"] is DanceGRPO and ALGORITHMS["mix_grpo"] is MixGRPO


def test_dance_grpo_trains_14_of_25_steps_as_its_reference():
    """XueZeyue/DanceGRPO fastvideo/train_grpo_flux.py (ff7bee1) keeps N - 1 steps (lines 512-519, `[:, :-1]`),
    shuffles them (551-556) and trains int((N - 1) * timestep_fraction) (570): int(24 * 0.6) = 14 at N = 25."""
    velocity = TinyVelocity()
    algorithm = DanceGRPO(DanceGRPOConfig(group_size=2), seed=0)  # the defaults: N = 25, fraction 0.6
    assert algorithm.config.rollout_steps == 25 and algorithm.config.train_step_fraction == 0.6
    rollout = algorithm.rollout(velocity, torch.tensor([1]), ["1"], [0], 0, LATENT)
    assert torch.nonzero(rollout.sde_mask).flatten().tolist() == list(range(24))
    for iteration in range(3):
        batches = algorithm.minibatches(rollout, iteration)
        steps = {j for batch in batches for j in batch.steps}
        assert len(steps) == int(24 * 0.6) == 14 and max(steps) <= 23
        assert all(batch.steps == sorted(steps) for batch in batches)


# ---- (g) backward per trained step, as the references ----------------------------------------------------------

@pytest.mark.parametrize("micro_batch", [None, 1])
@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash"])
def test_backward_per_step_gives_the_summed_loss_gradient(name, micro_batch, monkeypatch):
    """The trainer backpropagates each trained step of a minibatch on its own (loss_parts): the gradient equals
    the one of the minibatch's loss summed over its steps and backpropagated once, to 1e-6, and so does the
    logged loss; the KL term (Flow-GRPO) is part of it."""
    from neighbor_grpo.training.iteration import accumulate_gradients

    torch.manual_seed(4)
    net, reference = TinyVelocity(), TinyVelocity()
    algorithm = configs("recompute", num_minibatches=1)[name]
    if name == "flow_grpo":
        algorithm = FlowGRPO(dataclasses.replace(algorithm.config, kl_beta=0.05), seed=3)
    rollout = make_rollout(algorithm, net)
    advantages = algorithm.advantages(torch.randn(P, 4))
    [batch] = algorithm.minibatches(rollout, 1)
    assert len(batch.steps) >= 2, "the case needs several steps in one minibatch"
    rollout = algorithm.prepare_old_policy(net, rollout, [batch])
    with torch.no_grad():  # off-policy, so the ratio and the clip are not trivially 1
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    summed, _ = algorithm.loss(net, rollout, advantages, batch, reference)
    summed.backward()
    summed = float(summed)
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    backwards, backward = [], torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: backwards.append(1) or backward(self, *a, **k))
    loss, _ = accumulate_gradients(algorithm, net, rollout, advantages, batch, reference, 1.0, micro_batch, None)
    assert len(backwards) == len(batch.steps) * (P if micro_batch else 1)  # one backward per step (and micro-batch)
    for got, want in zip((p.grad for p in net.parameters()), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert float(loss) == pytest.approx(summed, rel=1e-6, abs=1e-7)
