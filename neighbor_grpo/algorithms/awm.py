"""AWM, Advantage Weighted Matching (Xue et al., arXiv 2509.25050; reference code scxue/advantage_weighted_matching,
scripts/train_sd3_awm.py).

The pretraining flow-matching loss on the policy's own clean samples, weighted per sample by its advantage, with a
robust ("generalised Huber") weighting of the error, a KL to the base model and a KL to an EMA copy of the policy
(a proximal term). On-policy: one optimizer step per rollout batch, so the reference's PPO wrapper (clip range 1,
ratio exactly 1) is the identity and is left out. Rollouts use our ODE solvers (the reference's PickScore config
samples with a deterministic SA-Solver). See /work/shared/spec/competitors.md section 2 and docs/algorithms.md.
"""

from __future__ import annotations

from typing import Sequence

import torch

from neighbor_grpo.config.algorithm_settings import AWMConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages
from neighbor_grpo.algorithms.common import (Minibatch, Phase, Rollout, VelocityFn, gather_members,
                                             members_per_minibatch, per_call, rollout_phase, solver_evaluations)
from neighbor_grpo.algorithms.forward_process import (ROLE_TIMES, IterationSteps, clean_sample_rollout,
                                                      member_minibatches, member_velocity, noised,
                                                      sample_generators, soft_update, std_normalised_advantages,
                                                      training_noises)
from neighbor_grpo.maths.noise import keyed_generator

ERR_FLOOR = 1e-10  # the reference's offset inside the robust weightings


def strata(num_steps: int, fraction: float, count: int, sampler: str) -> list[tuple[int, int]]:
    """The grid-index strata [b_k, b_{k+1}), b = long(linspace(first, int(N * fraction), count + 1)), first = 0
    ('discrete') or 1 ('discrete_wo_init': s = 1 never trained) (train_sd3_awm.py L1138-L1207)."""
    if sampler not in ("discrete", "discrete_wo_init"):
        raise ValueError(f"awm.time_sampler must be 'discrete' or 'discrete_wo_init'; got {sampler!r}")
    first = 1 if sampler == "discrete_wo_init" else 0
    bounds = torch.linspace(first, int(num_steps * fraction), count + 1).long().tolist()
    if any(lo >= hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"awm.num_times={count} leaves an empty stratum on {num_steps} steps; use fewer times")
    return list(zip(bounds, bounds[1:]))


def stratified_indices(bins: list[tuple[int, int]], generator: torch.Generator) -> list[int]:
    """One grid index drawn uniformly in each stratum."""
    return [int(torch.randint(lo, hi, (), generator=generator)) for lo, hi in bins]


def weighted_error(err: torch.Tensor, s: torch.Tensor, weighting: str, p: float = 0.25) -> torch.Tensor:
    """ell(err, s) of compute_log_prob_awm (L210-L252): ghuber s ((err + 1e-10)^p - 1e-10^p) / p (down-weights
    large errors: d ell / d err = s (err + 1e-10)^(p - 1)); uniform err; t s err; t2 s^2 err;
    huber s (sqrt(err + 1e-10) - 1e-5)."""
    if weighting == "ghuber":
        return s * ((err + ERR_FLOOR).pow(p) - ERR_FLOOR**p) / p
    if weighting == "uniform":
        return err
    if weighting == "t":
        return s * err
    if weighting == "t2":
        return s**2 * err
    if weighting == "huber":
        return s * ((err + ERR_FLOOR).sqrt() - 1e-5)
    raise ValueError(f"awm.weighting must be ghuber, uniform, t, t2 or huber; got {weighting!r}")


def awm_policy_loss(v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, a_hat: torch.Tensor,
                    weighting: str, p: float) -> torch.Tensor:
    """mean_i Ahat_i ell(err_i, s_i), err = mean_d (v - (eps - x0))^2 in float64: the gradient of the reference's
    on-policy PPO objective (ratio exp(logp - sg(logp)) = 1, logp = -ell)."""
    err = (v.double() - (eps - x0).double()).pow(2).flatten(1).mean(-1)
    return (a_hat.double() * weighted_error(err, s.double(), weighting, p)).mean().to(v.dtype)


def ema_decay(step: int, decay: float, ramp: str) -> float:
    """d of the EMA policy's update after an iteration: min(decay, 0.001 k) ('linear') or decay ('constant')."""
    if ramp == "linear":
        return min(decay, 0.001 * step)
    if ramp == "constant":
        return decay
    raise ValueError(f"awm.ema_ramp must be 'linear' or 'constant'; got {ramp!r}")


