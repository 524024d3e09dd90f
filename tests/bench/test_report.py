"""compare_report on synthetic curves: the split of time to target into progress per iteration and cost per
iteration, wall-clock from the throughput measurement, the EMA row, and old results (lr_selection) still render."""

import math

import pytest

from neighbor_grpo.bench.report import markdown_report, summarize


def _run(fe_per_iter: float, gold_per_iter: list[float], ema: bool = False) -> dict:
    """A run whose gold after iteration k is gold_per_iter[k] (k = 0: the base), evaluated every iteration."""
    curve = [{"fe": k * fe_per_iter, "iteration": k, "gold": g, "proxy": g, "gold_class": g, "typical": 1.0,
              "out_of_range": 0.0, "diversity": 1.0, "realism": 0.1, "distance": 0.01 * k}
             for k, g in enumerate(gold_per_iter)]
    if ema:
        for record in curve[-3:]:
            record["ema"] = {"gold": record["gold"] - 0.05, "proxy": record["proxy"]}
    return {"curve": curve, "iterations": len(gold_per_iter) - 1, "fe_per_iter": fe_per_iter,
            "median_s_per_iter": 99.0}


def _results(with_throughput: bool = True) -> dict:
    # ours: 1000 FE/iter, gains 0.1 per iteration; theirs: 3000 FE/iter, gains 0.05 per iteration (seed 1: 0.04)
    ours = {"0": _run(1000, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6]),
            "1": _run(1000, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6])}
    theirs = {"0": _run(3000, [0.0] + [0.05 * k for k in range(1, 17)], ema=True),
              "1": _run(3000, [0.0] + [0.04 * k for k in range(1, 17)], ema=True)}
    results = {"settings": {"seeds": [0, 1], "budget_fe": 48000, "lrs": [1e-4], "grid": False, "evals_per_run": 8,
                            "eval_samples_per_prompt": 2, "cost_note": "b = 2"},
               "rules": {"reference_method": "ours"}, "runs": {"ours": ours, "theirs": theirs},
               "selection": {m: {"chosen_lr": 1e-4, "chosen_knob": "k"} for m in ("ours", "theirs")}}
    if with_throughput:
        results["throughput"] = {"s_per_iter": {"ours": 0.5, "theirs": 2.0}, "workers": 2, "iters_per_worker": 6,
                                 "warmup": 1}
    return results


def test_time_to_target_splits_into_progress_and_cost_per_iteration():
    results = _results()
    results.update(summarize(results, frozen_target=0.4))
    c = results["comparisons"]["theirs"]
    # iterations to 0.4: ours 4, theirs 8 and 10; FE: 4000 against 24000 and 30000
    its = [8 / 4, 10 / 4]
    assert c["time_ratio_iterations"]["estimate"] == pytest.approx(math.sqrt(its[0] * its[1]))
    assert c["fe_per_iter_ratio"] == pytest.approx(3.0)
    assert c["s_per_iter_ratio"] == pytest.approx(4.0)
    assert c["time_ratio_fe"]["estimate"] == pytest.approx(c["time_ratio_iterations"]["estimate"] * 3.0)
    assert c["time_ratio_wall"]["estimate"] == pytest.approx(c["time_ratio_iterations"]["estimate"] * 4.0)
    assert c["time_ratio_wall"]["low"] is not None  # both reached on both seeds: an interval
    ours = results["methods"]["ours"]
    assert ours["median_s_per_iter"] == 0.5 and ours["time_to_target"][0]["wall_s"] == pytest.approx(4 * 0.5)
    table = markdown_report(results)
    assert "| theirs | " in table and "= iterations to target | x FE/iter" in table and "4.00x |" in table


def test_the_ema_row_sits_beside_the_live_weights():
    results = _results()
    results.update(summarize(results, frozen_target=0.4))
    ema = results["methods"]["theirs"]["final_ema"]
    live = results["methods"]["theirs"]["final"]["gold"]
    assert ema["gold"]["per_seed"] == pytest.approx([v - 0.05 for v in live["per_seed"]])
    assert results["methods"]["ours"]["final_ema"] is None
    table = markdown_report(results)
    assert "| theirs (EMA) | " in table and "| ours (EMA)" not in table


