"""Reward-hacking monitors and held-out sample generation."""

import math

import pytest
import torch

from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.monitors import generate, nearest_real_distance, out_of_range_share, within_prompt_diversity


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)


# ---- out_of_range_share -----------------------------------------------------------------------------------------

def test_out_of_range_counts_only_pixels_beyond_the_margin():
    margin = 0.25  # exactly representable, so the boundaries are exact
    values = torch.tensor([
        0.0, 0.5, 1.0,          # in range
        -0.25, 1.25,            # on the margin: not counted
        -0.1, 1.1,              # outside [0, 1] but inside the margin: not counted
        -0.26, 1.26, -5.0, 7.0  # beyond the margin: counted
    ])
    images = values.view(1, 1, 1, -1)
    assert out_of_range_share(images, margin=margin) == pytest.approx(4 / 11)


def test_out_of_range_default_margin_and_shapes():
    images = torch.full((2, 3, 1, 4, 4), 0.5)
    assert out_of_range_share(images) == 0.0
    images[0, 0, 0, 0, 0] = 1.5
    images[1, 2, 0, 3, 3] = -0.5
    assert out_of_range_share(images) == pytest.approx(2 / images.numel())
    assert out_of_range_share(images, margin=1.0) == 0.0


# ---- within_prompt_diversity ------------------------------------------------------------------------------------

def test_diversity_is_zero_for_identical_samples():
    generator = torch.Generator().manual_seed(0)
    one = torch.rand((2, 1, 1, 6, 6), generator=generator)
    images = one.expand(2, 5, 1, 6, 6).clone()
    assert within_prompt_diversity(images) == pytest.approx(0.0, abs=1e-6)


def test_diversity_of_two_constant_images_is_their_difference():
    # two samples of one prompt: the mean pairwise RMS distance is |a - b|
    images = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 0.7)]).unsqueeze(0)
    assert within_prompt_diversity(images) == pytest.approx(0.5, abs=1e-6)


def test_diversity_is_the_mean_over_prompts_and_pairs():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((3, 4, 1, 5, 5), generator=generator)
    expected = []
    for p in range(3):
        pairs = [math.sqrt(float(((images[p, i] - images[p, j]) ** 2).mean()))
                 for i in range(4) for j in range(4) if i != j]
        expected.append(sum(pairs) / len(pairs))
    assert within_prompt_diversity(images) == pytest.approx(sum(expected) / 3, rel=1e-5)


def test_diversity_grows_with_spread():
    generator = torch.Generator().manual_seed(2)
    directions = torch.rand((2, 6, 1, 8, 8), generator=generator) - 0.5  # in [-0.5, 0.5]
    values = [within_prompt_diversity(0.5 + spread * directions) for spread in (0.0, 0.2, 0.5, 1.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(values, values[1:])), values
    # no clamping happens at these spreads, so the distance is linear in the spread
    assert values[2] == pytest.approx(2.5 * values[1], rel=1e-4)


def test_diversity_clamps_first():
    # far outside [0, 1] both clamp to the same image: no diversity is counted for out-of-range values
    images = torch.stack([torch.full((1, 4, 4), 3.0), torch.full((1, 4, 4), 9.0)]).unsqueeze(0)
    assert within_prompt_diversity(images) == pytest.approx(0.0, abs=1e-6)


# ---- nearest_real_distance --------------------------------------------------------------------------------------

def test_nearest_real_distance_is_zero_for_real_images(adapter):
    # torch.cdist takes a matrix-product shortcut above 25 rows, which leaves ~1e-4 of rounding in the
    # distance of an image to itself; typical sample distances are ~0.1, so 1e-3 is a tight bound
    generator = torch.Generator().manual_seed(3)
    real = torch.rand((40, 1, 8, 8), generator=generator)
    assert nearest_real_distance(real, real) == pytest.approx(0.0, abs=1e-3)
    assert nearest_real_distance(real[torch.tensor([5, 17, 30])], real) == pytest.approx(0.0, abs=1e-3)
    digits = adapter.reference_images()  # the held-out real digits the realism monitor uses
    assert nearest_real_distance(digits[:50], digits) == pytest.approx(0.0, abs=1e-3)


def test_nearest_real_distance_is_positive_and_exact_otherwise():
    real = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.5)])
    samples = torch.stack([torch.full((1, 4, 4), 0.1),    # nearest: zeros, RMS 0.1
                           torch.full((1, 4, 4), 0.8),    # nearest: ones, RMS 0.2
                           torch.full((1, 4, 4), 0.55)])  # nearest: 0.5, RMS 0.05
    assert nearest_real_distance(samples, real) == pytest.approx((0.1 + 0.2 + 0.05) / 3, abs=1e-6)
    assert nearest_real_distance(samples[:1], real) > 0
    generator = torch.Generator().manual_seed(4)
    noise = torch.rand((30, 1, 8, 8), generator=generator)
    assert nearest_real_distance(noise, torch.rand((40, 1, 8, 8), generator=generator)) > 0.1


