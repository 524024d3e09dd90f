"""Eq. 7's neighbourhood of initial noises and the keyed random numbers (spec section 1, step 1)."""

import math

import pytest
import torch

from neighbor_grpo.algorithms.neighbor_grpo import NeighborGRPO, NeighborGRPOConfig
from neighbor_grpo.maths.noise import (ROLE_BASE, independent_noises, keyed_generator, keyed_normal, neighbor_noises,
                                 perturb_noise)

SIGMAS = (0.1, 0.3, 0.5, 0.7, 1.0)
SHAPE = (4, 32, 32)  # 4096 independent coordinates per draw
PROMPTS = 12
G = 6


pytestmark = pytest.mark.usefixtures("single_thread")


def draw(sigma: float) -> torch.Tensor:
    """(PROMPTS * D, G) samples: rows are independent (prompt, coordinate) pairs, columns the G candidates."""
    noises = torch.stack([neighbor_noises(SHAPE, G, sigma, seed=11, iteration=3, prompt_index=k) for k in range(PROMPTS)])
    assert noises.shape == (PROMPTS, G, *SHAPE)
    return noises.double().movedim(1, -1).reshape(-1, G)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_neighbour_noises_are_standard_normal_marginally(sigma):
    samples = draw(sigma)
    n_independent_bases = samples.shape[0]  # 49152; the shared base makes columns correlated, rows are iid
    # Standard error of the overall mean is about sqrt((1 - sigma^2 + sigma^2 / G) / n) <= 0.0046.
    mean = float(samples.mean())
    assert abs(mean) < 0.025, f"sigma={sigma}: mean {mean:.4f} should be ~0"
    for i in range(G):
        column = samples[:, i]
        var = float(column.var(correction=0))
        # Standard error of a variance estimate from n iid N(0, 1) values is sqrt(2 / n) ~ 0.0064.
        # The wrong mix (1 - sigma) e* + sigma d has variance (1 - sigma)^2 + sigma^2 <= 0.82 for sigma in [0.1, 0.7].
        assert abs(var - 1.0) < 0.04, f"sigma={sigma}, candidate {i}: variance {var:.4f} should be ~1"
        assert abs(float(column.mean())) < 0.04
        # fourth moment of a normal is 3
        assert abs(float(column.pow(4).mean()) - 3.0) < 0.2
    assert n_independent_bases == PROMPTS * math.prod(SHAPE)


@pytest.mark.parametrize("sigma", (0.3, 0.7))
def test_neighbour_noises_pass_a_ks_test(sigma):
    stats = pytest.importorskip("scipy.stats")
    column = draw(sigma)[:, 0].numpy()
    result = stats.kstest(column, "norm")
    assert result.pvalue > 1e-3, f"KS test against N(0, 1) rejects: {result}"
    # and the wrong formula would be rejected by the same test on the same draws
    base = torch.stack([keyed_normal(SHAPE, 11, 3, k, ROLE_BASE) for k in range(PROMPTS)]).double().flatten()
    delta = torch.stack([keyed_normal(SHAPE, 11, 3, k, 0) for k in range(PROMPTS)]).double().flatten()
    wrong = ((1 - sigma) * base + sigma * delta).numpy()
    assert stats.kstest(wrong, "norm").pvalue < 1e-6


@pytest.mark.parametrize("sigma", SIGMAS)
def test_pairwise_correlation_is_one_minus_sigma_squared(sigma):
    samples = draw(sigma)
    corr = torch.corrcoef(samples.T)  # (G, G)
    expected = 1.0 - sigma**2
    off_diagonal = corr[~torch.eye(G, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, expected), atol=0.02), (
        f"sigma={sigma}: correlations {off_diagonal.min():.4f}..{off_diagonal.max():.4f}, expected {expected:.4f}")


@pytest.mark.parametrize("bad", (0.0, -0.1, 1.0001, 1.5, float("nan")))
def test_sigma_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError):
        neighbor_noises((1, 4, 4), 4, bad, 0, 0, 0)
    with pytest.raises(ValueError):
        perturb_noise(torch.zeros(3), torch.zeros(2, 3), bad)


