"""The gold's stability tooling (issue #23 item 7): halves of split B, the gold rebuilt on one, the soft-density
second gold, and the Spearman figures, on real digits degraded by known amounts (a ranking every gold should get)."""

import numpy as np
import pytest
import torch

from neighbor_grpo.builtin.data import gold_split_b, load_digits_images, train_test_split
from neighbor_grpo.rewards.gold_stability import SoftDensityGold, half_splits, rebuilt_on, stability


def test_half_splits_halve_every_class_and_never_overlap():
    labels = np.array([0] * 7 + [1] * 4 + [2] * 5)
    for first, rest in half_splits(labels, 3, seed=1):
        assert not set(first) & set(rest) and len(first) + len(rest) == len(labels)
        assert [int((labels[first] == c).sum()) for c in range(3)] == [3, 2, 2]
    a, b = half_splits(labels, 2, seed=1)
    assert not np.array_equal(a[0], b[0])  # each split is a new draw


def _degraded_models(count: int = 4, per_digit: int = 6) -> dict:
    """Split A's real digits (never in B) with Gaussian pixel noise of growing strength: a known quality order."""
    images, labels = load_digits_images(16)
    a = train_test_split(len(labels))[0]
    picked = np.concatenate([a[labels[a].numpy() == d][:per_digit] for d in range(10)])
    clean, prompts = images[picked], [str(int(labels[i])) for i in picked]
    generator = torch.Generator().manual_seed(0)
    return {f"noise {s:.2f}": ((clean + s * torch.randn(clean.shape, generator=generator)).clamp(0, 1), prompts)
            for s in np.linspace(0.0, 0.45, count)}


@pytest.fixture(scope="module")
def figures():
    return stability(_degraded_models(), halves=1, seed=0)


def test_every_gold_ranks_known_degradations_in_order(figures):
    assert figures["models"] == sorted(figures["models"])
    for key in ("full", "second_gold"):
        scores = figures[key]
        assert scores[0] > scores[-1] + 0.2, (key, scores)
    assert figures["spearman_full_vs_second_gold"] >= 0.8
    assert figures["spearman_half_vs_half"]["min"] >= 0.8 and len(figures["spearman_full_vs_half"]["each"]) == 2


def test_a_gold_rebuilt_on_half_of_b_measures_typicality_against_that_half():
    from neighbor_grpo.rewards.gold import GoldSettings, _b_features

    reference = _b_features(GoldSettings())
    first, _ = half_splits(reference[1], 1)[0]
    half = rebuilt_on(first, reference=reference)
    assert sum(len(members) for members in half._b_by_class) == len(first)
    assert len(first) == pytest.approx(len(gold_split_b(1797)) / 2, abs=10)
    soft = SoftDensityGold(reference=reference)
    images, all_labels = load_digits_images(16)
    a = train_test_split(len(all_labels))[0][:40]
    real = soft.components(images[a], [str(int(all_labels[i])) for i in a])
    noise = soft.components(torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                            [str(int(all_labels[i])) for i in a])
    assert real["density"].mean() > 0.3 > noise["density"].mean()  # soft: real digits dense, noise far from all


def test_close_ranked_figures_use_only_the_models_above_the_threshold():
    from neighbor_grpo.rewards.gold_stability import close_ranked

    # the low models agree everywhere; among the top three the second gold reverses the order
    result = {"full": [0.1, 0.2, 0.8, 0.85, 0.9], "second_gold": [0.1, 0.2, 0.9, 0.85, 0.8],
              "half_scores": [([0.1, 0.2, 0.8, 0.85, 0.9], [0.1, 0.2, 0.8, 0.85, 0.9])]}
    close = close_ranked(result, 0.78)
    assert close["models"] == 3 and close["spearman_full_vs_second_gold"] == pytest.approx(-1.0)
    assert close["spearman_full_vs_half"] == [pytest.approx(1.0)] * 2
    with pytest.raises(ValueError, match="expected >= 3"):
        close_ranked(result, 0.88)