def test_nearest_real_distance_clamps_samples():
    real = torch.ones(1, 1, 4, 4)
    assert nearest_real_distance(torch.full((1, 1, 4, 4), 5.0), real) == pytest.approx(0.0, abs=1e-6)


# ---- generate ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter():
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=1, cond_dim=16), seed=0)
    with torch.no_grad():  # the output layer starts at zero; give it weights so the model matters
        generator = torch.Generator().manual_seed(1)
        for p in adapter.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return adapter


def test_generate_shapes(adapter):
    latents, images = generate(adapter, ["3", "5"], 4, seed=11, steps=4)
    assert latents.shape == (2, 4, 1, 8, 8)
    assert images.shape == (2, 4, 1, 16, 16)


def test_generate_is_deterministic_for_a_seed(adapter):
    first = generate(adapter, ["1", "7"], 3, seed=123, solver="dpm++2m", steps=4)
    torch.manual_seed(999)  # the global RNG state must not matter
    second = generate(adapter, ["1", "7"], 3, seed=123, solver="dpm++2m", steps=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_generate_differs_across_seeds(adapter):
    _, a = generate(adapter, ["1", "7"], 3, seed=123, steps=4)
    _, b = generate(adapter, ["1", "7"], 3, seed=124, steps=4)
    assert (a - b).abs().mean() > 1e-3


def test_generate_samples_within_a_prompt_differ(adapter):
    _, images = generate(adapter, ["4"], 4, seed=5, steps=4)
    assert within_prompt_diversity(images) > 1e-3


def test_generate_noise_is_keyed_by_prompt_position(adapter):
    """Sample k of the prompt at position p only depends on (seed, p, k): a prefix of the prompt list gives the
    same samples, and the samples-per-prompt count does not change the first ones."""
    _, both = generate(adapter, ["2", "8"], 3, seed=7, steps=4)
    _, first = generate(adapter, ["2"], 3, seed=7, steps=4)
    _, fewer = generate(adapter, ["2", "8"], 2, seed=7, steps=4)
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:, :2], fewer, rtol=1e-5, atol=1e-6)


def test_generate_uses_the_prompt(adapter):
    _, a = generate(adapter, ["0"], 2, seed=9, steps=4)
    _, b = generate(adapter, ["9"], 2, seed=9, steps=4)
    assert (a - b).abs().mean() > 1e-4


class PointMassAdapter:
    """A model whose data distribution is one image per prompt: the exact flow velocity toward target x0 is
    v(x, s) = (x - x0) / s, constant along each straight path, so every solver lands exactly on x0."""

    targets = torch.linspace(-1, 1, 3 * 16).view(3, 1, 4, 4)  # prompts "0", "1", "2"

    device = torch.device("cpu")

    def latent_shape(self):
        return (1, 4, 4)

    def encode_prompts(self, prompts):
        return torch.tensor([int(p) for p in prompts])

    def velocity(self, x, s, cond):
        return (x - self.targets[cond]) / s

    def decode(self, latents):
        return (latents + 1) / 2


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_generate_solvers_land_on_the_known_sample(solver, steps):
    adapter = PointMassAdapter()
    latents, images = generate(adapter, ["2", "0"], 3, seed=1, solver=solver, steps=steps, shift=3.0)
    expected = adapter.targets[[2, 0]].unsqueeze(1).expand(2, 3, 1, 4, 4)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(images, (expected + 1) / 2, rtol=0, atol=1e-5)


