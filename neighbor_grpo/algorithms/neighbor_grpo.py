"""Neighbor GRPO (arXiv 2511.16955): GRPO for flow models without an SDE.

Exploration lives in the initial noise (a neighbourhood of G correlated noises, Eq. 7); rollouts are
deterministic ODE solves; the policy is the "leaping policy" (Eq. 8): one Euler step with the current
parameters from an anchor's stored state, and a softmax over negative distances to all G candidates'
next states. Trained with the clipped GRPO objective (Eq. 9) and quasi-norm advantages (Eq. 11).
`policy_space: x0` measures the same softmax on predicted clean samples instead (few-step models; docs/algorithms.md).
"""

from __future__ import annotations

from typing import Sequence

import torch

from neighbor_grpo.config.algorithm_settings import NeighborGRPOConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages, quasi_norm_advantages
from neighbor_grpo.algorithms.common import (Minibatch, Phase, Rollout, VelocityFn, batched_velocity, gather_members,
                                             per_call, pick_steps, repeat_cond, rollout_phase, solver_evaluations)
from neighbor_grpo.maths.flow import full_precision, sigma_grid
from neighbor_grpo.maths.noise import keyed_generator, neighbor_noises
from neighbor_grpo.maths.solvers import integrate

ROLE_ANCHORS, ROLE_STEPS = 7_000_001, 7_000_002


