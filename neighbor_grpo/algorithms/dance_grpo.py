"""DanceGRPO (Xue et al. 2025; reference code XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py).

SDE rollouts with flux_step (Euler mean plus a score correction, std = eta sqrt(ds)), one initial noise shared by
the whole group, advantages (r - mean) / (unbiased std + 1e-8), and the per-sample PPO-clipped loss on a random
`timestep_fraction` of the steps.
"""

from __future__ import annotations


import torch

from neighbor_grpo.config.algorithm_settings import DanceGRPOConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages, std_advantages
from neighbor_grpo.algorithms.common import Minibatch, Phase, Rollout, VelocityFn
from neighbor_grpo.algorithms.sde import (ROLE_TRAIN_STEPS, dance_grpo_mean_std, dance_grpo_sde_step, sde_call_schedule,
                                          sde_old_policy, rollout_noises, sde_minibatches, sde_policy_loss, sde_rollout,
                                          sde_steps, step_losses)
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import keyed_generator


class DanceGRPO:
    """DanceGRPO: flux_step SDE rollouts with a shared initial noise, PPO-clipped GRPO on random steps."""

    name = "dance_grpo"

    def __init__(self, config: DanceGRPOConfig = DanceGRPOConfig(), seed: int = 0):
        self.config = config
        self.seed = seed

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; sde.sde_call_schedule): N rollout evaluations and
        int(train_step_fraction x (N - 1)) trained steps (see minibatches); no reference (no KL term)."""
        c = self.config
        stochastic = c.rollout_steps - 1
        trained = min(stochastic, max(1, int(c.train_step_fraction * stochastic)))
        return sde_call_schedule(prompts, c.group_size, c.rollout_steps, trained, c.num_minibatches, c.minibatch_by,
                                 c.old_policy, False, rollout_chunk, micro_batch)

    def _mean_std(self, x: torch.Tensor, v: torch.Tensor, j: int, rollout: Rollout) -> tuple[torch.Tensor, float]:
        return dance_grpo_mean_std(x, v, float(rollout.sigmas[j]), float(rollout.sigmas[j + 1]), self.config.eta)

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond: torch.Tensor, prompts, prompt_indices, iteration: int,
                latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                candidates: slice | None = None) -> Rollout:
        """`candidates`: only that block of each group (a group split over processes), with its own noises."""
        c = self.config
        noises, z = rollout_noises(latent_shape, c.group_size, c.rollout_steps, c.same_initial_noise, self.seed, iteration,
                                   prompt_indices, device, candidates)
        sigmas = sigma_grid(c.rollout_steps, shift=c.shift or 1.0).to(device)
        # The reference decodes the last step's x0 prediction and never trains that step, so its noise is never
        # seen: the last step here is the deterministic Euler step into s = 0, which lands exactly on x0hat.
        mask = torch.ones(c.rollout_steps, dtype=torch.bool, device=device)
        mask[-1] = False
        step = lambda x, v, s, s_next, noise: dance_grpo_sde_step(x, v, s, s_next, noise, eta=c.eta)
        return sde_rollout(velocity, noises, cond, sigmas, mask, step, z, prompts, prompt_indices)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / (torch.std(r) + 1e-8) per group: the unbiased std, as the reference."""
        return std_advantages(rewards, self.config.adv_eps, unbiased=True)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        """int(fraction * (N - 1)) random steps (the reference draws one permutation per sample; here one per
        rollout batch, shared by all samples, so that a minibatch is a set of steps for all its members).

        N - 1, not N: XueZeyue/DanceGRPO fastvideo/train_grpo_flux.py (commit ff7bee1) stores
        `timesteps[:, :-1]`, `latents[:, :-1][:, :-1]` and `log_probs[:, :-1]` (lines 512-519), permutes
        `len(samples["timesteps"][0])` = N - 1 steps (551-556) and trains
        `int(len(samples["timesteps"][0]) * timestep_fraction)` of them (570): int(24 * 0.6) = 14 at N = 25,
        the NFE_theta = 14 the Neighbor GRPO paper gives for DanceGRPO."""
        c = self.config
        stochastic = sde_steps(rollout)
        count = max(1, int(c.train_step_fraction * len(stochastic)))
        order = torch.randperm(len(stochastic), generator=keyed_generator(self.seed, iteration, ROLE_TRAIN_STEPS))
        steps = sorted(stochastic[int(k)] for k in order[:count])
        return sde_minibatches(steps, rollout, c.num_minibatches, c.minibatch_by, self.seed, iteration)

    def loss_parts(self, batch: Minibatch) -> list[tuple[Minibatch, float]]:
        """One part per trained step, backpropagated before the next (as the reference's per-timestep backward)."""
        return step_losses(batch)

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return sde_old_policy(self.config.old_policy, velocity, rollout, batches, self._mean_std)

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The reference has no KL term: reference_velocity is ignored."""
        return sde_policy_loss(velocity, rollout, advantages, batch, self._mean_std, self.config.eps_clip)
