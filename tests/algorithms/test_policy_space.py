"""Neighbor GRPO's leaping policy in clean-sample space (`policy_space: x0`, docs/algorithms.md): the same
properties the next-state policy has (test_neighbor_grpo.py), in their x0 form, on a tiny random velocity model."""

from __future__ import annotations

import pytest
import torch

import neighbor_grpo.algorithms.neighbor_grpo as ng
from neighbor_grpo.algorithms.neighbor_grpo import policy_space, x0_prediction
from neighbor_grpo.config.train_config import ConfigError, load_config

from test_neighbor_grpo import LATENT, LogRatioSpy, make, param_grad, rel_err, zero_sum_advantages

pytestmark = pytest.mark.usefixtures("single_thread")


def own_x0_policy(model, rollout, anchors, j, tau, candidates_from="step"):
    """Independent x0 policy: x0hat_theta = x_j^(k) - s_j v_theta; candidates x_j^(i) - s_j v_old^(i) (or the final
    samples); mean squared distance; softmax over -dist / tau. Returns (log pi, dist / tau), both (P, B, G)."""
    P, B = anchors.shape
    G = rollout.group_size
    s = rollout.sigmas[j]
    x = torch.stack([rollout.states[j, p, anchors[p]] for p in range(P)])
    v = model(x.reshape(P * B, *LATENT), s, rollout.cond.repeat_interleave(B)).reshape(x.shape)
    predicted = x - s * v
    if candidates_from == "step":
        candidates = rollout.states[j] - s * rollout.velocities[j]
    else:
        candidates = rollout.states[-1]
    dist = torch.stack([torch.stack([(candidates[p, i] - predicted[p, b]).pow(2).mean() for i in range(G)])
                        for p in range(P) for b in range(B)]).reshape(P, B, G)
    scaled = dist / tau
    return torch.log_softmax(-scaled, dim=-1), scaled


