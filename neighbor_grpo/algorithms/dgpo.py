"""DGPO, Direct Group Preference Optimization (Luo et al., arXiv 2510.08425; reference code Luo-Yihong/DGPO,
scripts/train_sd3_dgpo.py).

DPO over groups: each group is split by advantage into a preferred and a dispreferred part, and the policy
maximises log sigmoid(R(G+) - R(G-)) with the Diffusion-DPO implicit reward written through flow-matching losses
against a reference. Its gradient is an advantage-weighted flow-matching loss whose groups are weighted by
sg(sigmoid(S_g)), S_g = sum_i A_i beta_dpo (l_i - l_ref,i) / G, with a PPO-style gate that stops the gradient of
samples whose likelihood ratio to an EMA-old policy left [1 - c, 1 + c] on the side their advantage pushes. ODE
rollouts (our DPM-Solver++ on the reference's flow-sigma grid), training at M noisy versions of the clean samples,
one noise per group. See /work/shared/spec/competitors.md section 5 and docs/algorithms.md.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from neighbor_grpo.config.algorithm_settings import DGPOConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages
from neighbor_grpo.algorithms.common import (Minibatch, Phase, Rollout, VelocityFn, gather_members, per_call,
                                             rollout_phase, solver_evaluations)
from neighbor_grpo.algorithms.forward_process import (IterationSteps, clean_sample_rollout, member_velocity, noised,
                                                      soft_update, std_normalised_advantages)
from neighbor_grpo.maths.noise import keyed_generator

GRID_START = 0.999  # the reference's flow sigmas: shift(1 - linspace(1, 1/1000, N + 1)) reversed, so s_0 = shift(0.999)
ROLE_TIMES = 7_400_001   # the iteration's M training grid indices (one draw, shared by every sample)
ROLE_NOISE = 7_400_002   # the training noises, one per (group, time) or per (sample, time)


def training_indices(trunc_steps: int, count: int, generator: torch.Generator) -> list[int]:
    """M distinct grid indices drawn uniformly from 0..trunc_steps (random.sample(range(trunc + 1), M), L1062-L1064),
    sorted (their order does not change the update)."""
    return sorted(torch.randperm(trunc_steps + 1, generator=generator)[:count].tolist())


def training_noises(shape: tuple[int, ...], index: int, seed: int, iteration: int, prompt_indices: Sequence[int],
                    members: torch.Tensor, shared: bool, device) -> torch.Tensor:
    """(P, M, *latent) eps at grid index `index`: one per group, the same for its members (use_shared_noise,
    L76-L108), or one per sample; keyed, so any micro-batch or process split draws the same."""
    rows = []
    for prompt, row in zip(prompt_indices, members.tolist()):
        if shared:
            eps = torch.randn(shape, generator=keyed_generator(seed, iteration, prompt, index, ROLE_NOISE))
            rows.append(eps.expand(len(row), *shape))
        else:
            rows.append(torch.stack([torch.randn(shape, generator=keyed_generator(seed, iteration, prompt, int(m), index,
                                                                                  ROLE_NOISE)) for m in row]))
    return torch.stack(rows).to(device)


def flow_matching_losses(v: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """l_i = mean_d (v_tgt - v)^2 per sample: (P, M, *latent) -> (P, M), in float32 at least (fp16/bf16 passes)."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    return (v_target.to(dtype) - v.to(dtype)).pow(2).flatten(2).mean(-1)


def likelihood_ratio(losses: torch.Tensor, old_losses: torch.Tensor) -> torch.Tensor:
    """rho_i = exp(-l_i + l_old,i): the ratio of the implicit likelihoods of the current and the EMA-old policy."""
    return torch.exp(-losses + old_losses)


