"""Deterministic ODE samplers for flow-matching models, in the style of k-diffusion's sampling.py.

Every solver integrates dx/ds = velocity(x, s) along a decreasing grid `sigmas` (s_0 > ... > s_N, in [0, 1]) and
shares one signature, `solver(velocity, x, sigmas, callback=None) -> x_N`:

* `velocity(x, s)` gets the batch and a 0-dim tensor s (dtype of `sigmas`, device of x); conditioning is the
  caller's business (bind it in a closure).
* `callback(j, x_j, v_j)` is called once per step j = 0..N-1 with the state at s_j and the velocity evaluated
  there, which is the first evaluation of every solver here. RL uses it to record trajectories and the old
  policy's velocities.
* Solvers are stateless: multistep memory lives in local variables. Tensor math stays in x's dtype; step
  coefficients are python floats computed in float64.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import torch

from neighbor_grpo.maths.flow import predict_x0

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Solver = Callable[..., torch.Tensor]


def _checked_grid(sigmas: torch.Tensor) -> list[float]:
    """The grid as float64 python floats, after checking it is a strictly decreasing 1-D grid inside [0, 1]."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    values = [float(s) for s in sigmas.detach().cpu().double().tolist()]
    if any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    if values[0] > 1 or values[-1] < 0:
        raise ValueError(f"sigmas must lie in [0, 1], got [{values[-1]}, {values[0]}]")
    return values


def _flow_time(sigmas: torch.Tensor, j: int, x: torch.Tensor) -> torch.Tensor:
    """s_j as the 0-dim tensor handed to the velocity model."""
    return sigmas[j].to(x.device)


def _log_snr(s: float) -> float:
    """DPM-Solver's lambda = log(alpha / sigma) = log((1 - s) / s) for the flow path; -inf at s = 1."""
    if s >= 1:
        return -math.inf
    return math.log1p(-s) - math.log(s)


def euler(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """Explicit Euler on dx/ds = v(x, s); identical to diffusers' FlowMatchEulerDiscreteScheduler (first order)."""
    grid = _checked_grid(sigmas)
    for j in range(len(grid) - 1):
        v = velocity(x, _flow_time(sigmas, j, x))
        if callback is not None:
            callback(j, x, v)
        x = x + (grid[j + 1] - grid[j]) * v
    return x


def heun(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Alg. 1, no churn): second order, two evaluations per step."""
    grid = _checked_grid(sigmas)
    for j in range(len(grid) - 1):
        v = velocity(x, _flow_time(sigmas, j, x))
        if callback is not None:
            callback(j, x, v)
        ds = grid[j + 1] - grid[j]
        x_euler = x + ds * v
        if grid[j + 1] == 0:
            # As k-diffusion: an Euler step into s = 0, so the model is never queried at pure data.
            x = x_euler
            continue
        v_end = velocity(x_euler, _flow_time(sigmas, j + 1, x))
        x = x + ds * 0.5 * (v + v_end)
    return x


def dpmpp_2m(
    velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep, as diffusers' DPMSolverMultistepScheduler."""
    grid = _checked_grid(sigmas)
    x0_previous = None
    for j in range(len(grid) - 1):
        s, t = grid[j], grid[j + 1]
        v = velocity(x, _flow_time(sigmas, j, x))
        if callback is not None:
            callback(j, x, v)
        x0 = predict_x0(x, v, s)
        # With alpha = 1 - s, sigma = s: sigma_t / sigma_s = t / s and -alpha_t (e^{-h} - 1) = 1 - t / s, finite
        # even for s = 1 (lambda = -inf), where the step is the exact limit t x + (1 - t) x0hat.
        ratio = t / s
        # First order at the start (no history), after a step from s = 1 (h_prev = inf, so the correction D1
        # vanishes in the limit) and into t = 0 (lower_order_final: h = inf there).
        first_order = x0_previous is None or grid[j - 1] >= 1 or t == 0
        if first_order:
            x = ratio * x + (1 - ratio) * x0
        else:
            h = _log_snr(t) - _log_snr(s)
            h_previous = _log_snr(s) - _log_snr(grid[j - 1])
            half_inverse_r = 0.5 * h / h_previous
            # midpoint form: D0 + D1 / 2 with D1 = (x0 - x0_previous) / r, r = h_previous / h
            x = ratio * x + (1 - ratio) * ((1 + half_inverse_r) * x0 - half_inverse_r * x0_previous)
        x0_previous = x0
    return x


SOLVERS: dict[str, Solver] = {"euler": euler, "heun": heun, "dpm++2m": dpmpp_2m}


def get_solver(name: str) -> Solver:
    """The solver registered under `name` in SOLVERS."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


class Trajectory(NamedTuple):
    """A sampled ODE path: states x_0..x_N (N+1, *x.shape) and velocities v(x_j, s_j) for j < N (N, *x.shape)."""

    states: torch.Tensor
    velocities: torch.Tensor


def integrate(
    velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, solver: Union[str, Solver] = "dpm++2m"
) -> Trajectory:
    """Run a solver from x at sigmas[0] to sigmas[-1] and keep every grid state and its velocity."""
    solve = get_solver(solver) if isinstance(solver, str) else solver
    states: list[torch.Tensor] = []
    velocities: list[torch.Tensor] = []

    def record(j: int, x_j: torch.Tensor, v_j: torch.Tensor) -> None:
        states.append(x_j)
        velocities.append(v_j)

    final = solve(velocity, x, sigmas, callback=record)
    states.append(final)
    return Trajectory(states=torch.stack(states), velocities=torch.stack(velocities))
