import pytest
import torch

from neighbor_grpo.maths.flow import full_precision, interpolate, predict_eps, predict_x0, shift_sigmas, sigma_grid


@pytest.mark.parametrize("num_steps", [1, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_grid_runs_from_one_to_exactly_zero(num_steps, shift):
    grid = sigma_grid(num_steps, shift=shift)
    assert grid.shape == (num_steps + 1,)
    assert grid.dtype == torch.float32
    assert grid[0].item() == 1.0  # the shift keeps s = 1 fixed
    assert grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


def test_sigma_grid_is_linear_without_shift():
    torch.testing.assert_close(sigma_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_sigma_grid_applies_the_sd3_shift_to_a_linear_grid():
    linear = torch.linspace(0.9, 0.0, 11, dtype=torch.float64)
    expected = 3.0 * linear / (1 + 2.0 * linear)
    torch.testing.assert_close(sigma_grid(10, shift=3.0, start=0.9), expected.float())


def test_shift_spends_more_steps_at_high_noise():
    shifted, plain = sigma_grid(10, shift=3.0), sigma_grid(10)
    assert torch.all(shifted[1:-1] > plain[1:-1])


def test_shift_sigmas_formula_and_fixed_points():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(s, 2.0), torch.tensor([0.0, 0.4, 2 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)


def test_shift_by_inverse_undoes_shift():
    s = torch.linspace(0, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(shift_sigmas(s, 3.0), 1 / 3.0), s)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_steps=0),
        dict(num_steps=2.5),
        dict(num_steps=4, shift=0.0),
        dict(num_steps=4, shift=-1.0),
        dict(num_steps=4, start=0.0),
        dict(num_steps=4, start=1.5),
    ],
)
def test_sigma_grid_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sigma_grid(**kwargs)


def test_sigma_grid_matches_diffusers_dpm_solver_flow_sigmas():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    scheduler.set_timesteps(12)
    # diffusers starts its flow grid one training step below pure noise
    ours = sigma_grid(12, shift=3.0, start=1 - 1 / 1000)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-7)


def test_interpolate_endpoints():
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(interpolate(x0, eps, 0.0), x0)
    torch.testing.assert_close(interpolate(x0, eps, 1.0), eps)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.999, 1.0])
def test_true_velocity_recovers_data_and_noise(s):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    eps = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    x = interpolate(x0, eps, s)
    v = eps - x0  # the conditional flow-matching target
    torch.testing.assert_close(predict_x0(x, v, s), x0)
    torch.testing.assert_close(predict_eps(x, v, s), eps)


def test_predictions_accept_per_sample_tensor_times():
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:, None]
    x = interpolate(x0, eps, s)
    torch.testing.assert_close(predict_x0(x, eps - x0, s), x0)


def test_full_precision_upcasts_half_precision_only():
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.int64, torch.int64)):
        t = torch.ones(3, dtype=dtype)
        assert full_precision(t).dtype == expected
    exact = torch.randn(4, dtype=torch.float64)
    assert full_precision(exact) is exact  # float32 and wider pass through untouched (float64 tests stay float64)
