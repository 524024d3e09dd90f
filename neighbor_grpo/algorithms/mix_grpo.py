"""MixGRPO (Li et al. 2025; reference code Tencent-Hunyuan/MixGRPO, fastvideo/train_grpo_flux.py and
fastvideo/utils/grpo_states.py, sampling_utils.py): SDE only inside a sliding window of steps, ODE elsewhere.

Only the window's steps are stochastic and trained; the window moves forward by `window_stride` steps every
`window_interval` iterations ("progressive" with overlap, the reference's recipe) and rolls back to the start.
MixGRPO-Flash samples the ODE part after the window with DPM-Solver++(2M) on a compressed grid.
"""

from __future__ import annotations

import math

import torch

from neighbor_grpo.config.algorithm_settings import MixGRPOConfig  # noqa: F401  (re-exported)
from neighbor_grpo.maths.advantages import clip_advantages, std_advantages
from neighbor_grpo.algorithms.common import Minibatch, Phase, Rollout, VelocityFn
from neighbor_grpo.algorithms.sde import (dance_grpo_mean_std, dance_grpo_sde_step, euler_ode_step, flow_grpo_mean_std,
                                          flow_grpo_sde_step, sde_call_schedule, sde_old_policy, rollout_noises,
                                          sde_minibatches, sde_policy_loss, sde_rollout, sde_steps, step_losses)
from neighbor_grpo.maths.flow import predict_x0, sigma_grid


def window_steps(iteration: int, num_steps: int, size: int, stride: int = 1, interval: int = 25,
                 roll_back: bool = True) -> list[int]:
    """The window's steps at an iteration: it starts at stride * (iteration // interval) and is cut at the
    reference's max_timesteps = N - 2 (the last two steps are never stochastic). The reference also visits the
    start N - 2 itself, where the window is empty and nothing trains; we roll back (or stop) one position earlier."""
    end = num_steps - 2
    if end < 1:
        raise ValueError(f"MixGRPO needs rollout_steps >= 3 for a non-empty window; got {num_steps}")
    positions = (end - 1) // stride + 1  # starts 0, stride, ... below end
    position = iteration // interval
    position = position % positions if roll_back else min(position, positions - 1)
    start = position * stride
    return list(range(start, min(start + size, end)))


# ---- MixGRPO-Flash: DPM-Solver++ after the window --------------------------------------------------------------

def flash_grid(num_steps: int, shift: float, last_sde_step: int, compress_ratio: float) -> torch.Tensor:
    """The full grid up to the step after the window, then int(ratio * (N - last)) points from there to 0,
    linear in unshifted time and shifted, as the reference's 'post' strategy."""
    full = sigma_grid(num_steps, shift=shift)
    start = float(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[last_sde_step + 1])
    # The reference keeps at least 1 point, which would end the grid above 0; 2 points is one step into s = 0.
    points = max(int((num_steps - last_sde_step) * compress_ratio), 2)
    return torch.cat([full[: last_sde_step + 1], sigma_grid(points - 1, shift=shift, start=start)])


def _log_snr(s: float) -> float:
    """DPM-Solver's lambda = log((1 - s) / s) on the flow path (finite for 0 < s < 1)."""
    return math.log1p(-s) - math.log(s)


def dpmpp_2m_step(x: torch.Tensor, v: torch.Tensor, s: float, t: float, x0_previous: torch.Tensor | None,
                  s_previous: float | None) -> torch.Tensor:
    """One DPM-Solver++(2M) step from s to t with the previous step's data prediction (midpoint form, as
    solvers.dpmpp_2m): first order without history, after a step from s = 1, and into t = 0."""
    x0 = predict_x0(x, v, s)
    ratio = t / s
    if x0_previous is None or s_previous is None or s_previous >= 1 or t == 0:
        return ratio * x + (1 - ratio) * x0
    h, h_previous = _log_snr(t) - _log_snr(s), _log_snr(s) - _log_snr(s_previous)
    half_inverse_r = 0.5 * h / h_previous  # D0 + D1 / 2 with D1 = (x0 - x0_previous) / r, r = h_previous / h
    return ratio * x + (1 - ratio) * ((1 + half_inverse_r) * x0 - half_inverse_r * x0_previous)


def flash_ode_step(last_sde_step: int):
    """Euler before and inside the window's span, DPM-Solver++(2M) after it; the history of the first DPM step is
    the window's last step, as the reference's dpm_state (updated through the window)."""

    def step(j: int, states: list, velocities: list, grid: list) -> torch.Tensor:
        if j <= last_sde_step:
            return euler_ode_step(j, states, velocities, grid)
        x0_previous = predict_x0(states[j - 1], velocities[j - 1], grid[j - 1])
        return dpmpp_2m_step(states[j], velocities[j], grid[j], grid[j + 1], x0_previous, grid[j - 1])

    return step