def leap(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """One Euler step: xhat = x_j + (s_{j+1} - s_j) v, in float32 at least (a bf16 net's v)."""
    return full_precision(x) + (s_next - s) * full_precision(v)


def x0_prediction(x: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
    """x0hat = x_j - s_j v: the clean sample the velocity points at (x_s = (1 - s) x0 + s eps, v = eps - x0)."""
    return x - s * v


def squared_distances(candidates: torch.Tensor, predictions: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """dist(x_{j+1}^(i), xhat^(k)) for candidates (P, G, *latent), predictions (P, B, *latent) -> (P, B, G), in
    float32 at least: the softmax over them (leaping_log_policy) then is too."""
    diff = full_precision(candidates).unsqueeze(1) - full_precision(predictions).unsqueeze(2)
    squared = diff.pow(2).flatten(3)
    if reduction == "mean":
        return squared.mean(-1)
    if reduction == "sum":
        return squared.sum(-1)
    raise ValueError(f"distance_reduction must be 'mean' or 'sum'; got {reduction!r}")


def temperature(old_distances: torch.Tensor, tau_rel: float, tau: float | None) -> torch.Tensor:
    """tau = tau_rel * median_i dist_old_i per (anchor, step), detached; or the fixed tau."""
    if tau is not None:
        return torch.full_like(old_distances[..., :1], float(tau))
    median = torch.quantile(old_distances, 0.5, dim=-1, keepdim=True)  # the midpoint for even G
    return (tau_rel * median).detach().clamp_min(1e-12)


def leaping_log_policy(distances: torch.Tensor, tau: torch.Tensor, self_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(i) = log_softmax_i(-dist_i / tau); masked candidates get -inf."""
    logits = -distances / tau
    if self_mask is not None:
        logits = logits.masked_fill(self_mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


# ---- Eq. 9: the clipped GRPO objective ------------------------------------------------------------------------

def clipped_grpo_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_clip: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """L = -mean over (anchor, step) of sum_i min(A_i rho_i, A_i clip(rho_i, 1 - eps, 1 + eps))."""
    rho = log_ratio.exp()
    surrogate = torch.minimum(advantages * rho, advantages * rho.clamp(1 - eps_clip, 1 + eps_clip))
    if valid is not None:
        surrogate = surrogate.masked_fill(~valid, 0.0)
    return -surrogate.sum(-1).mean()


class NeighborGRPO:
    """rollout -> advantages -> minibatches -> loss, with the leaping policy."""

    name = "neighbor_grpo"

    def __init__(self, config: NeighborGRPOConfig = NeighborGRPOConfig(), seed: int = 0):
        self.config = config
        self.seed = seed

    # -- 1, 2: noise neighbourhood and deterministic rollout --
    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond: torch.Tensor, prompts: Sequence[str], prompt_indices: Sequence[int],
                iteration: int, latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                candidates: slice | None = None) -> Rollout:
        """`candidates`: only that block of each group (a group split over processes); its noises are the ones
        the whole group's rollout gives those candidates, so the blocks together are the whole group's rollout."""
        c = self.config
        noises = torch.stack([neighbor_noises(latent_shape, c.group_size, c.neighbor_sigma, self.seed, iteration, index, device)
                              for index in prompt_indices])  # (P, G, *latent)
        if candidates is not None:
            noises = noises[:, candidates]
        sigmas = sigma_grid(c.rollout_steps, shift=c.shift or 1.0).to(device)
        return ode_rollout(velocity, noises, cond, sigmas, c.rollout_solver, list(prompts), list(prompt_indices))

    # -- 3: advantages --
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return quasi_norm_advantages(rewards, self.config.quasi_norm_p, self.config.adv_eps)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip, self.config.adv_recenter)

    # -- 4: symmetric anchor sampling, K steps, one minibatch per trained step --
    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        c = self.config
        G, N = rollout.group_size, rollout.states.shape[0] - 1
        steps = pick_steps(N, c.trained_steps, c.step_selection, keyed_generator(self.seed, iteration, ROLE_STEPS))
        anchors = torch.stack([torch.randperm(G, generator=keyed_generator(self.seed, iteration, index, ROLE_ANCHORS))[:c.num_anchors]
                               for index in rollout.prompt_indices])  # (P, B)
        return [Minibatch(steps=[j], members=anchors) for j in steps]

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        """With old_policy='recompute', overwrite the stored velocities at the trained (anchor, step) pairs
        with a no-grad pass batched exactly like the training pass (so rho = 1 bitwise before the update)."""
        if self.config.old_policy == "rollout":
            return rollout
        if self.config.old_policy != "recompute":
            raise ValueError(f"old_policy must be 'rollout' or 'recompute'; got {self.config.old_policy!r}")
        velocities = rollout.velocities.clone()
        with torch.no_grad():
            for batch in batches:
                for j in batch.steps:
                    x = gather_members(rollout.states[j], batch.members)
                    v = batched_velocity(velocity, x, rollout.sigmas[j], rollout.cond)
                    index = batch.members.view(*batch.members.shape, *([1] * (x.dim() - 2))).expand_as(x)
                    velocities[j].scatter_(1, index.to(x.device), v)
        return rollout._replace(velocities=velocities)

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase): the ODE rollout of all P*G candidates; at each of the
        K trained steps one with-grad call on the P*B anchors per micro-batch, the reference at the same states
        when ref_beta > 0, and with old_policy 'recompute' a no-grad pass over all anchors and steps before the
        first update (on the whole batch, not micro-batched: prepare_old_policy gets every prompt)."""
        c = self.config
        if c.old_policy not in ("rollout", "recompute"):
            raise ValueError(f"old_policy must be 'rollout' or 'recompute'; got {c.old_policy!r}")
        steps = c.rollout_steps if c.step_selection == "all" else c.trained_steps  # as pick_steps
        anchors = min(c.num_anchors, c.group_size)
        units, batch = prompts * anchors * steps, per_call(prompts, micro_batch) * anchors
        phases = [rollout_phase(prompts, c.group_size, solver_evaluations(c.rollout_solver, c.rollout_steps),
                                rollout_chunk)]
        if c.old_policy == "recompute":
            phases.append(Phase("old_policy", units, prompts * anchors, False, "policy"))
        phases.append(Phase("train", units, batch, True, "policy"))
        if c.ref_beta > 0:
            phases.append(Phase("reference", units, batch, False, "reference"))
        return phases

    # -- 5, 6: leaping policy and clipped loss --
    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        anchors = batch.members  # (P, B)
        total, stats = 0.0, []
        for j in batch.steps:
            x = gather_members(rollout.states[j], anchors)  # (P, B, *latent)
            v = batched_velocity(velocity, x, rollout.sigmas[j], rollout.cond)
            v_old = gather_members(rollout.velocities[j], anchors)
            candidates, predict = policy_space(c, rollout, j, x)  # (P, G, *latent), velocity -> (P, B, *latent)
            dist = squared_distances(candidates, predict(v), c.distance_reduction)
            dist_old = squared_distances(candidates, predict(v_old), c.distance_reduction)
            tau = temperature(dist_old, c.tau_rel, c.tau)
            self_mask = None
            if c.exclude_self:
                self_mask = torch.zeros_like(dist, dtype=torch.bool).scatter_(2, anchors.unsqueeze(-1).to(dist.device), True)
            log_pi = leaping_log_policy(dist, tau, self_mask)
            log_pi_old = leaping_log_policy(dist_old, tau, self_mask)
            valid = None if self_mask is None else ~self_mask
            log_ratio = (log_pi - log_pi_old)
            if valid is not None:
                log_ratio = log_ratio.masked_fill(~valid, 0.0)
            step_loss = clipped_grpo_loss(log_ratio, advantages.unsqueeze(1), c.eps_clip, valid)
            if c.ref_beta > 0 and reference_velocity is not None:
                with torch.no_grad():
                    v_ref = batched_velocity(reference_velocity, x, rollout.sigmas[j], rollout.cond)
                step_loss = step_loss + c.ref_beta * (full_precision(v) - full_precision(v_ref)).pow(2).mean()
            total = total + step_loss
            stats.append(policy_stats(log_ratio.detach(), log_pi_old, c.eps_clip, valid, tau))
        merged = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
        return total / len(batch.steps), merged


def policy_space(config: NeighborGRPOConfig, rollout: Rollout, j: int, x: torch.Tensor):
    """What the leaping policy compares at trained step j, for anchor states x (P, B, *latent): the G candidates'
    points (P, G, *latent) and the map from an anchor velocity to its prediction. 'next_state' (Eq. 8): candidates
    x_{j+1}^(i), prediction x_j + (s_{j+1} - s_j) v. 'x0' (few-step models, after AR-CoPO): candidates' old clean
    predictions x_j^(i) - s_j v_old^(i) (or their final samples), prediction x_j - s_j v."""
    s, s_next = float(rollout.sigmas[j]), float(rollout.sigmas[j + 1])
    if config.policy_space == "next_state":
        return rollout.states[j + 1], lambda v: leap(x, v, s, s_next)
    if config.policy_space != "x0":
        raise ValueError(f"neighbor_grpo.policy_space must be 'next_state' or 'x0'; got {config.policy_space!r}")
    if config.x0_candidates == "final":
        candidates = rollout.final
    elif config.x0_candidates == "step":
        candidates = x0_prediction(rollout.states[j], rollout.velocities[j], s)
    else:
        raise ValueError(f"neighbor_grpo.x0_candidates must be 'step' or 'final'; got {config.x0_candidates!r}")
    return candidates, lambda v: x0_prediction(x, v, s)


@torch.no_grad()
def ode_rollout(velocity: VelocityFn, noises: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, solver: str,
                prompts: list[str], prompt_indices: list[int]) -> Rollout:
    """Integrate all P*G noises at once with an ODE solver, keeping every state and velocity."""
    P, G = noises.shape[:2]
    flat_cond = repeat_cond(cond, G)
    trajectory = integrate(lambda x, s: velocity(x, s, flat_cond), noises.reshape(P * G, *noises.shape[2:]), sigmas, solver)
    states = trajectory.states.reshape(len(sigmas), P, G, *noises.shape[2:])
    velocities = trajectory.velocities.reshape(len(sigmas) - 1, P, G, *noises.shape[2:])
    return Rollout(prompts, prompt_indices, cond, sigmas, states, velocities)


def policy_stats(log_ratio: torch.Tensor, log_pi_old: torch.Tensor, eps_clip: float, valid: torch.Tensor | None,
                 tau: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ratio mean, clip fraction and KL(pi_old || pi_theta) over the candidate distributions, as detached 0-dim
    tensors on the device (read to the host once per iteration by the trainer, not once per step)."""
    rho = log_ratio.exp()
    weights = torch.ones_like(rho) if valid is None else valid.float()
    pi_old = log_pi_old.exp().nan_to_num(0.0)
    kl = (pi_old * (-log_ratio)).nan_to_num(0.0).sum(-1).mean()
    stats = {
        "ratio_mean": (rho * weights).sum() / weights.sum(),
        "clip_fraction": (((rho - 1).abs() > eps_clip).float() * weights).sum() / weights.sum(),
        "approx_kl": kl,
        "tau": tau.mean(),
        "policy_max_prob": pi_old.max(-1).values.mean(),
    }
    return {key: value.detach().float() for key, value in stats.items()}
