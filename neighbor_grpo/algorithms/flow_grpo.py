"""Flow-GRPO (Liu et al. 2025; reference code yifan123/flow_grpo): GRPO on an SDE that has the flow ODE's marginals.

Each denoising step but the last is a Gaussian policy (sd3_sde_with_logprob.py); the per-sample PPO-clipped
objective is trained on the first `train_step_fraction` of those steps, with per-prompt advantages and an
optional KL to the reference model on the step means. Flow-GRPO-Fast: SDE only inside a small window of steps.
`sde_type: cps` swaps the step for Coefficients-Preserving Sampling (and its log-prob); `guard_ratio_norm` and
`guard_grad_reweight` turn the loss into GRPO-Guard's (neighbor_grpo.algorithms.grpo_guard).
"""

from __future__ import annotations


import torch

from neighbor_grpo.config.algorithm_settings import FlowGRPOConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import center_in_group, clip_advantages
from neighbor_grpo.algorithms.common import Minibatch, Phase, Rollout, VelocityFn, batched_velocity, gather_members
from neighbor_grpo.algorithms.grpo_guard import grad_reweight, ratio_norm_log_ratio
from neighbor_grpo.algorithms.sde import (ROLE_WINDOW, cps_code_log_prob, cps_mean_std, cps_sde_step,
                                          flow_grpo_mean_std, flow_grpo_noise_scale, flow_grpo_sde_step,
                                          gaussian_log_prob, sde_call_schedule, sde_old_policy, rollout_noises,
                                          sde_minibatches, sde_policy_loss, sde_rollout, sde_steps, step_losses)
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import keyed_generator