def overconfident(advantages: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """The PPO-style gate (L1133-L1145): A > 0 and rho > 1 + c, or A <= 0 and rho < 1 - c."""
    return torch.where(advantages > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)


def gated(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The values with their gradient stopped where `mask` is set (clip_dsm): same value, no push further."""
    return torch.where(mask, values.detach(), values)


def group_scores(advantages: torch.Tensor, losses: torch.Tensor, reference_losses: torch.Tensor, beta_dpo: float,
                 group_size: int) -> torch.Tensor:
    """S_g = sum_{i in g} A_i beta_dpo (l_i - l_ref,i) / G, (P, M) -> (P,) (compute_group_dgpo_loss_allreduce); -S_g
    is R(G+) - R(G-), the group's implicit-reward margin. Differentiable in `losses` (the tests take its gradient)."""
    return (advantages * beta_dpo * (losses - reference_losses) / group_size).sum(-1)


def group_weights(scores: torch.Tensor, sigmoid: bool = True) -> torch.Tensor:
    """w_g = sg(sigmoid(S_g)): 1/2 at the reference, towards 0 once the group's preference is learnt. Without the
    sigmoid, the constant 1/2."""
    return torch.sigmoid(scores.detach()) if sigmoid else torch.full_like(scores, 0.5)


def group_preference_nll(scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(-S_g) = -log sigmoid(R(G+) - R(G-)): the objective the policy loss is the gradient of."""
    return -F.logsigmoid(-scores)


def dgpo_policy_loss(advantages: torch.Tensor, losses: torch.Tensor, reference_losses: torch.Tensor, beta_dpo: float,
                     group_size: int, sigmoid: bool = True) -> torch.Tensor:
    """mean_i w_g(i) A_i l_i, S_g from sg(l): grad = (G / (beta_dpo B)) sum_g grad(-log sigmoid(-S_g)), B = P M.
    `losses` may be gated (detached where over-confident); the scores use their values."""
    weights = group_weights(group_scores(advantages, losses.detach(), reference_losses, beta_dpo, group_size), sigmoid)
    return (weights.unsqueeze(-1) * advantages * losses).mean()


def ema_old_decay(step: int, decay: float) -> float:
    """d of the EMA-old update after optimizer step number `step` (counted from 0): min(decay, 0.001 step)."""
    return min(decay, 0.001 * step)


class DGPO:
    """rollout (ODE; the EMA-old weights after switch_ema_ref steps) -> advantages -> group-weighted, gated
    flow-matching loss at M shared grid times with one noise per group, plus a KL to the base model; the EMA-old
    policy follows after every optimizer step. Minibatches hold whole groups (the group score needs all members)."""

    name = "dgpo"
    networks = ("ema_old",)

    def __init__(self, config: DGPOConfig = DGPOConfig(), seed: int = 0):
        self.config = config
        self.seed = seed
        self.old_velocity: VelocityFn | None = None
        self.old_net: torch.nn.Module | None = None
        self.steps = IterationSteps()
        self.iteration = 0

    def attach(self, velocities: dict, nets: dict) -> None:
        self.old_velocity, self.old_net = velocities["ema_old"], nets["ema_old"]

    def _old(self, velocity: VelocityFn) -> VelocityFn:
        """The EMA-old policy's velocity; the trained net's when none is attached (theta_old = theta: its start)."""
        return self.old_velocity if self.old_velocity is not None else velocity

    def rolls_out_with_old(self, iteration: int) -> bool:
        """After more than switch_ema_ref optimizer steps (global_step > switch_ema_ref), the EMA-old weights sample."""
        return iteration * self.config.num_minibatches > self.config.switch_ema_ref

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond, prompts: Sequence[str], prompt_indices: Sequence[int],
                iteration: int, latent_shape: tuple[int, ...], device="cpu", candidates: slice | None = None) -> Rollout:
        c = self.config
        sampler = self._old(velocity) if self.rolls_out_with_old(iteration) else velocity
        return clean_sample_rollout(sampler, cond, prompts, prompt_indices, iteration, latent_shape, device, candidates,
                                    self.seed, c.group_size, c.rollout_steps, c.shift, c.rollout_solver, GRID_START)

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; competitors.md 5.3): the ODE rollout by the trained net,
        or by the EMA-old once past switch_ema_ref steps; at each of the M training times every member of every
        group through the trained forward, the reference's (unless use_ema_ref with kl_beta 0) and the EMA-old's
        (gate on, or use_ema_ref), one call per (time, micro-batch of whole groups); a minibatch's times are held
        together before its backward."""
        c = self.config
        units = prompts * c.group_size * c.num_times
        batch = per_call(prompts, micro_batch) * c.group_size
        sampler = "ema_old" if self.rolls_out_with_old(iteration) else "policy"
        held = -(-c.num_times // max(1, c.num_minibatches))  # a minibatch's times, summed before its backward
        phases = [rollout_phase(prompts, c.group_size, solver_evaluations(c.rollout_solver, c.rollout_steps),
                                rollout_chunk, sampler),
                  Phase("train", units, batch, True, "policy", held)]
        if self._uses_reference():
            phases.append(Phase("reference", units, batch, False, "reference"))
        if self._uses_old():
            phases.append(Phase("old_policy", units, batch, False, "ema_old"))
        return phases

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return std_normalised_advantages(rewards, self.config.global_std, self.config.adv_eps)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        """The iteration's M grid indices (keyed by seed and iteration), split over num_minibatches optimizer steps;
        every step trains all G members of every prompt."""
        c = self.config
        self.iteration = iteration
        indices = training_indices(c.trunc_steps, c.num_times, keyed_generator(self.seed, iteration, ROLE_TIMES))
        members = torch.arange(rollout.group_size).expand(len(rollout.prompts), -1)
        batches = [Minibatch(steps=chunk.tolist(), members=members)
                   for chunk in torch.tensor(indices).tensor_split(c.num_minibatches)]
        self.steps.plan(iteration, len(batches))
        return batches

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return rollout  # v_old is evaluated next to v_theta in the loss, on the same noisy samples

    def _uses_old(self) -> bool:
        return self.config.clip_range > 0 or self.config.use_ema_ref

    @staticmethod
    def needs_reference(config: DGPOConfig) -> bool:
        """The base model is evaluated for the KL and, unless use_ema_ref, for the group score (parts.py asks)."""
        return config.kl_beta > 0 or not config.use_ema_ref

    def _uses_reference(self) -> bool:
        return self.needs_reference(self.config)

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict]:
        c, G = self.config, rollout.group_size
        members = batch.members
        if members.shape[1] != G:
            raise ValueError(f"dgpo needs each group's {G} members on one process (its group score sums over them); "
                             f"got {members.shape[1]}: use prompts_per_iteration >= the number of processes")
        if self._uses_reference() and reference_velocity is None:
            raise ValueError("dgpo needs the reference velocity (the base model) for its group score and KL")
        x0 = gather_members(rollout.final, members)
        a = torch.gather(advantages, 1, members.to(advantages.device)).float()  # (P, G)
        P = len(rollout.prompts)
        totals = {"policy": 0.0, "kl": 0.0, "gated": 0.0, "weight": 0.0, "fm": 0.0}
        for j in batch.steps:
            s = rollout.sigmas[j].to(x0).expand(P, G)
            eps = training_noises(x0.shape[2:], j, self.seed, self.iteration, rollout.prompt_indices, members,
                                  c.shared_noise, x0.device).to(x0)
            x_s, v_target = noised(x0, eps, s), eps - x0
            with torch.no_grad():
                v_ref = member_velocity(reference_velocity, x_s, s, rollout.cond) if self._uses_reference() else None
                v_old = member_velocity(self._old(velocity), x_s, s, rollout.cond) if self._uses_old() else None
            v = member_velocity(velocity, x_s, s, rollout.cond)
            losses = flow_matching_losses(v, v_target)
            old_losses = flow_matching_losses(v_old, v_target) if v_old is not None else None
            mask = (overconfident(a, likelihood_ratio(losses.detach(), old_losses), c.clip_range) if c.clip_range > 0
                    else torch.zeros_like(losses, dtype=torch.bool))
            anchor = old_losses if c.use_ema_ref else flow_matching_losses(v_ref, v_target)
            totals["policy"] = totals["policy"] + dgpo_policy_loss(a, gated(losses, mask), anchor, c.beta_dpo, G,
                                                                   c.sigmoid_weight)
            if c.kl_beta > 0:
                kl = (v.float() - v_ref.float()).pow(2).flatten(2).mean(-1)
                totals["kl"] = totals["kl"] + (gated(kl, mask) if c.clip_kl else kl).mean()
            totals["gated"] += mask.float().mean().detach()
            totals["weight"] += group_weights(group_scores(a, losses.detach(), anchor, c.beta_dpo, G)).mean()
            totals["fm"] += losses.detach().mean()
        T = len(batch.steps)
        loss = (totals["policy"] + c.kl_beta * totals["kl"]) / T
        stats = {"policy_loss": (totals["policy"] / T).detach().float(), "clip_fraction": totals["gated"] / T,
                 "group_weight": totals["weight"] / T, "fm_loss": totals["fm"] / T}
        if c.kl_beta > 0:
            stats["kl_ref"] = (totals["kl"] / T).detach().float()
        return loss, stats

    def after_step(self, net: torch.nn.Module) -> None:
        """After every optimizer step: theta_old <- d theta_old + (1 - d) theta, d = min(0.3, 0.001 k), k the optimizer
        steps taken before it (the reference's global_step, L1175-L1177)."""
        self.steps.step()
        before = self.steps.iteration * self.steps.planned + self.steps.taken - 1
        if self.old_net is not None:
            soft_update(self.old_net, net, ema_old_decay(before, self.config.ema_decay))
