"""Flow-GRPO (Liu et al. 2025; reference code yifan123/flow_grpo): GRPO on an SDE that has the flow ODE's marginals.

Each denoising step but the last is a Gaussian policy (sd3_sde_with_logprob.py); the per-sample PPO-clipped
objective is trained on the first `train_step_fraction` of those steps, with per-prompt advantages and an
optional KL to the reference model on the step means. Flow-GRPO-Fast: SDE only inside a small window of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neighbor_grpo.advantages import center_in_group, clip_advantages
from neighbor_grpo.algorithms.common import Minibatch, Rollout, VelocityFn, batched_velocity
from neighbor_grpo.algorithms.sde import (ROLE_WINDOW, flow_grpo_mean_std, flow_grpo_noise_scale, flow_grpo_sde_step,
                                          sde_old_policy, rollout_noises, sde_minibatches, sde_policy_loss,
                                          sde_rollout, sde_steps)
from neighbor_grpo.flow import sigma_grid
from neighbor_grpo.noise import keyed_generator


@dataclass
class FlowGRPOConfig:
    group_size: int = 12
    """G: samples per prompt (the reference uses 24 on SD3.5; 12 here, as Neighbor GRPO)."""
    noise_level: float = 0.7
    """a in sigma_t = a * sqrt(s / (1 - s)): the SDE's noise level."""
    rollout_steps: int = 10
    """N: SDE sampling steps per rollout (the reference trains with 10, evaluates with 40 ODE steps)."""
    shift: float | None = None
    """SD3/FLUX sigma shift of the rollout grid; None: the model's own (1 for the built-in model, the
    scheduler's shift for SD3, the resolution-dependent shift for FLUX). 1 = no shift."""
    train_step_fraction: float = 1.0
    """Fraction of the SDE steps trained, the first ones as the reference's range(num_train_timesteps)."""
    fast_window_size: int = 0
    """Flow-GRPO-Fast: SDE (and training) only inside a window of this many steps, ODE elsewhere (0 = off: every
    step but the last is SDE, as the reference)."""
    fast_window_end: int | None = None
    """Flow-GRPO-Fast: the window starts at a keyed random step in [0, end - size] each iteration; None = N // 2
    (the reference's sde_window_range = (0, num_steps // 2))."""
    same_initial_noise: bool = False
    """One initial noise for the whole group (the reference's same_latent, default off: independent noises)."""
    global_std: bool = True
    """Divide by the std of all rewards in the batch instead of each prompt's (the reference's sample.global_std,
    True in its base and SD3 configs); the mean is always per prompt."""
    adv_eps: float = 1e-4
    """Added to the (population) std of the advantages."""
    adv_clip: float = 5.0
    """Advantages clipped to [-adv_clip, adv_clip] (the reference's adv_clip_max); 0 disables."""
    eps_clip: float = 1e-4
    """PPO clip range of the per-sample ratio (the reference's clip_range)."""
    kl_beta: float = 0.0
    """Weight of the KL to the reference model, ||mean_theta - mean_ref||^2 / (2 sigma_t^2) averaged (the
    reference's train.beta: 0 in its base config, 0.04 on GenEval/OCR, 0.01 on PickScore)."""
    num_minibatches: int = 2
    """Optimizer steps per rollout batch when minibatch_by='samples' (the reference updates twice per epoch:
    gradient_accumulation_steps = num_batches_per_epoch // 2)."""
    minibatch_by: str = "samples"
    """'samples': the candidates are split into num_minibatches slices, each trained on all trained steps (as the
    reference accumulates gradients over timesteps); 'steps': one optimizer step per trained step, all candidates."""
    old_policy: str = "rollout"
    """Where the old log-probs come from: 'rollout' (recorded while sampling, free) or 'recompute' (a no-grad
    pass batched like the training pass before the first update, so the ratio is exactly 1)."""


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

    def _mean_std(self, x: torch.Tensor, v: torch.Tensor, j: int, rollout: Rollout) -> tuple[torch.Tensor, float]:
        s, s_next, s_1 = (float(rollout.sigmas[k]) for k in (j, j + 1, 1))
        return flow_grpo_mean_std(x, v, s, s_next, self.config.noise_level, s_1)

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
        step = lambda x, v, s, s_next, noise: flow_grpo_sde_step(x, v, s, s_next, noise, noise_level=c.noise_level, s_1=s_1)
        return sde_rollout(velocity, noises, cond, sigmas, self.sde_mask(iteration).to(device), step, z, prompts, prompt_indices)

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

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return sde_old_policy(self.config.old_policy, velocity, rollout, batches, self._mean_std)

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
                sigma_t = flow_grpo_noise_scale(float(rollout.sigmas[j]), c.noise_level, float(rollout.sigmas[1]))
                kl = (mean - mean_ref).pow(2).flatten(2).mean(-1) / (2 * sigma_t**2)
                return c.kl_beta * kl.mean()
        return sde_policy_loss(velocity, rollout, advantages, batch, self._mean_std, c.eps_clip, penalty)