class FlowGRPO:
    """Flow-GRPO: SDE rollouts, per-step Gaussian log-probs, PPO-clipped GRPO loss."""

    name = "flow_grpo"

    def __init__(self, config: FlowGRPOConfig = FlowGRPOConfig(), seed: int = 0):
        self.config = config
        self.seed = seed

    def sde_mask(self, iteration: int) -> torch.Tensor:
        """Which steps are stochastic: all but the last (the reference leaves the final step, whose Gaussian is
        very sharp, deterministic and untrained), or Flow-GRPO-Fast's window."""
        c, N = self.config, self.config.rollout_steps
        mask = torch.zeros(N, dtype=torch.bool)
        if c.fast_window_size <= 0:
            mask[: N - 1] = True
            return mask
        end = c.fast_window_end if c.fast_window_end is not None else N // 2
        generator = keyed_generator(self.seed, iteration, ROLE_WINDOW)
        start = int(torch.randint(0, end - c.fast_window_size + 1, (), generator=generator))
        mask[start: start + c.fast_window_size] = True
        return mask

    def stochastic_steps(self) -> int:
        """How many steps sde_mask makes stochastic: all but the last, or Flow-GRPO-Fast's whole window."""
        c, N = self.config, self.config.rollout_steps
        if c.fast_window_size <= 0:
            return N - 1
        end = c.fast_window_end if c.fast_window_end is not None else N // 2
        if not c.fast_window_size <= end <= N:
            raise ValueError(f"flow_grpo.fast_window_end: expected fast_window_size ({c.fast_window_size}) <= end "
                             f"<= rollout_steps ({N}); got {end}")
        return c.fast_window_size

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; sde.sde_call_schedule): N rollout evaluations, the first
        int(train_step_fraction x stochastic steps) trained, the reference's KL when kl_beta > 0 (CPS and
        GRPO-Guard add no forward: RatioNorm's mu_old comes from the stored velocities)."""
        c = self.config
        stochastic = self.stochastic_steps()
        trained = min(stochastic, max(1, int(c.train_step_fraction * stochastic))) if stochastic else 0
        return sde_call_schedule(prompts, c.group_size, c.rollout_steps, trained, c.num_minibatches, c.minibatch_by,
                                 c.old_policy, c.kl_beta > 0, rollout_chunk, micro_batch)

    def _mean_std(self, x: torch.Tensor, v: torch.Tensor, j: int, rollout: Rollout) -> tuple[torch.Tensor, float]:
        s, s_next, s_1 = (float(rollout.sigmas[k]) for k in (j, j + 1, 1))
        if self.cps:
            return cps_mean_std(x.float(), v.float(), s, s_next, self.config.cps_eta)
        return flow_grpo_mean_std(x, v, s, s_next, self.config.noise_level, s_1)

    @property
    def cps(self) -> bool:
        return self.config.sde_type == "cps"

    @property
    def log_prob(self):
        """CPS's reference log-prob drops the 1 / (2 sigma^2) and the constants ('code'); otherwise the Gaussian."""
        return cps_code_log_prob if self.cps and self.config.cps_logprob == "code" else gaussian_log_prob

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond: torch.Tensor, prompts, prompt_indices, iteration: int,
                latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                candidates: slice | None = None) -> Rollout:
        """`candidates`: only that block of each group (a group split over processes), with its own noises."""
        c = self.config
        noises, z = rollout_noises(latent_shape, c.group_size, c.rollout_steps, c.same_initial_noise, self.seed, iteration,
                                   prompt_indices, device, candidates)
        sigmas = sigma_grid(c.rollout_steps, shift=c.shift or 1.0).to(device)
        s_1 = float(sigmas[1])
        if self.cps:
            step = lambda x, v, s, s_next, noise: cps_sde_step(x, v, s, s_next, noise, eta=c.cps_eta)
        else:
            step = lambda x, v, s, s_next, noise: flow_grpo_sde_step(x, v, s, s_next, noise, noise_level=c.noise_level, s_1=s_1)
        return sde_rollout(velocity, noises, cond, sigmas, self.sde_mask(iteration).to(device), step, z, prompts,
                           prompt_indices, log_prob=self.log_prob)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean_prompt) / (std + 1e-4), population std of the prompt's group or of the whole batch (global_std)."""
        std = rewards.std(correction=0) if self.config.global_std else rewards.std(dim=-1, correction=0, keepdim=True)
        return center_in_group(rewards) / (std + self.config.adv_eps)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        c = self.config
        stochastic = sde_steps(rollout)
        count = max(1, int(c.train_step_fraction * len(stochastic))) if stochastic else 0
        return sde_minibatches(stochastic[:count], rollout, c.num_minibatches, c.minibatch_by, self.seed, iteration)

    def loss_parts(self, batch: Minibatch) -> list[tuple[Minibatch, float]]:
        """One part per trained step, backpropagated before the next (as the reference's per-timestep backward)."""
        return step_losses(batch)

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return sde_old_policy(self.config.old_policy, velocity, rollout, batches, self._mean_std, self.log_prob)

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        penalty = None
        if c.kl_beta > 0 and reference_velocity is not None:
            def penalty(x: torch.Tensor, mean: torch.Tensor, j: int) -> torch.Tensor:
                # As train_sd3.py: divided by the noise scale sigma_t^2, not by the transition variance sigma_t^2 |dt|.
                with torch.no_grad():
                    v_ref = batched_velocity(reference_velocity, x, rollout.sigmas[j], rollout.cond)
                    mean_ref, _ = self._mean_std(x, v_ref, j, rollout)
                kl = (mean - mean_ref).pow(2).flatten(2).mean(-1)
                if not self.cps:  # CPS: FlowCPS's mean_d (mu - mu_ref)^2 (its sigma is 0 at s' = 0)
                    kl = kl / (2 * flow_grpo_noise_scale(float(rollout.sigmas[j]), c.noise_level, float(rollout.sigmas[1]))**2)
                return c.kl_beta * kl.mean()
        adjust = step_weight = None
        if c.guard_ratio_norm:
            def adjust(log_ratio, mean, std, j, members):
                # mu_old from the stored old-policy velocity at the stored state: what the rollout (or the
                # recompute pass) used for logp_old, so the ratio is 1 wherever logp_old is exact
                old_mean, _ = self._mean_std(gather_members(rollout.states[j], members),
                                             gather_members(rollout.velocities[j], members), j, rollout)
                return ratio_norm_log_ratio(log_ratio, mean, old_mean, std)
        if c.guard_grad_reweight:
            step_weight = lambda j: grad_reweight(float(rollout.sigmas[j]), float(rollout.sigmas[j + 1]))
        return sde_policy_loss(velocity, rollout, advantages, batch, self._mean_std, c.eps_clip, penalty,
                               self.log_prob, adjust, step_weight)