class AWM:
    """rollout (current policy, ODE) -> advantages -> advantage-weighted flow matching at stratified times, with
    KL to the base and to the EMA policy; the EMA policy is updated after each iteration's last optimizer step."""

    name = "awm"
    networks = ("ema_policy",)
    ROLE_STRATA = 7_300_001

    def __init__(self, config: AWMConfig = AWMConfig(), seed: int = 0):
        self.config = config
        self.seed = seed
        self.ema_velocity: VelocityFn | None = None
        self.ema_net: torch.nn.Module | None = None
        self.steps = IterationSteps()
        self.iteration = 0

    def attach(self, velocities: dict, nets: dict) -> None:
        self.ema_velocity, self.ema_net = velocities["ema_policy"], nets["ema_policy"]

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond, prompts: Sequence[str], prompt_indices: Sequence[int],
                iteration: int, latent_shape: tuple[int, ...], device="cpu", candidates: slice | None = None) -> Rollout:
        c = self.config
        return clean_sample_rollout(velocity, cond, prompts, prompt_indices, iteration, latent_shape, device, candidates,
                                    self.seed, c.group_size, c.rollout_steps, c.shift, c.rollout_solver)

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; competitors.md 2.3): the ODE rollout by the trained net;
        at each of the T training times of every sample the trained forward, the reference's when kl_beta > 0 and
        the EMA policy's when ema_beta > 0, each one call per (minibatch, time, micro-batch) on its members; the
        loss sums the T times before one backward, so their T trained calls are held together."""
        c = self.config
        strata(c.rollout_steps, c.timestep_fraction, c.num_times, c.time_sampler)  # the loss's own check of T
        units = prompts * c.group_size * c.num_times
        batch = per_call(prompts, micro_batch) * members_per_minibatch(c.group_size, c.num_minibatches)
        phases = [rollout_phase(prompts, c.group_size, solver_evaluations(c.rollout_solver, c.rollout_steps),
                                rollout_chunk), Phase("train", units, batch, True, "policy", c.num_times)]
        if c.kl_beta > 0:
            phases.append(Phase("reference", units, batch, False, "reference"))
        if c.ema_beta > 0:
            phases.append(Phase("ema", units, batch, False, "ema_policy"))
        return phases

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return std_normalised_advantages(rewards, self.config.global_std, self.config.adv_eps)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def _bins(self, rollout: Rollout) -> list[tuple[int, int]]:
        c = self.config
        return strata(len(rollout.sigmas) - 1, c.timestep_fraction, c.num_times, c.time_sampler)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        """'minibatch' times: each minibatch's `steps` are its T grid indices, shared by its samples (the code)."""
        c = self.config
        self.iteration = iteration
        batches = member_minibatches(rollout, c.num_minibatches, c.num_times, self.seed, iteration)
        if c.times_per == "minibatch":
            for number, batch in enumerate(batches):
                batch.steps = stratified_indices(self._bins(rollout),
                                                 keyed_generator(self.seed, iteration, number, self.ROLE_STRATA))
        self.steps.plan(iteration, len(batches))
        return batches

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return rollout  # on-policy: nothing to record

    def _times(self, rollout: Rollout, batch: Minibatch) -> torch.Tensor:
        """(T, P, M) flow times: the minibatch's grid times, or stratified per sample."""
        P, M = batch.members.shape
        if self.config.times_per == "minibatch":
            return rollout.sigmas[batch.steps].view(-1, 1, 1).expand(-1, P, M)
        generators = sample_generators(self.seed, self.iteration, rollout.prompt_indices, batch.members, ROLE_TIMES)
        bins = self._bins(rollout)
        index = torch.tensor([[stratified_indices(bins, g) for g in row] for row in generators])  # (P, M, T)
        return rollout.sigmas[index.to(rollout.sigmas.device)].movedim(2, 0)

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict]:
        c = self.config
        members = batch.members
        x0 = gather_members(rollout.final, members)
        a_hat = torch.gather(advantages, 1, members.to(advantages.device)) / c.adv_clip * c.advantage_max
        times = self._times(rollout, batch).to(x0)
        noises = training_noises(x0.shape[2:], len(times), self.seed, self.iteration, rollout.prompt_indices, members,
                                 x0.device).to(x0)
        use_ref = c.kl_beta > 0 and reference_velocity is not None
        use_ema = c.ema_beta > 0 and self.ema_velocity is not None
        policy, kl_ref, kl_ema = 0.0, 0.0, 0.0
        for s, eps in zip(times, noises):
            x_s = noised(x0, eps, s)
            v = member_velocity(velocity, x_s, s, rollout.cond)
            policy = policy + awm_policy_loss(v.flatten(0, 1), x0.flatten(0, 1), eps.flatten(0, 1), s.flatten(),
                                              a_hat.flatten().to(v), c.weighting, c.ghuber_p)
            with torch.no_grad():  # both KL terms independently of each other (the code nests them)
                v_ref = member_velocity(reference_velocity, x_s, s, rollout.cond) if use_ref else None
                v_ema = member_velocity(self.ema_velocity, x_s, s, rollout.cond) if use_ema else None
            if use_ref:
                kl_ref = kl_ref + (v - v_ref).pow(2).mean()
            if use_ema:
                kl_ema = kl_ema + (v - v_ema).pow(2).mean()
        T = len(times)
        loss = (policy + c.kl_beta * kl_ref + c.ema_beta * kl_ema) / T
        stats = {"policy_loss": (policy / T).detach().float()}
        if use_ref:
            stats["kl_ref"] = (kl_ref / T).detach().float()
        if use_ema:
            stats["kl_ema"] = (kl_ema / T).detach().float()
        return loss, stats

    def after_step(self, net: torch.nn.Module) -> None:
        """After the iteration's last optimizer step: theta_ema <- d theta_ema + (1 - d) theta."""
        step = self.steps.step()
        if step is not None and self.ema_net is not None:
            soft_update(self.ema_net, net, ema_decay(step, self.config.ema_decay, self.config.ema_ramp))