class MixGRPO:
    """MixGRPO: SDE in a sliding window, ODE (Euler, or DPM-Solver++ for Flash) elsewhere; trains the window."""

    name = "mix_grpo"

    def __init__(self, config: MixGRPOConfig = MixGRPOConfig(), seed: int = 0):
        self.config = config
        self.seed = seed

    def window(self, iteration: int) -> list[int]:
        c = self.config
        return window_steps(iteration, c.rollout_steps, c.window_size, c.window_stride, c.window_interval, c.window_roll_back)

    def rollout_grid(self, iteration: int) -> torch.Tensor:
        """The rollout's flow times: the full grid, or Flash's grid compressed after the window."""
        c = self.config
        if c.flash:
            return flash_grid(c.rollout_steps, c.shift or 1.0, self.window(iteration)[-1], c.flash_compress_ratio)
        return sigma_grid(c.rollout_steps, shift=c.shift or 1.0)

    def call_schedule(self, prompts: int, *, rollout_chunk: int | None = None, micro_batch: int | None = None,
                      iteration: int = 0) -> list[Phase]:
        """One iteration's velocity-net calls (common.Phase; sde.sde_call_schedule): one rollout evaluation per
        step of the grid (Flash: fewer after the window) and every window step trained; both depend on where the
        window is at `iteration`. No reference (the reference's kl_coeff is not a reference-model KL)."""
        c = self.config
        return sde_call_schedule(prompts, c.group_size, len(self.rollout_grid(iteration)) - 1, len(self.window(iteration)),
                                 c.num_minibatches, c.minibatch_by, c.old_policy, False, rollout_chunk, micro_batch)

    def _mean_std(self, x: torch.Tensor, v: torch.Tensor, j: int, rollout: Rollout) -> tuple[torch.Tensor, float]:
        s, s_next = float(rollout.sigmas[j]), float(rollout.sigmas[j + 1])
        if self.config.sde == "dance_grpo":
            return dance_grpo_mean_std(x, v, s, s_next, self.config.noise_level)
        return flow_grpo_mean_std(x, v, s, s_next, self.config.noise_level, float(rollout.sigmas[1]))

    @torch.no_grad()
    def rollout(self, velocity: VelocityFn, cond: torch.Tensor, prompts, prompt_indices, iteration: int,
                latent_shape: tuple[int, ...], device: str | torch.device = "cpu",
                candidates: slice | None = None) -> Rollout:
        """`candidates`: only that block of each group (a group split over processes), with its own noises."""
        c = self.config
        if c.sde not in ("flow_grpo", "dance_grpo"):
            raise ValueError(f"sde must be 'flow_grpo' or 'dance_grpo'; got {c.sde!r}")
        window = self.window(iteration)
        ode_step = flash_ode_step(window[-1]) if c.flash else euler_ode_step
        sigmas = self.rollout_grid(iteration).to(device)
        num_steps = len(sigmas) - 1
        mask = torch.zeros(num_steps, dtype=torch.bool, device=device)
        mask[window] = True
        noises, z = rollout_noises(latent_shape, c.group_size, num_steps, c.same_initial_noise, self.seed, iteration,
                                   prompt_indices, device, candidates)
        s_1 = float(sigmas[1])
        if c.sde == "dance_grpo":
            step = lambda x, v, s, s_next, noise: dance_grpo_sde_step(x, v, s, s_next, noise, eta=c.noise_level)
        else:
            step = lambda x, v, s, s_next, noise: flow_grpo_sde_step(x, v, s, s_next, noise, noise_level=c.noise_level, s_1=s_1)
        return sde_rollout(velocity, noises, cond, sigmas, mask, step, z, prompts, prompt_indices, ode_step)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(r - mean) / (torch.std(r) + 1e-8) per group, as the reference (trimmed_ratio 0)."""
        return std_advantages(rewards, self.config.adv_eps, unbiased=True)

    def clip(self, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
        return clip_advantages(advantages, self.config.adv_clip)

    def minibatches(self, rollout: Rollout, iteration: int) -> list[Minibatch]:
        """Every window step is trained (the reference's training_strategy 'part')."""
        c = self.config
        return sde_minibatches(sde_steps(rollout), rollout, c.num_minibatches, c.minibatch_by, self.seed, iteration)

    def loss_parts(self, batch: Minibatch) -> list[tuple[Minibatch, float]]:
        """One part per trained step, backpropagated before the next (as the reference's per-timestep backward)."""
        return step_losses(batch)

    def prepare_old_policy(self, velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch]) -> Rollout:
        return sde_old_policy(self.config.old_policy, velocity, rollout, batches, self._mean_std)

    def loss(self, velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
             reference_velocity: VelocityFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The reference's kl_coeff term is 0 in its recipes and is not a reference-model KL: not implemented."""
        return sde_policy_loss(velocity, rollout, advantages, batch, self._mean_std, self.config.eps_clip)
