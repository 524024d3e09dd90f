"""DiffusionNFT (Zheng et al., arXiv 2509.16117; reference code NVlabs/DiffusionNFT, scripts/train_nft_sd3.py).

Reinforcement on the forward (noising) process: clean samples from ODE rollouts of an old policy, rewards mapped
to an optimality probability r in [0, 1], and the current net trained so that the implicit positive policy
v+ = beta v_theta + (1 - beta) v_old fits the flow-matching target on high-r samples and the implicit negative
policy v- = (1 + beta) v_old - beta v_theta on low-r ones. The old policy follows the trained one by a soft
update after each iteration. See /work/shared/spec/competitors.md section 1 and docs/algorithms.md.
"""

from __future__ import annotations

from typing import Sequence

import torch

from neighbor_grpo.config.algorithm_settings import DiffusionNFTConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages
from neighbor_grpo.algorithms.common import (Minibatch, Phase, Rollout, VelocityFn, gather_members,
                                             members_per_minibatch, per_call, rollout_phase, solver_evaluations)
from neighbor_grpo.algorithms.forward_process import (ROLE_TIMES, IterationSteps, clean_sample_rollout,
                                                      member_minibatches, member_velocity, noised,
                                                      sample_generators, soft_update, std_normalised_advantages,
                                                      training_noises)

WEIGHT_FLOOR = 1e-5  # the reference's floor of the adaptive weight (x0 space)


def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / adv_clip, -1, 1) (train_nft_sd3.py L910-L929)."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1.0, 1.0)


