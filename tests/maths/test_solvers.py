import math

import pytest
import torch

from neighbor_grpo.maths.flow import predict_x0, sigma_grid
from neighbor_grpo.maths.solvers import SOLVERS, Trajectory, dpmpp_2m, euler, get_solver, heun, integrate

# ---------------------------------------------------------------------------------------------------------------
# An ODE with a closed-form solution.
#
# Data x0 ~ N(MU, C^2 I) and noise eps ~ N(0, I) give, per coordinate, jointly Gaussian
#   x_s = (1 - s) x0 + s eps  with mean (1 - s) MU and variance sd(s)^2 = (1 - s)^2 C^2 + s^2,
#   Cov(x_s, eps - x0) = s - (1 - s) C^2,  E[eps - x0] = -MU,
# so the flow-matching velocity E[eps - x0 | x_s] is affine in x:
#   v(x, s) = -MU + (s - (1 - s) C^2) / sd(s)^2 * (x - (1 - s) MU).
# The ODE keeps the standardised coordinate z = (x - (1 - s) MU) / sd(s) fixed (d sd/ds = (s - (1 - s) C^2) / sd),
# so the trajectory from eps at s = 1 is x(s) = (1 - s) MU + sd(s) eps, and it lands on MU + C eps at s = 0.
# Both claims are checked numerically below before the solvers are measured against them.
# ---------------------------------------------------------------------------------------------------------------
MU, C = 0.7, 0.4
EPS = torch.linspace(-3.0, 3.0, 61, dtype=torch.float64)  # deterministic "noise" covering the bulk of N(0, 1)


def gaussian_sd(s: float) -> float:
    return math.sqrt((1 - s) ** 2 * C**2 + s**2)


def gaussian_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = float(s)
    return -MU + (s - (1 - s) * C**2) / gaussian_sd(s) ** 2 * (x - (1 - s) * MU)


def exact_state(s: float) -> torch.Tensor:
    return (1 - s) * MU + gaussian_sd(s) * EPS


def test_gaussian_velocity_is_the_conditional_mean_of_eps_minus_x0():
    generator = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = MU + C * torch.randn(n, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, generator=generator, dtype=torch.float64)
    for s in (0.2, 0.5, 0.8):
        x = (1 - s) * x0 + s * eps
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, (eps - x0)[:, None]).solution.squeeze(1).tolist()
        # closed form written as slope * x + intercept
        expected_slope = (s - (1 - s) * C**2) / gaussian_sd(s) ** 2
        expected_intercept = -MU - expected_slope * (1 - s) * MU
        assert slope == pytest.approx(expected_slope, abs=0.01)
        assert intercept == pytest.approx(expected_intercept, abs=0.01)


@pytest.mark.parametrize("s", [0.05, 0.3, 0.7, 0.95])
def test_closed_form_trajectory_solves_the_ode(s):
    step = 1e-5
    derivative = (exact_state(s + step) - exact_state(s - step)) / (2 * step)
    velocity = gaussian_velocity(exact_state(s), torch.tensor(s, dtype=torch.float64))
    torch.testing.assert_close(derivative, velocity, rtol=0, atol=1e-8)
    torch.testing.assert_close(exact_state(1.0), EPS)
    torch.testing.assert_close(exact_state(0.0), MU + C * EPS)


def error_at_end(solver_name: str, sigmas: torch.Tensor) -> float:
    start, end = float(sigmas[0]), float(sigmas[-1])
    final = get_solver(solver_name)(gaussian_velocity, exact_state(start), sigmas)
    return (final - exact_state(end)).abs().max().item()


def observed_order(solver_name: str, grid_for, step_counts) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    log_n = torch.tensor([math.log(n) for n in step_counts], dtype=torch.float64)
    log_err = torch.tensor([math.log(error_at_end(solver_name, grid_for(n))) for n in step_counts], dtype=torch.float64)
    centered = log_n - log_n.mean()
    return -(centered * (log_err - log_err.mean())).sum().item() / (centered**2).sum().item()


def full_grid(n: int) -> torch.Tensor:
    return sigma_grid(n).double()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_first_order_from_noise_to_data(shift):
    order = observed_order("euler", lambda n: sigma_grid(n, shift=shift).double(), [16, 32, 64, 128])
    assert 0.9 < order < 1.1


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_is_second_order_from_noise_to_data(shift):
    # the Euler step into s = 0 has an O(h^2) local error, so it does not spoil second order
    order = observed_order("heun", lambda n: sigma_grid(n, shift=shift).double(), [16, 32, 64, 128])
    assert 1.85 < order < 2.2


def test_dpmpp_2m_is_second_order_on_a_grid_with_small_log_snr_steps():
    # DPM-Solver++(2M)'s error analysis is in lambda = log((1 - s) / s). Ending at s = 0.1 keeps every lambda step
    # O(1/N); the grid still starts at s = 1, so the first two steps are first order (the first has no history,
    # the second's history sits at lambda = -inf), which costs only O(h^2) globally.
    order = observed_order("dpm++2m", lambda n: torch.linspace(1.0, 0.1, n + 1, dtype=torch.float64), [16, 32, 64, 128])
    assert 1.85 < order < 2.2


def test_dpmpp_2m_is_second_order_up_to_a_log_factor_when_ending_at_data():
    # On a grid linear in s that ends at 0, the last k steps have lambda increments ~ 1/k rather than ~ 1/N.
    # x0hat along the exact path is x0 + O(s^2), so the step at s ~ k/N contributes ~ 1/(k N^2), and the sum is
    # O(log N / N^2): the raw slope creeps up to 2 (1.65 at N = 64, 1.87 at N = 4096); dividing out log N gives ~2.
    step_counts = [64, 128, 256, 512]
    errors = [error_at_end("dpm++2m", full_grid(n)) for n in step_counts]
    log_corrected = [e / math.log(n) for e, n in zip(errors, step_counts)]
    for i in range(len(step_counts) - 1):
        assert math.log2(errors[i] / errors[i + 1]) > 1.55
        assert math.log2(log_corrected[i] / log_corrected[i + 1]) > 1.8


