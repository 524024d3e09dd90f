"""The issue #23 rules on synthetic curves (and the recorded hack runs): the gold-free selection, its monitor bands,
the sustained crossing and the lr grid's widening."""

import json
import random
from pathlib import Path

import pytest

from neighbor_grpo.bench import rules as rules

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RECORDED_BANDS = RESULTS / "bands" / "digits-unet_recorded.json"
IN_BAND = {"diversity": 0.25, "out_of_range": 0.0, "distance": 0.1, "realism": 0.12}
BANDS = {"diversity": [0.2, None], "out_of_range": [None, 0.01], "distance": [None, 1.0], "realism": [None, 0.15]}


def _run(proxy, monitors=None) -> dict:
    monitors = monitors or [{}] * len(proxy)
    return {"curve": [{"fe": 1000.0 * k, "proxy": p, **IN_BAND, **m} for k, (p, m) in enumerate(zip(proxy, monitors))]}


def _candidate(lr, proxy, monitors=None, knob_index=0) -> dict:
    return {"lr": lr, "knob_index": knob_index, "runs": [_run(proxy, monitors)]}


def test_a_transient_spike_never_counts():
    flat = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    spiky = [0.5, 0.6, 1.0, 0.6, 0.6, 1.0]  # one evaluation alone reaches 1.0, twice, the last one included
    assert rules.despiked(spiky) == flat
    # in the selection: the spikes add nothing, so the tie goes to the smaller lr
    picked = rules.select_gold_free([_candidate(3e-4, spiky), _candidate(1e-4, flat)], BANDS)
    assert picked["best"]["lr"] == 1e-4
    assert picked["scored"][0]["score"] == pytest.approx(picked["scored"][1]["score"])
    # in time to target: a spike above the target is no crossing; two evaluations in a row that then fall back
    # are none either; the crossing it stays above from is
    xs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert rules.crossing_point(xs, spiky, 0.9) == pytest.approx(1.75)  # the first crossing falls for the spike
    assert rules.sustained_crossing(xs, [0.5, 0.6, 1.0, 0.6, 0.6, 0.8], 0.9) is None
    assert rules.sustained_crossing(xs, [0.5, 0.95, 0.95, 0.6, 0.85, 1.0], 0.9) == pytest.approx(4 + 1 / 3)


def test_a_sustained_plateau_does_count():
    # two evaluations in a row at the new level are progress, not a spike
    assert rules.despiked([0.5, 0.9, 0.9, 0.9]) == [0.5, 0.9, 0.9, 0.9]
    assert rules.sustained_crossing([0, 1, 2, 3], [0.2, 0.4, 0.8, 0.9], 0.6) == pytest.approx(1.5)
    assert rules.sustained_crossing([0, 1, 2], [0.7, 0.8, 0.9], 0.6) == 0.0


def test_a_run_that_stops_moving_is_never_preferred_to_a_real_improvement():
    generator = random.Random(0)
    for _ in range(200):
        steps = generator.randint(4, 20)
        gains = [generator.uniform(0.0, 0.05) for _ in range(steps)]
        improving = [0.5]
        for gain in gains:
            improving.append(min(1.0, improving[-1] + gain))
        stop = generator.randint(1, steps - 1)
        stalled = improving[:stop] + [improving[stop - 1]] * (steps + 1 - stop)  # stops moving at `stop`
        if improving[-1] <= stalled[-1] + 1e-3:
            continue  # no real improvement after the stall in this draw
        # the stalled run has the smaller lr (the tie-breaker's favourite) and still loses
        picked = rules.select_gold_free([_candidate(1e-4, stalled), _candidate(3e-4, improving)], BANDS)
        assert picked["best"]["lr"] == 3e-4


def test_the_proxy_counts_as_zero_from_where_a_monitor_leaves_its_band_for_good():
    hacked = [0.5, 0.8, 0.95, 1.0, 1.0, 1.0]
    out = {"out_of_range": 0.05}
    monitors = [{}, {}, out, out, {}, out]  # out from evaluation 2 on, one evaluation dipping back in
    steady = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
    assert rules.band_exit(_run(hacked, monitors)["curve"], BANDS) == 2
    xs = [1000.0 * k for k in range(6)]
    assert rules.monitored_proxy_area(xs, hacked, 2) == pytest.approx(
        rules.area_under_curve(xs, [0.5, 0.8, 0, 0, 0, 0]))
    picked = rules.select_gold_free([_candidate(1e-3, hacked, monitors), _candidate(1e-4, steady)], BANDS)
    assert picked["best"]["lr"] == 1e-4 and picked["scored"][0]["band_exit_fe"] == [2000.0]
    # without the exit the hacked run would have won
    assert rules.area_under_curve(xs, hacked) > rules.area_under_curve(xs, steady)
    # every monitor's band, each on its harmful side only
    for name, bad, harmless in (("diversity", 0.1, 0.4), ("out_of_range", 0.02, 0.0), ("distance", 2.0, 0.0),
                                ("realism", 0.2, 0.05)):
        assert rules.band_exit(_run([0.5, 0.6], [{}, {name: bad}])["curve"], BANDS) == 1, name
        assert rules.band_exit(_run([0.5, 0.6], [{}, {name: harmless}])["curve"], BANDS) is None, name