class CurvedAdapter(PointMassAdapter):
    """The point-mass flow plus a curl, so that solvers and grids give different samples."""

    def velocity(self, x, s, cond):
        return super().velocity(x, s, cond) + 0.5 * torch.sin(3 * x + 5 * s)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm++2m"])
def test_generate_is_the_named_solver_on_the_shifted_grid_from_the_keyed_noises(solver):
    """generate = that solver from the noises independent_noises keys by (seed, 0, prompt position), on
    sigma_grid(steps, shift); a different solver or shift gives different samples."""
    from neighbor_grpo.maths.flow import sigma_grid
    from neighbor_grpo.maths.noise import independent_noises
    from neighbor_grpo.maths.solvers import get_solver

    adapter, prompts, S = CurvedAdapter(), ["1", "2"], 2
    latents, images = generate(adapter, prompts, S, seed=21, solver=solver, steps=4, shift=2.0)
    noises = torch.cat([independent_noises((1, 4, 4), S, 21, 0, k) for k in range(len(prompts))])
    cond = adapter.encode_prompts(prompts).repeat_interleave(S)
    expected = get_solver(solver)(lambda x, s: adapter.velocity(x, s, cond), noises, sigma_grid(4, shift=2.0))
    torch.testing.assert_close(latents.flatten(0, 1), expected)
    torch.testing.assert_close(images.flatten(0, 1), adapter.decode(expected))
    other = "euler" if solver != "euler" else "heun"
    assert (generate(adapter, prompts, S, seed=21, solver=other, steps=4, shift=2.0)[0] - latents).abs().max() > 1e-3
    assert (generate(adapter, prompts, S, seed=21, solver=solver, steps=4, shift=1.0)[0] - latents).abs().max() > 1e-3


# ---- eval.monitor_rewards ---------------------------------------------------------------------------------------

def test_monitor_rewards_are_logged_and_never_change_training(builtin_models, tmp_path):
    import csv
    import json

    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.runs.io import load_safetensors
    from neighbor_grpo.training.trainer import train

    base = ["iterations=3", "prompts_per_iteration=4", "eval.every=2", "eval.samples_per_prompt=4",
            "neighbor_grpo.group_size=6", "neighbor_grpo.num_anchors=2"]
    plain = train(load_config(None, base), tmp_path / "plain", progress=False)
    monitored = train(load_config(None, base + ["eval.monitor_rewards=[{name: digit_gold}, {name: jpeg_compressibility}]"]),
                      tmp_path / "monitored", progress=False)
    a = load_safetensors(plain.run_dir / "aligned" / "model.safetensors")
    b = load_safetensors(monitored.run_dir / "aligned" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain.eval_after["reward"] == monitored.eval_after["reward"]  # never part of `reward`
    after = json.loads((monitored.run_dir / "eval_after.json").read_text())
    for key in ("monitor/digit_gold", "monitor/digit_gold/gold_class", "monitor/digit_gold/typical",
                "monitor/jpeg_compressibility"):
        assert key in after and key not in plain.eval_after, key
    assert after["monitor/digit_gold"] == pytest.approx(after["monitor/digit_gold/gold"])
    with open(monitored.run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("heldout/monitor/digit_gold") not in ("", None)]
    assert [int(r["iteration"]) for r in logged] == [0, 2, 3]
    assert [k for k in rows[0] if "monitor" in k and not k.startswith("heldout/")] == []  # held-out only