def test_without_a_throughput_measurement_the_runs_own_seconds_stand_in():
    results = _results(with_throughput=False)
    results.update(summarize(results, frozen_target=0.4))
    assert results["methods"]["ours"]["median_s_per_iter"] == 99.0
    assert results["methods"]["ours"]["s_per_iter_source"] == "runs"
    assert results["comparisons"]["theirs"]["s_per_iter_ratio"] is None
    old = _results(with_throughput=False)  # a results JSON written before the knob grid
    old["lr_selection"] = {m: {"chosen": 3e-4} for m in ("ours", "theirs")}
    del old["selection"]
    old.update(summarize(old, frozen_target=0.4))
    assert old["methods"]["theirs"]["lr"] == 3e-4 and "lr by proxy AUC" in markdown_report(old)


def test_a_re_reading_pairs_against_another_row_and_says_so(tmp_path):
    import json

    from neighbor_grpo.bench.report import render

    source = tmp_path / "results.json"
    source.write_text(json.dumps({**_results(), "command": "ngrpo compare ..."}))
    again = render(source, tmp_path / "again.json", reference="theirs")
    assert again["rules"]["reference_method"] == "theirs" and again["rules"]["recorded_reference_method"] == "ours"
    ours = again["comparisons"]["ours"]
    assert ours["fe_per_iter_ratio"] == pytest.approx(1 / 3)  # now "ours" is the X paired against "theirs"
    assert "paired against theirs" in (tmp_path / "again.md").read_text()
    with pytest.raises(ValueError, match="--reference: 'nobody' is not a row"):
        render(source, tmp_path / "bad.json", reference="nobody")


def test_a_re_reading_never_replaces_a_file_without_overwrite(tmp_path):
    import json

    from neighbor_grpo.bench.report import render
    from neighbor_grpo.runs.ownership import OwnershipError

    source = tmp_path / "results.json"
    source.write_text(json.dumps(_results()))
    mine = tmp_path / "mine.md"
    mine.write_text("a user's notes")
    with pytest.raises(OwnershipError, match="pass --overwrite"):
        render(source, tmp_path / "mine.json")
    assert mine.read_text() == "a user's notes"
    with pytest.raises(ValueError, match="expected a results JSON of ngrpo compare"):
        render(mine, tmp_path / "new.json")
    render(source, tmp_path / "mine.json", overwrite=True)
    assert mine.read_text() != "a user's notes"


def _report_cli(*argv):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "neighbor_grpo.bench.report", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})


def test_a_results_file_of_another_shape_is_one_line(tmp_path):
    # issue 22 item 5: a JSON list was a traceback
    source = tmp_path / "list.json"
    source.write_text("[1, 2]")
    done = _report_cli(source, "--out", tmp_path / "r.json")
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.strip().count("\n") <= 1
    assert "expected a results JSON of ngrpo compare (a JSON object), got a list" in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_frozen_target_takes_a_results_file_with_a_finite_target_as_compare_does(tmp_path):
    import json

    from neighbor_grpo.bench.report import render

    source = tmp_path / "results.json"
    source.write_text(json.dumps(_results()))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"target": {"gold": 0.45}}))
    assert render(source, tmp_path / "a.json", frozen_target=earlier)["target"]["gold"] == 0.45
    for bad in ("nan", "inf"):  # a NaN target in a results file is refused, not printed as the target
        earlier.write_text(json.dumps({"target": {"gold": bad}}))
        with pytest.raises(ValueError, match=f"its target.gold is {bad}; expected a finite gold target"):
            render(source, tmp_path / f"{bad}.json", frozen_target=earlier)
    done = _report_cli(source, "--out", tmp_path / "b.json", "--frozen-target", "nan")  # a number is not a file
    assert done.returncode == 2 and "--frozen-target 'nan': expected a results JSON of ngrpo compare" in done.stderr
    assert not (tmp_path / "b.json").exists()
