"""Group-relative advantages: Eq. 11's quasi-norm reweighting, clipping, several rewards (spec section 1, step 3)."""

import numpy as np
import pytest
import torch

from neighbor_grpo.maths.advantages import (center_in_group, clip_advantages, combine_reward_advantages, power_mean,
                                      quasi_norm_advantages, std_advantages)


pytestmark = pytest.mark.usefixtures("single_thread")


def random_rewards(prompts=5, G=12, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    # heterogeneous groups: different scales and offsets per prompt, some heavy-tailed
    scale = torch.rand(prompts, 1, generator=generator, dtype=dtype) * 3 + 0.1
    offset = torch.randn(prompts, 1, generator=generator, dtype=dtype) * 5
    noise = torch.randn(prompts, G, generator=generator, dtype=dtype) ** 3
    return offset + scale * noise


def numpy_grpo(rewards: np.ndarray, eps: float, ddof: int) -> np.ndarray:
    out = np.empty_like(rewards)
    for k, group in enumerate(rewards):
        out[k] = (group - group.mean()) / (np.std(group, ddof=ddof) + eps)
    return out


@pytest.mark.parametrize("eps", (0.0, 1e-4, 0.3))
def test_p2_is_standard_grpo_with_population_std(eps):
    rewards = random_rewards()
    expected = numpy_grpo(rewards.numpy(), eps, ddof=0)
    got = quasi_norm_advantages(rewards, p=2.0, adv_eps=eps)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std_advantages(rewards, eps).numpy(), expected, rtol=1e-10, atol=1e-12)
    # ... and not the sample std (ddof = 1), which would be off by sqrt(G / (G - 1))
    assert not np.allclose(got.numpy(), numpy_grpo(rewards.numpy(), eps, ddof=1), rtol=1e-3)
    np.testing.assert_allclose(std_advantages(rewards, eps, unbiased=True).numpy(),
                               numpy_grpo(rewards.numpy(), eps, ddof=1), rtol=1e-10, atol=1e-12)


def test_power_mean_matches_independent_computation():
    a = center_in_group(random_rewards(seed=1))
    for p in (0.5, 0.8, 1.0, 2.0, 3.0):
        expected = np.array([(np.mean(np.abs(row) ** p)) ** (1 / p) for row in a.numpy()])[:, None]
        np.testing.assert_allclose(power_mean(a, p).numpy(), expected, rtol=1e-12)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            power_mean(a, bad)


@pytest.mark.parametrize("p", (0.5, 0.8, 1.0, 2.0))
def test_advantages_are_centered_and_shift_and_scale_invariant(p):
    rewards = random_rewards(seed=2)
    base = quasi_norm_advantages(rewards, p, adv_eps=0.0)
    np.testing.assert_allclose(base.sum(-1).numpy(), 0.0, atol=1e-10)
    for scale, shift in ((3.7, 0.0), (0.01, -4.0), (250.0, 1e3), (1.0, 17.0)):
        np.testing.assert_allclose(quasi_norm_advantages(scale * rewards + shift, p, adv_eps=0.0).numpy(),
                                   base.numpy(), rtol=1e-8, atol=1e-9)
    # negative scaling flips the sign (a reward turned into a cost)
    np.testing.assert_allclose(quasi_norm_advantages(-2.0 * rewards, p, adv_eps=0.0).numpy(), -base.numpy(),
                               rtol=1e-8, atol=1e-9)
    # the normaliser is per group: scaling one group leaves the others untouched
    rescaled = rewards.clone()
    rescaled[0] *= 100
    np.testing.assert_allclose(quasi_norm_advantages(rescaled, p, adv_eps=0.0).numpy(), base.numpy(), rtol=1e-8, atol=1e-9)


def test_power_mean_is_at_most_the_quadratic_mean_and_increasing_in_p():
    a = center_in_group(random_rewards(prompts=50, seed=3))
    m2 = power_mean(a, 2.0)
    previous = None
    for p in (0.3, 0.5, 0.8, 1.0, 1.5, 1.99):
        mp = power_mean(a, p)
        assert (mp <= m2 * (1 + 1e-12)).all()
        assert (mp < m2).any()
        if previous is not None:
            assert (previous <= mp * (1 + 1e-12)).all()
        previous = mp
    # equality when every |a_k| is the same (an evenly spread group)
    even = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    for p in (0.5, 0.8, 2.0):
        assert float(power_mean(even, p)) == pytest.approx(1.0)


