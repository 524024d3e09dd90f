"""The comparison's rules on synthetic curves: crossings, censoring, paired intervals, the frozen target."""

import math

import pytest

from neighbor_grpo.bench import rules as rules


def test_crossing_is_interpolated_between_the_bracketing_evaluations():
    xs, ys = [0.0, 10.0, 20.0, 30.0], [0.2, 0.4, 0.8, 0.9]
    # 0.6 lies halfway between 0.4 (x=10) and 0.8 (x=20)
    assert rules.crossing_point(xs, ys, 0.6) == pytest.approx(15.0)
    assert rules.crossing_point(xs, ys, 0.8) == pytest.approx(20.0)
    assert rules.crossing_point(xs, ys, 0.1) == 0.0  # the base already meets it


def test_crossing_is_the_first_one_even_if_the_curve_falls_back():
    xs, ys = [0, 1, 2, 3, 4], [0.0, 1.0, 0.0, 0.0, 1.0]
    assert rules.crossing_point(xs, ys, 0.5) == pytest.approx(0.5)


def test_a_curve_that_never_reaches_the_target_is_censored():
    assert rules.crossing_point([0, 1, 2], [0.1, 0.2, 0.3], 0.31) is None


def test_value_at_a_distance_uses_the_first_time_the_distance_is_reached():
    distance, gold = [0.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.3, 0.9]
    assert rules.value_at(distance, gold, 2.0) == pytest.approx(0.5)  # halfway between (1, 0.7) and (3, 0.3)
    assert rules.value_at(distance, gold, 4.0) is None


def test_final_value_is_the_mean_of_the_last_three():
    assert rules.final_value([0.0, 0.1, 0.5, 0.6, 0.7]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="needs >= 3"):
        rules.final_value([0.1, 0.2])


def test_target_is_base_plus_80_percent_of_the_best_mean_gain():
    finals = {"a": [0.6, 0.8], "b": [0.5, 0.5], "c": [0.2, 0.2]}
    # best mean final is a's 0.7; gain over 0.2 is 0.5; 0.2 + 0.8 * 0.5 = 0.6
    assert rules.frozen_target(0.2, finals) == pytest.approx(0.6)
    # a later table with a new, better method recomputes a higher target; the frozen one is what it reports against
    assert rules.frozen_target(0.2, {**finals, "new": [0.95, 0.95]}) > rules.frozen_target(0.2, finals)


def test_evaluation_points_are_denser_early_and_end_at_the_budget():
    points = rules.evaluation_points(1000.0, 24)
    assert len(points) == 24 and points[-1] == pytest.approx(1000.0)
    gaps = [b - a for a, b in zip([0.0, *points], points)]
    assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))
    with pytest.raises(ValueError, match="budget"):
        rules.evaluation_points(0.0, 24)
    with pytest.raises(ValueError, match="evaluations per run"):
        rules.evaluation_points(100.0, 2)


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert rules.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_is_symmetric_and_tends_to_the_normal():
    assert rules.t_quantile(0.025, 4) == pytest.approx(-rules.t_quantile(0.975, 4))
    assert rules.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert rules.t_quantile(0.975, 2000) == pytest.approx(1.9612, abs=1e-4)  # tables: 1.9612; normal 1.9600


def test_paired_ratio_interval_on_log_ratios():
    ours, theirs = [10.0, 20.0, 10.0, 40.0, 20.0], [20.0, 80.0, 20.0, 80.0, 40.0]
    logs = [math.log(2), math.log(4), math.log(2), math.log(2), math.log(2)]
    mean = sum(logs) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 4)
    half = 2.7764451 * sd / math.sqrt(5)
    ratio = rules.paired_ratio(ours, theirs, 100.0, 100.0)
    assert ratio["kind"] == "="
    assert ratio["estimate"] == pytest.approx(math.exp(mean))
    assert ratio["low"] == pytest.approx(math.exp(mean - half), rel=1e-6)
    assert ratio["high"] == pytest.approx(math.exp(mean + half), rel=1e-6)
    # pairing matters: the geometric mean is the same with one side shuffled, but the interval is not
    shuffled = rules.paired_ratio(ours, theirs[::-1], 100.0, 100.0)
    assert shuffled["estimate"] == pytest.approx(ratio["estimate"])
    assert shuffled["high"] / shuffled["low"] > 1.5 * ratio["high"] / ratio["low"]


def test_a_censored_seed_gives_a_bound_without_an_interval():
    ratio = rules.paired_ratio([10.0, 10.0], [20.0, None], 100.0, [100.0, 50.0])
    # theirs censored at its own budget 50: the ratio is > geometric mean of 2 and 5
    assert ratio == {"kind": ">", "estimate": pytest.approx(math.sqrt(10)), "low": None, "high": None}
    assert rules.format_ratio(ratio) == "> 3.16x"
    assert rules.paired_ratio([None, 10.0], [20.0, 20.0], 100.0, 100.0)["kind"] == "<"
    assert rules.paired_ratio([None, 10.0], [20.0, None], 100.0, 100.0)["kind"] == "unknown"


def test_no_worse_uses_the_lower_bound_of_the_paired_difference():
    theirs = [0.50, 0.60, 0.55, 0.70, 0.65]
    assert rules.no_worse([t + 0.05 for t in theirs], theirs)["no_worse"]
    assert not rules.no_worse([t - 0.05 for t in theirs], theirs)["no_worse"]
    # equal on average but noisy: the interval reaches below -0.02, so not shown to be no worse
    noisy = rules.no_worse([t + d for t, d in zip(theirs, (0.1, -0.1, 0.1, -0.1, 0.0))], theirs)
    assert noisy["mean"] == pytest.approx(0.0, abs=1e-12) and not noisy["no_worse"]


def test_area_under_curve_is_the_mean_height():
    """The lr selection's measure (bench.grid.select; compare_grid's tests check the choice itself)."""
    xs = [0.0, 1.0, 2.0, 3.0]
    assert rules.area_under_curve(xs, [0.5, 0.9, 1.0, 1.0]) == pytest.approx((0.7 + 0.95 + 1.0) / 3)
    assert rules.area_under_curve([0.0, 2.0, 3.0], [1.0, 1.0, 0.0]) == pytest.approx((2.0 + 0.5) / 3)
    with pytest.raises(ValueError, match=">= 2 points"):
        rules.area_under_curve([1.0], [0.5])