def implicit_policies(v: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v+ = beta v + (1 - beta) sg(v_old), v- = (1 + beta) sg(v_old) - beta v; v+ + v- = 2 v_old."""
    v_old = v_old.detach()
    return beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v


def regression_error(v_implicit: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor,
                     adaptive: bool) -> torch.Tensor:
    """Per-sample loss of one implicit policy, shape (B,) for (B, *latent) inputs at times s (B,). Adaptive (the
    code): the x0-space squared error mean_d (x0hat - x0)^2, x0hat = x_s - s v, over its own
    sg(max(mean_d |x0hat - x0|, 1e-5)) in float64; otherwise the plain velocity error mean_d (v - (eps - x0))^2."""
    if not adaptive:
        return (v_implicit - (eps - x0)).pow(2).flatten(1).mean(-1)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    residual = (noised(x0, eps, s) - s * v_implicit) - x0  # = -s (v - (eps - x0))
    weight = residual.detach().double().abs().flatten(1).mean(-1).clamp_min(WEIGHT_FLOOR)
    return residual.pow(2).flatten(1).mean(-1) / weight.to(residual.dtype)


def nft_policy_loss(v: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor,
                    r: torch.Tensor, beta: float, scale: float, adaptive: bool = True) -> torch.Tensor:
    """Per-sample scale * (r l+ + (1 - r) l-) (train_nft_sd3.py L934-L970; the code's scale is adv_clip / beta)."""
    v_plus, v_minus = implicit_policies(v, v_old, beta)
    return scale * (r * regression_error(v_plus, x0, eps, s, adaptive) + (1 - r) * regression_error(v_minus, x0, eps, s, adaptive))


def old_policy_decay(step: int, decay_type: int) -> float:
    """eta_k of the soft update theta_old <- eta theta_old + (1 - eta) theta (return_decay, L169-L189)."""
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    if decay_type == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"diffusion_nft.old_decay must be 0, 1 or 2; got {decay_type!r}")


def training_times(sigmas: torch.Tensor, count: int, sampling: str, generators: list[list[torch.Generator]]
                   ) -> torch.Tensor:
    """(count, P, M) flow times per sample: `count` distinct grid times s_j, j < N, from a keyed permutation per
    sample (the code), or `count` draws from U(0, 1)."""
    N = len(sigmas) - 1
    rows = []
    for row in generators:
        if sampling == "grid":
            rows.append(torch.stack([sigmas[torch.randperm(N, generator=g)[:count].to(sigmas.device)] for g in row]))
        elif sampling == "uniform":  # (0, 1]: s = 0 has no signal to learn from
            rows.append(torch.stack([1.0 - torch.rand(count, generator=g) for g in row]).to(sigmas))
        else:
            raise ValueError(f"diffusion_nft.time_sampling must be 'grid' or 'uniform'; got {sampling!r}")
    return torch.stack(rows).movedim(2, 0)


class DiffusionNFT:
    """rollout (old policy, ODE) -> advantages -> r -> forward-process loss on fresh noisy samples; the old policy
    is soft-updated after each iteration's last optimizer step."""

    name = "diffusion_nft"
    networks = ("old_policy",)

    def __init__(self, config: DiffusionNFTConfig = DiffusionNFTConfig(), seed: int = 0):
        self.config = config
        self.seed = seed
        self.old_velocity: VelocityFn | None = None
        self.old_net: torch.nn.Module | None = None
        self.steps = IterationSteps()
        self.iteration = 0

    def attach(self, velocities: dict, nets: dict) -> None:
        self.old_velocity, self.old_net = velocities["old_policy"], nets["old_policy"]

    def _old(self, velocity: VelocityFn) -> VelocityFn:
        """The old policy's velocity; the trained net's when none is attached (theta_old = theta: its start)."""
        return self.old_velocity if self.old_velocity is not None else velocity

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond, prompts: Sequence[str], prompt_indices: Sequence[int],
                iteration: int, latent_shape: tuple[int, ...], device="cpu", candidates: slice | None = None) -> Rollout:
        c = self.config
        sampler = self._old(velocity) if c.rollout_policy == "old" else velocity
        return clean_sample_rollout(sampler, cond, prompts, prompt_indices, iteration, latent_shape, device, candidates,
                                    self.seed, c.group_size, c.rollout_steps, c.shift, c.rollout_solver)

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; competitors.md 1.4): the ODE rollout by the old policy
        (rollout_policy 'old') or the trained net; at each of the K_t training times of every sample, the old
        policy's no-grad forward, the trained forward and, when kl_beta > 0, the reference's, each one call per
        (minibatch, time, micro-batch) on the minibatch's members; the loss sums the K_t times before one backward,
        so their K_t trained calls are held together."""
        c = self.config
        units = prompts * c.group_size * c.training_times
        batch = per_call(prompts, micro_batch) * members_per_minibatch(c.group_size, c.num_minibatches)
        rollout_net = "old_policy" if c.rollout_policy == "old" else "policy"
        phases = [rollout_phase(prompts, c.group_size, solver_evaluations(c.rollout_solver, c.rollout_steps),
                                rollout_chunk, rollout_net),
                  Phase("old_policy", units, batch, False, "old_policy"),
                  Phase("train", units, batch, True, "policy", c.training_times)]
        if c.kl_beta > 0:
            phases.append(Phase("reference", units, batch, False, "reference"))
        return phases

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return std_normalised_advantages(rewards, self.config.global_std, self.config.adv_eps)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        c = self.config
        self.iteration = iteration
        batches = member_minibatches(rollout, c.num_minibatches, c.training_times, self.seed, iteration)
        self.steps.plan(iteration, len(batches))
        return batches

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return rollout  # v_old is evaluated next to v_theta in the loss, on the same fresh noisy samples

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict]:
        c = self.config
        members = batch.members
        x0 = gather_members(rollout.final, members)  # (P, M, *latent)
        r = optimality_probability(torch.gather(advantages, 1, members.to(advantages.device)), c.adv_clip)
        generators = sample_generators(self.seed, self.iteration, rollout.prompt_indices, members, ROLE_TIMES)
        count = len(batch.steps)
        times = training_times(rollout.sigmas, count, c.time_sampling, generators).to(x0)
        noises = training_noises(x0.shape[2:], count, self.seed, self.iteration, rollout.prompt_indices, members,
                                 x0.device, c.noise_per_time).to(x0)
        scale = c.adv_clip / c.beta if c.loss_scale == "code" else 1.0
        total, kl_total = 0.0, 0.0
        for k in range(count):
            s = times[k]
            x_s = noised(x0, noises[k], s)
            with torch.no_grad():
                v_old = member_velocity(self._old(velocity), x_s, s, rollout.cond)
            v = member_velocity(velocity, x_s, s, rollout.cond)
            flat = lambda t: t.flatten(0, 1)
            total = total + nft_policy_loss(flat(v), flat(v_old), flat(x0), flat(noises[k]), flat(s),
                                            r.flatten().to(v), c.beta, scale, c.adaptive_weight).mean()
            if c.kl_beta > 0 and reference_velocity is not None:
                with torch.no_grad():
                    v_ref = member_velocity(reference_velocity, x_s, s, rollout.cond)
                kl_total = kl_total + (v - v_ref).pow(2).mean()
        policy, kl = total / count, kl_total / count
        stats = {"policy_loss": policy.detach().float(), "r_mean": r.mean().detach().float()}
        if c.kl_beta > 0 and reference_velocity is not None:
            stats["kl_ref"] = kl.detach().float()
        return policy + c.kl_beta * kl, stats

    def after_step(self, net: torch.nn.Module) -> None:
        """After the iteration's last optimizer step: theta_old <- eta_k theta_old + (1 - eta_k) theta."""
        step = self.steps.step()
        if step is not None and self.old_net is not None:
            soft_update(self.old_net, net, old_policy_decay(step, self.config.old_decay))
