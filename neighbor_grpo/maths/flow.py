"""Rectified-flow conventions (diffusers / SD3 / FLUX): x_s = (1 - s) x0 + s eps, s from 1 (noise) to 0 (data).

A velocity model predicts v(x_s, s) ~ eps - x0, so the sampler integrates dx/ds = v from s = 1 down to s = 0.
"""

from __future__ import annotations

import torch


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor (a bf16/fp16 net's velocity) in float32; float32 and float64 as they are. The SDE
    log-probabilities and Neighbor GRPO's distances subtract nearly equal numbers and average them over every
    latent dimension: bf16's 8-bit mantissa turns their differences, and so the policy ratio, into noise."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight path from data x0 (s = 0) to noise eps (s = 1), as in rectified flow."""
    return (1 - s) * x0 + s * eps


def predict_x0(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Data prediction implied by a velocity: x0hat = x - s v."""
    return x - s * v


def predict_eps(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction implied by a velocity: epshat = x + (1 - s) v."""
    return x + (1 - s) * v


def shift_sigmas(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3/FLUX timestep shift s' = shift s / (1 + (shift - 1) s); keeps 0 and 1 fixed, shift > 1 favours noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * s / (1 + (shift - 1) * s)


def sigma_grid(num_steps: int, shift: float = 1.0, start: float = 1.0) -> torch.Tensor:
    """Decreasing float32 grid of num_steps + 1 flow times, linear from start to 0 and then SD3-shifted."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if not 0 < start <= 1:
        raise ValueError(f"start must be in (0, 1], got {start}")
    # Built in float64 so the only rounding is the final cast; the shift maps 0 to exactly 0.
    linear = torch.linspace(start, 0.0, int(num_steps) + 1, dtype=torch.float64)
    grid = shift_sigmas(linear, shift).to(torch.float32)
    grid[-1] = 0.0
    return grid