@pytest.mark.parametrize("candidates", ["step", "final"])
def test_ratio_is_one_before_the_first_update(monkeypatch, candidates):
    algorithm, model, rollout = make(P=3, G=8, B=4, N=4, old_policy="rollout", policy_space="x0",
                                     x0_candidates=candidates)
    spy = LogRatioSpy(monkeypatch)
    batches = algorithm.minibatches(rollout, 0)
    for batch in batches:
        _, stats = algorithm.loss(model, rollout, zero_sum_advantages(3, 8), batch)
        assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["clip_fraction"] == 0.0
    assert max(float((r.exp() - 1).abs().max()) for r in spy.log_ratios) < 1e-6
    # with recompute rho = 1 bitwise, and one optimizer step moves it (the check can fail)
    algorithm, model, rollout = make(P=3, G=8, B=4, N=4, old_policy="recompute", policy_space="x0",
                                     x0_candidates=candidates)
    rollout = algorithm.prepare_old_policy(model, rollout, batches)
    spy.log_ratios.clear()
    loss, _ = algorithm.loss(model, rollout, zero_sum_advantages(3, 8), batches[0])
    assert torch.equal(spy.log_ratios[-1], torch.zeros_like(spy.log_ratios[-1]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    algorithm.loss(model, rollout, zero_sum_advantages(3, 8), batches[1])
    assert float(spy.log_ratios[-1].abs().max()) > 1e-4


@pytest.mark.parametrize("candidates", ["step", "final"])
def test_surrogate_gradient_equals_contrastive_gradient_in_x0_form(candidates):
    """On-policy, sum_i A_i = 0: grad sum_i A_i log pi_i = grad -sum_i A_i ||x0hat^(i) - x0hat_theta||^2 / tau, and the
    module's loss is -1/(P B) times it (the x0 form of the identity tested for the next-state policy)."""
    P, G, B, tau = 3, 6, 3, 0.05
    algorithm, model, rollout = make(P=P, G=G, B=B, N=4, tau=tau, adv_clip=0.0, eps_clip=1e3, old_policy="recompute",
                                     policy_space="x0", x0_candidates=candidates)
    advantages, _ = algorithm.clip(algorithm.advantages(torch.randn(P, G, generator=torch.Generator().manual_seed(1))))
    batches = algorithm.minibatches(rollout, 0)
    rollout = algorithm.prepare_old_policy(model, rollout, batches)
    for batch in batches:
        (j,) = batch.steps
        log_pi, scaled = own_x0_policy(model, rollout, batch.members, j, tau, candidates)
        A = advantages.unsqueeze(1)
        g_surrogate = param_grad(model, (A * log_pi).sum())
        g_contrastive = param_grad(model, -(A * scaled).sum())
        assert g_contrastive.norm() > 1e-3
        assert rel_err(g_surrogate, g_contrastive) < 1e-4, f"step {j}: {rel_err(g_surrogate, g_contrastive):g}"
        loss, _ = algorithm.loss(model, rollout, advantages, batch)
        assert rel_err(param_grad(model, loss), -g_surrogate / (P * B)) < 1e-4
        # the loss really is the x0 policy: the next-state policy's gradient differs (the check above can fail)
        next_state = ng.NeighborGRPO(algorithm.config.__class__(**{**vars(algorithm.config), "policy_space": "next_state"}))
        other, _ = next_state.loss(model, rollout, advantages, batch)
        assert rel_err(param_grad(model, other), -g_surrogate / (P * B)) > 1e-2


def test_x0_candidates_are_the_old_clean_predictions():
    algorithm, model, rollout = make(P=2, G=5, B=2, N=3, policy_space="x0")
    anchors = algorithm.minibatches(rollout, 0)[0].members
    x = torch.stack([rollout.states[1, p, anchors[p]] for p in range(2)])
    candidates, predict = policy_space(algorithm.config, rollout, 1, x)
    s = float(rollout.sigmas[1])
    torch.testing.assert_close(candidates, rollout.states[1] - s * rollout.velocities[1])
    # each anchor's own old prediction is its candidate: distance exactly 0 under pi_old (unlike next_state)
    v_old = torch.stack([rollout.velocities[1, p, anchors[p]] for p in range(2)])
    own = torch.stack([candidates[p, anchors[p]] for p in range(2)])
    assert torch.equal(predict(v_old), own)
    assert torch.equal(x0_prediction(x, v_old, s), own)
    # at the last step into s = 0 both policies compare the same points (an Euler step to 0 is x - s v)
    final_config = algorithm.config.__class__(**{**vars(algorithm.config), "x0_candidates": "final"})
    candidates, _ = policy_space(final_config, rollout, 2, x)
    assert torch.equal(candidates, rollout.final)


def test_config_fields_are_checked():
    config = load_config(None, ["neighbor_grpo.policy_space=x0", "neighbor_grpo.x0_candidates=final"])
    assert config.neighbor_grpo.policy_space == "x0" and config.neighbor_grpo.x0_candidates == "final"
    with pytest.raises(ConfigError, match="neighbor_grpo.policy_space"):
        load_config(None, ["neighbor_grpo.policy_space=clean"])
    with pytest.raises(ConfigError, match="neighbor_grpo.x0_candidates"):
        load_config(None, ["neighbor_grpo.x0_candidates=last"])


@pytest.mark.parametrize("solver", ["euler", "dpm++2m"])
def test_at_one_step_the_two_policies_are_the_same_policy(solver):
    """With one step from s = 1 to 0 the next state x - v IS the clean prediction x - s v: both policies compare the
    same points, so their loss and gradient agree (the few-step ablation's 1-step rows gave identical curves)."""
    losses, grads = {}, {}
    for space in ("next_state", "x0"):
        algorithm, model, rollout = make(P=3, G=6, B=3, N=1, rollout_solver=solver, old_policy="recompute",
                                         policy_space=space)
        batches = algorithm.minibatches(rollout, 0)
        rollout = algorithm.prepare_old_policy(model, rollout, batches)
        advantages, _ = algorithm.clip(algorithm.advantages(torch.randn(3, 6, generator=torch.Generator().manual_seed(2))))
        loss, _ = algorithm.loss(model, rollout, advantages, batches[0])
        losses[space], grads[space] = loss.item(), param_grad(model, loss)
    assert grads["x0"].norm() > 1e-4
    assert losses["x0"] == pytest.approx(losses["next_state"], rel=1e-6)
    assert rel_err(grads["x0"], grads["next_state"]) < 1e-5
def test_loss_is_ar_copo_objective_with_sum_distances_and_a_fixed_temperature():
    """AR-CoPO's equations as transcribed in docs/algorithms.md, written out here: d_0^(i) = ||x0hat_old^(i) -
    x0hat_theta||^2 (a sum over elements), pi_theta(i) = softmax_i(-d_0^(i) / tau_0), pi_old the same with the old
    parameters' anchor prediction, J = (1/G) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i). With
    distance_reduction: sum and a fixed tau = tau_0 our loss is exactly -G J (averaged over anchors and steps), after
    an update has moved the ratios away from 1 (so the clip and both policies matter)."""
    P, G, B, tau, eps = 2, 6, 3, 40.0, 0.2
    algorithm, model, rollout = make(P=P, G=G, B=B, N=3, tau=tau, eps_clip=eps, adv_clip=0.0, old_policy="rollout",
                                     policy_space="x0", x0_candidates="step", distance_reduction="sum")
    advantages = zero_sum_advantages(P, G, seed=2)
    batch = algorithm.minibatches(rollout, 0)[0]
    loss, _ = algorithm.loss(model, rollout, advantages, batch)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=20.0).step()
    ours, stats = algorithm.loss(model, rollout, advantages, batch)
    assert 0 < stats["clip_fraction"] < 1  # the update moved some ratios past the clip: the comparison covers it
    objectives = []
    with torch.no_grad():
        for j in batch.steps:
            s = rollout.sigmas[j]
            candidates = rollout.states[j] - s * rollout.velocities[j]  # x0hat_old^(i) = F_old(x_j^(i), s_j)
            for p in range(P):
                for k in batch.members[p].tolist():
                    x = rollout.states[j, p, k]
                    theta = x - s * model(x[None], s, rollout.cond[p:p + 1])[0]   # x0hat_theta (current parameters)
                    old = x - s * rollout.velocities[j, p, k]                         # the old parameters' prediction
                    d_theta = (candidates[p] - theta).pow(2).flatten(1).sum(-1)
                    d_old = (candidates[p] - old).pow(2).flatten(1).sum(-1)
                    rho = torch.exp(torch.log_softmax(-d_theta / tau, 0) - torch.log_softmax(-d_old / tau, 0))
                    A = advantages[p]
                    objectives.append(torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A).mean())
    J = torch.stack(objectives).mean()
    assert ours.item() == pytest.approx(-G * J.item(), rel=1e-5, abs=1e-7)