def test_sigma_one_gives_the_independent_noises():
    together = neighbor_noises((1, 4, 4), 5, 1.0, 3, 2, 1)
    independent = independent_noises((1, 4, 4), 5, 3, 2, 1)
    assert torch.equal(together, independent)


def test_keyed_draws_are_reproducible():
    a = neighbor_noises((1, 4, 4), 6, 0.3, 5, 7, 2)
    b = neighbor_noises((1, 4, 4), 6, 0.3, 5, 7, 2)
    assert torch.equal(a, b)
    assert torch.equal(keyed_normal((10,), 1, 2, 3, 4), keyed_normal((10,), 1, 2, 3, 4))
    g1, g2 = keyed_generator(9, 8, 7, 6), keyed_generator(9, 8, 7, 6)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_keyed_draws_do_not_depend_on_global_rng_or_draw_order():
    torch.manual_seed(0)
    first = neighbor_noises((1, 4, 4), 4, 0.3, 0, 1, 3)
    torch.manual_seed(123)
    torch.randn(1000)
    # draw other prompts in between, in a different order
    for k in (4, 0, 2):
        neighbor_noises((1, 4, 4), 4, 0.3, 0, 1, k)
    again = neighbor_noises((1, 4, 4), 4, 0.3, 0, 1, 3)
    assert torch.equal(first, again)


def test_candidate_noise_does_not_depend_on_group_size():
    small = neighbor_noises((1, 4, 4), 3, 0.4, 0, 0, 0)
    large = neighbor_noises((1, 4, 4), 8, 0.4, 0, 0, 0)
    assert torch.equal(small, large[:3])


class _Zero(torch.nn.Module):
    def forward(self, x, s, cond):
        return torch.zeros_like(x)


def test_rollout_noise_for_a_prompt_is_the_same_whether_one_or_five_prompts_are_drawn():
    algorithm = NeighborGRPO(NeighborGRPOConfig(group_size=4, rollout_steps=2, rollout_solver="euler"), seed=2)
    shape = (1, 4, 4)

    def initial(indices):
        rollout = algorithm.rollout(_Zero(), torch.zeros(len(indices), dtype=torch.long), [f"p{i}" for i in indices],
                                    indices, iteration=5, latent_shape=shape)
        return {index: rollout.states[0, position] for position, index in enumerate(indices)}

    one = initial([3])
    five = initial([0, 1, 2, 3, 4])
    reversed_five = initial([4, 3, 2, 1, 0])
    assert torch.equal(one[3], five[3])
    assert torch.equal(one[3], reversed_five[3])
    for k in range(5):
        assert torch.equal(five[k], reversed_five[k])
        assert torch.equal(five[k], neighbor_noises(shape, 4, 0.3, 2, 5, k))
    assert not torch.equal(five[0], five[1])


def test_different_keys_give_different_numbers():
    reference = keyed_normal((64,), 1, 2, 3, 4)
    for keys in [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0), (2, 1, 3, 4), (1, 3, 2, 4), (4, 3, 2, 1)]:
        other = keyed_normal((64,), *keys)
        assert not torch.allclose(reference, other), keys
        # not merely different but unrelated
        assert abs(float(torch.corrcoef(torch.stack([reference, other]))[0, 1])) < 0.5, keys

    base = neighbor_noises((1, 4, 4), 4, 0.3, 0, 0, 0)
    for other in (neighbor_noises((1, 4, 4), 4, 0.3, 1, 0, 0),   # seed
                  neighbor_noises((1, 4, 4), 4, 0.3, 0, 1, 0),   # iteration
                  neighbor_noises((1, 4, 4), 4, 0.3, 0, 0, 1)):  # prompt
        assert not torch.isclose(base, other).any()
    # candidates inside a group differ (correlated, not equal)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.isclose(base[i], base[j]).any()


def test_keys_are_not_truncated_to_32_bits():
    assert not torch.equal(keyed_normal((8,), 0, 0, 0, 0), keyed_normal((8,), 2**32, 0, 0, 0))