def test_dpmpp_2m_beats_euler_at_equal_cost():
    assert error_at_end("dpm++2m", full_grid(32)) < 0.2 * error_at_end("euler", full_grid(32))


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers' schedulers on a small fixed random velocity MLP.
# ---------------------------------------------------------------------------------------------------------------
class TinyVelocityModel(torch.nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 32):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, hidden, generator=generator) / math.sqrt(dim + 1))
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dim, generator=generator) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        features = torch.cat([x, s.to(x.dtype).expand(x.shape[0], 1)], dim=1)
        return torch.tanh(features @ self.w1.to(x.dtype)) @ self.w2.to(x.dtype)


@pytest.fixture
def model():
    return TinyVelocityModel().requires_grad_(False)


@pytest.fixture
def noise():
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def diffusers_states(scheduler, model, x):
    """Run a diffusers scheduler loop, feeding the model the scheduler's own sigma at every step."""
    states = [x]
    for i, timestep in enumerate(scheduler.timesteps):
        v = model(x, scheduler.sigmas[i])
        x = scheduler.step(v, timestep, x).prev_sample
        states.append(x)
    return torch.stack(states)


@pytest.mark.parametrize("num_steps", [1, 3, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match_euler_step_for_step(model, noise, num_steps, shift):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    reference = diffusers_states(scheduler, model, noise)
    ours = integrate(model, noise, scheduler.sigmas, solver="euler").states
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep_step_for_step(model, noise, num_steps, shift):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        flow_shift=shift,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps)
    reference = diffusers_states(scheduler, model, noise)
    ours = integrate(model, noise, scheduler.sigmas, solver="dpm++2m").states
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks, trajectories, model-call budget, and edge cases.
# ---------------------------------------------------------------------------------------------------------------
class CountingVelocity:
    def __init__(self, model):
        self.model, self.times = model, []

    def __call__(self, x, s):
        assert s.ndim == 0
        self.times.append(float(s))
        return self.model(x, s)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_callback_reports_each_grid_state_and_the_velocity_there(model, noise, name):
    sigmas = sigma_grid(6, shift=3.0)
    reports = []
    final = get_solver(name)(model, noise, sigmas, callback=lambda j, x, v: reports.append((j, x, v)))
    assert [j for j, _, _ in reports] == list(range(6))
    torch.testing.assert_close(reports[0][1], noise)
    for j, x_j, v_j in reports:
        torch.testing.assert_close(v_j, model(x_j, sigmas[j]))
    trajectory = integrate(model, noise, sigmas, solver=name)
    torch.testing.assert_close(trajectory.states[:-1], torch.stack([x for _, x, _ in reports]))
    torch.testing.assert_close(trajectory.states[-1], final)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_integrate_shapes_and_dtype(model, name):
    x = torch.randn(3, 6, dtype=torch.float64)
    trajectory = integrate(model, x, sigma_grid(4), solver=name)
    assert isinstance(trajectory, Trajectory)
    assert trajectory.states.shape == (5, 3, 6)
    assert trajectory.velocities.shape == (4, 3, 6)
    assert trajectory.states.dtype == trajectory.velocities.dtype == torch.float64


@pytest.mark.parametrize("name, expected_calls", [("euler", 7), ("dpm++2m", 7), ("heun", 13)])
def test_model_calls_per_solver_never_at_pure_data(model, noise, name, expected_calls):
    velocity = CountingVelocity(model)
    get_solver(name)(velocity, noise, sigma_grid(7))
    assert len(velocity.times) == expected_calls
    assert min(velocity.times) > 0


def test_heun_uses_two_calls_per_step_when_not_ending_at_zero(model, noise):
    velocity = CountingVelocity(model)
    heun(velocity, noise, torch.linspace(1.0, 0.2, 5))
    assert len(velocity.times) == 8


def test_dpmpp_2m_first_step_from_pure_noise_is_the_exact_limit(model, noise):
    s1 = 0.8
    v = model(noise, torch.tensor(1.0))
    expected = s1 * noise + (1 - s1) * predict_x0(noise, v, 1.0)
    torch.testing.assert_close(dpmpp_2m(model, noise, torch.tensor([1.0, s1])), expected)


def test_dpmpp_2m_reduces_to_euler_when_every_step_is_first_order(model, noise):
    # from s = 1: no history, then history at lambda = -inf, then the final step into s = 0
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    torch.testing.assert_close(dpmpp_2m(model, noise, sigmas), euler(model, noise, sigmas), rtol=1e-6, atol=1e-6)


def test_dpmpp_2m_differs_from_euler_once_multistep_kicks_in(model, noise):
    sigmas = sigma_grid(6, start=0.999)
    assert not torch.allclose(dpmpp_2m(model, noise, sigmas), euler(model, noise, sigmas), atol=1e-4)


def test_get_solver_names_the_choices():
    assert get_solver("heun") is heun
    with pytest.raises(ValueError, match="dpm\\+\\+2m"):
        get_solver("rk45")


@pytest.mark.parametrize(
    "sigmas",
    [torch.tensor([1.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.5, 0.0]),
     torch.ones(2, 2)],
)
def test_solvers_reject_malformed_grids(model, noise, sigmas):
    with pytest.raises(ValueError):
        euler(model, noise, sigmas)