def test_p_below_two_upweights_outlier_groups_relative_to_evenly_spread_ones():
    G = 12
    outlier = torch.zeros(1, G, dtype=torch.float64)
    outlier[0, 0] = 1.0
    even = torch.tensor([[1.0, 0.0] * (G // 2)], dtype=torch.float64)
    rewards = torch.cat([outlier, even])
    a2 = quasi_norm_advantages(rewards, 2.0, adv_eps=0.0)
    a08 = quasi_norm_advantages(rewards, 0.8, adv_eps=0.0)
    # p = 2: max |A| is sqrt(G - 1) for a single outlier; the even group gets +-1 whatever p
    assert float(a2[0, 0]) == pytest.approx(np.sqrt(G - 1))
    np.testing.assert_allclose(a2[1].abs().numpy(), 1.0)
    np.testing.assert_allclose(a08[1].abs().numpy(), 1.0)
    # independent value of the p = 0.8 outlier advantage
    a = np.array([11 / 12] + [-1 / 12] * 11)
    expected = a[0] / np.mean(np.abs(a) ** 0.8) ** (1 / 0.8)
    assert float(a08[0, 0]) == pytest.approx(expected)
    assert float(a08[0, 0]) > float(a2[0, 0]) * 1.5
    # sqrt(G - 1) is the largest possible |A| under std normalisation
    many = quasi_norm_advantages(random_rewards(prompts=200, G=G, seed=4), 2.0, adv_eps=0.0)
    assert float(many.abs().max()) <= np.sqrt(G - 1) + 1e-9


def test_near_flat_groups_get_order_one_advantages_unless_adv_eps_stops_them():
    rewards = torch.tensor([[0.999, 0.998] * 6, [0.5000001, 0.5] * 6], dtype=torch.float64)
    flat = quasi_norm_advantages(rewards, 0.8, adv_eps=0.0)
    np.testing.assert_allclose(flat.abs().numpy(), 1.0, rtol=1e-6)  # scale-invariant: O(1) for tiny spreads
    suppressed = quasi_norm_advantages(rewards, 0.8, adv_eps=1e-2)
    assert float(suppressed[0].abs().max()) < 0.06  # 0.0005 / (0.0005 + 0.01)
    default = quasi_norm_advantages(rewards, 0.8, adv_eps=1e-4)
    assert float(default[1].abs().max()) < 1e-3  # a 1e-7 spread is flattened by the default eps
    # a group with a real spread is barely affected by the same eps
    spread = torch.tensor([[1.0, 0.0] * 6], dtype=torch.float64)
    np.testing.assert_allclose(quasi_norm_advantages(spread, 0.8, 1e-4).abs().numpy(), 1 / (1 + 2e-4), rtol=1e-9)
    # an exactly flat group gives zeros (not NaN) as soon as adv_eps > 0
    constant = torch.full((1, 12), 0.7, dtype=torch.float64)
    flat_out = quasi_norm_advantages(constant, 0.8, 1e-4)
    assert torch.isfinite(flat_out).all() and float(flat_out.abs().max()) < 1e-9


def test_clipping_reports_share_and_recentering_restores_zero_sums():
    G = 12
    rewards = random_rewards(prompts=40, G=G, seed=5)
    advantages = quasi_norm_advantages(rewards, 0.5, adv_eps=0.0)  # heavy-tailed rewards, p = 0.5: clipping binds
    clip = 2.5
    expected_share = float((advantages.abs().numpy() > clip).mean())
    assert 0 < expected_share < 0.5
    clipped, share = clip_advantages(advantages, clip, recenter=False)
    assert share == pytest.approx(expected_share)
    assert float(clipped.abs().max()) <= clip
    np.testing.assert_array_equal(clipped.numpy(), np.clip(advantages.numpy(), -clip, clip))
    affected = (advantages.abs() > clip).any(-1)
    assert (clipped.sum(-1)[affected].abs() > 1e-6).all(), "clipping an asymmetric group breaks sum_i A_i = 0"
    recentered, share2 = clip_advantages(advantages, clip, recenter=True)
    assert share2 == share
    np.testing.assert_allclose(recentered.sum(-1).numpy(), 0.0, atol=1e-10)
    # re-centring is a per-group shift of the clipped values
    shift = recentered - clipped
    np.testing.assert_allclose((shift - shift[:, :1]).numpy(), 0.0, atol=1e-12)
    # untouched groups keep their exact values
    np.testing.assert_allclose(recentered[~affected].numpy(), advantages[~affected].numpy(), atol=1e-12)


def test_clip_zero_disables_and_default_clip_binds_for_a_single_outlier_at_p08():
    advantages = quasi_norm_advantages(random_rewards(seed=6), 0.8, 0.0)
    same, share = clip_advantages(advantages, 0.0)
    assert share == 0.0 and torch.equal(same, advantages)
    outlier = torch.zeros(1, 12, dtype=torch.float64)
    outlier[0, 3] = 1.0
    clipped, share = clip_advantages(quasi_norm_advantages(outlier, 0.8, 0.0), 5.0)
    assert share == pytest.approx(1 / 12)  # 6.7 > 5 at p = 0.8 while sqrt(11) = 3.3 under std normalisation
    assert float(clipped[0, 3]) == 5.0
    _, share2 = clip_advantages(quasi_norm_advantages(outlier, 2.0, 0.0), 5.0)
    assert share2 == 0.0


def test_combine_reward_advantages_each_versus_sum():
    def fn(r):
        return quasi_norm_advantages(r, 0.8, adv_eps=0.0)

    g = torch.Generator().manual_seed(7)
    small = torch.randn(4, 8, generator=g, dtype=torch.float64) * 0.01
    large = torch.randn(4, 8, generator=g, dtype=torch.float64) * 100.0
    rewards = {"small": small, "large": large}
    weights = {"small": 2.0, "large": 0.5}

    def ref(r):  # independent Eq. 11 in numpy
        a = r - r.mean(-1, keepdims=True)
        return a / (np.mean(np.abs(a) ** 0.8, -1, keepdims=True) ** (1 / 0.8))

    each = combine_reward_advantages(rewards, weights, "each", fn)
    total = combine_reward_advantages(rewards, weights, "sum", fn)
    np.testing.assert_allclose(each.numpy(), 2.0 * ref(small.numpy()) + 0.5 * ref(large.numpy()), rtol=1e-9)
    np.testing.assert_allclose(total.numpy(), ref(2.0 * small.numpy() + 0.5 * large.numpy()), rtol=1e-9)
    assert not np.allclose(each.numpy(), total.numpy(), atol=0.1)
    # 'each': each reward counts by its weight whatever its scale; 'sum': the large-scale reward dominates
    np.testing.assert_allclose(total.numpy(), ref(large.numpy()), atol=1e-2)
    rescaled = combine_reward_advantages({"small": small * 1e4, "large": large}, weights, "each", fn)
    np.testing.assert_allclose(rescaled.numpy(), each.numpy(), rtol=1e-9, atol=1e-12)
    # a missing weight counts 1; a single reward gives the same result both ways
    np.testing.assert_allclose(combine_reward_advantages({"small": small}, {}, "each", fn).numpy(), ref(small.numpy()))
    np.testing.assert_allclose(combine_reward_advantages({"small": small}, {}, "sum", fn).numpy(), ref(small.numpy()))
    with pytest.raises(ValueError):
        combine_reward_advantages(rewards, weights, "mean", fn)


def test_combine_reward_advantages_gdpo_normalises_the_weighted_sum_over_the_batch():
    """'advantages' (GDPO): per-reward group advantages, weighted and summed, then standardised over the whole batch
    (population std): zero mean, unit std, whatever the number of rewards and their weights."""
    def fn(r):
        return std_advantages(r, eps=1e-4)

    g = torch.Generator().manual_seed(3)
    rewards = {name: torch.randn(5, 6, generator=g, dtype=torch.float64) * scale
               for name, scale in (("a", 0.01), ("b", 1.0), ("c", 300.0))}
    weights = {"a": 3.0, "b": 1.0, "c": 0.2}
    gdpo = combine_reward_advantages(rewards, weights, "advantages", fn)
    summed = sum(weights[k] * ((r - r.mean(-1, keepdim=True)) / (r.std(-1, correction=0, keepdim=True) + 1e-4))
                 for k, r in rewards.items()).numpy()
    np.testing.assert_allclose(gdpo.numpy(), (summed - summed.mean()) / (summed.std() + 1e-4), rtol=1e-9)
    assert abs(float(gdpo.mean())) < 1e-12 and float(gdpo.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    doubled = combine_reward_advantages(rewards, {k: 2 * w for k, w in weights.items()}, "advantages", fn)
    np.testing.assert_allclose(doubled.numpy(), gdpo.numpy(), rtol=1e-4)  # the weights' overall scale drops out (but eps)
    each = combine_reward_advantages(rewards, weights, "each", fn)
    assert float(each.std()) > 2 * float(gdpo.std())  # 'each' grows with the rewards and weights; GDPO does not
    with pytest.raises(ValueError, match="'each', 'sum' or 'advantages'"):
        combine_reward_advantages(rewards, weights, "mean", fn)