def test_a_monitor_that_steps_out_once_and_comes_back_is_no_exit():
    # the few-step grids' failure (docs/benchmarks.md): the best candidate's out-of-range share crossed its band at
    # one late evaluation of one tuning seed and came back; counting that as an exit dropped it behind a slow run
    out = {"out_of_range": 0.05}
    good = [0.5, 0.8, 0.9, 0.92, 0.93, 0.93, 0.93]
    blip = [{}, {}, {}, out, {}, {}, {}]
    assert rules.first_band_exit(_run(good, blip)["curve"], BANDS) == 3
    assert rules.band_exit(_run(good, blip)["curve"], BANDS) is None
    slow = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
    picked = rules.select_gold_free([_candidate(1e-4, slow), _candidate(3e-4, good, blip)], BANDS)
    assert picked["best"]["lr"] == 3e-4
    assert picked["best"]["first_band_exit_fe"] == [3000.0] and picked["best"]["band_exit_fe"] == [None]
    # a run out at most evaluations from some point to the end has left, from that point
    flicker = [{}, {}, out, {}, out, out, {}]
    assert rules.band_exit(_run(good, flicker)["curve"], BANDS) == 2
    # out at the last evaluation only: an exit there (nothing after it says it came back)
    assert rules.band_exit(_run(good, [{}] * 6 + [out])["curve"], BANDS) == 6


def test_the_selection_averages_the_tuning_seeds():
    good = {"lr": 1e-4, "knob_index": 0, "runs": [_run([0.5, 0.7, 0.8]), _run([0.5, 0.7, 0.8])]}
    lucky = {"lr": 3e-4, "knob_index": 0, "runs": [_run([0.5, 0.9, 0.9]), _run([0.5, 0.5, 0.5])]}
    picked = rules.select_gold_free([lucky, good], BANDS)
    assert picked["best"] is not lucky and picked["best"]["lr"] == 1e-4


def test_bands_come_from_the_base_models_worst_prompt_on_the_harmful_side():
    spread = {"diversity": [0.2, 0.3, 0.25], "out_of_range": [0.0, 0.01, 0.002], "distance": [0.1, 0.3, 0.2],
              "realism": [0.10, 0.13, 0.12]}
    assert rules.bands_from_base_spread(spread) == {"diversity": [0.2, None], "out_of_range": [None, 0.01],
                                                    "distance": [None, 0.3], "realism": [None, 0.13]}
    with pytest.raises(ValueError, match="unknown monitor 'gold'"):
        rules.bands_from_base_spread({"gold": [0.5]})


def test_the_lr_grid_widens_in_x3_steps_until_interior_and_at_most_six_points():
    assert rules.widen_lrs([1e-4, 3e-4], 3e-4) == pytest.approx(9e-4)
    assert rules.widen_lrs([1e-4, 3e-4], 1e-4) == pytest.approx(3.33e-5)
    assert rules.widen_lrs([1e-4, 3e-4, 9e-4], 3e-4) is None  # interior
    six = [1e-5, 3e-5, 1e-4, 3e-4, 9e-4, 2.7e-3]
    assert rules.widen_lrs(six, 2.7e-3) is None and rules.at_grid_end(six, 2.7e-3) == "top"
    assert rules.at_grid_end(six, 1e-5) == "bottom" and rules.at_grid_end(six, 1e-4) is None
    assert rules.at_grid_end([1e-4], 1e-4) == "single"


def _recorded(path: str, row: str, lr: float, knob: str | None = None) -> list[dict]:
    saved = json.loads((RESULTS / path).read_text())
    runs = [saved["runs"][row]["0"], *saved["tuning_runs"][row]]
    return [r for r in runs if r["lr"] == pytest.approx(lr) and (knob is None or r["knob"].startswith(knob))]


@pytest.mark.parametrize("path, row, lr, knob", [
    ("unet_compare/compare.json", "mix_grpo", 9e-4, None),  # gold 0.45 -> 0.11, the proxy at 0.99
    ("unet_compare/compare.json", "mix_grpo_flash", 9e-4, None),  # gold -> 0.002
    ("unet_compare/compare.json", "neighbor_grpo", 9e-4, None),  # the paper's settings: gold -> 0.05
    ("unet_compare/compare_newer.json", "dgpo", 9e-4, None),  # gold 0.89 -> 0.03
])
def test_the_recorded_hack_runs_are_rejected_by_the_monitors(path, row, lr, knob):
    bands = json.loads(RECORDED_BANDS.read_text())["bands"]
    for run in _recorded(path, row, lr, knob):
        curve = run["curve"]
        exit_index = rules.band_exit(curve, bands)
        assert exit_index is not None, (row, run["knob"])
        # the monitors see it before the gold has fallen to its final level
        final = rules.final_value([r["gold"] for r in curve])
        assert curve[exit_index]["gold"] > final + 0.1, (row, run["knob"], exit_index)


def test_bands_from_per_sample_spread_take_the_quantile_toward_harm():
    values = {"diversity": [float(v) for v in range(101)], "realism": [float(v) for v in range(101)]}
    assert rules.bands_from_base_spread(values, 0.95) == {"diversity": [pytest.approx(5.0), None],
                                                          "realism": [None, pytest.approx(95.0)]}
    with pytest.raises(ValueError, match="quantile in"):
        rules.bands_from_base_spread(values, 0.3)
