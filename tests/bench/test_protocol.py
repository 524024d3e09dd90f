"""`ngrpo compare` under the issue #23 protocol on the tiny built-in model (real runs): tuning seeds never
reported, the gold-free rule with a bands file, the lr grid widened until interior, the neutral evaluation sampler
with the 8-step DPM-Solver++ gold beside it, optimizer steps counted, and what the results JSON records."""

import json

import pytest

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.cli import main

BUDGET = 4000.0
BANDS = {"diversity": [0.0, None], "out_of_range": [None, 0.5], "distance": [None, 100.0], "realism": [None, 1.0]}


@pytest.fixture(scope="module")
def protocol_run(builtin_models, tmp_path_factory, single_thread):
    from neighbor_grpo.bench.compare import compare

    folder = tmp_path_factory.mktemp("protocol")
    bands = folder / "bands.json"
    bands.write_text(json.dumps({"bands": BANDS}))
    out = folder / "r.json"
    compare(out, budget_fe=BUDGET, lrs=(1e-4, 3e-4), methods=["neighbor_grpo"], seeds=(0,), evals_per_run=3,
            eval_samples=2, progress=False, throughput_iters=0, tuning_seeds=(100,), bands=bands, max_lr_points=3,
            eval_sampler="euler40")
    return out, json.loads(out.read_text())


def test_tuning_seeds_are_never_reported(protocol_run):
    _, saved = protocol_run
    assert set(saved["runs"]["neighbor_grpo"]) == {"0"} and saved["runs"]["neighbor_grpo"]["0"]["seed"] == 0
    tuning = saved["tuning_runs"]["neighbor_grpo"]
    assert tuning and {run["seed"] for run in tuning} == {100}
    assert saved["settings"]["tuning_seeds"] == [100] and not saved["settings"]["tuning_seeds_reported"]


def test_the_gold_free_rule_picks_and_the_json_records_it(protocol_run):
    _, saved = protocol_run
    selection = saved["selection"]["neighbor_grpo"]
    assert selection["rule"].startswith("gold-free") and selection["tuning_seeds"] == [100]
    assert saved["rules"]["bands"]["bands"] == BANDS
    assert saved["rules"]["bands"]["commit"] is None  # a file outside git: not fixed by a commit, and it says so
    assert saved["rules"]["bands"]["changed_since_commit"]
    assert "gold-free" in saved["rules"]["selection"] and saved["commit"]
    # the recorded choice is the rule's on the recorded tuning runs
    by_setting = {}
    for run in saved["tuning_runs"]["neighbor_grpo"]:
        by_setting[(run["lr"], run["knob"])] = run
    chosen = (selection["chosen_lr"], selection["chosen_knob"])
    knobs = [k["label"] for k in saved["settings"]["knobs"]["neighbor_grpo"]]
    assert chosen in by_setting  # the chosen setting's run on the tuning seed stays a tuning run, never reported
    candidates = [{"lr": c["lr"], "knob_index": knobs.index(c["knob"]), "knob": c["knob"]}
                  for c in selection["candidates"]]
    assert all(c["band_exit_fe"] == [None] for c in selection["candidates"])  # the bands here never bind
    assert max(selection["candidates"], key=lambda c: (c["score"], -c["lr"]))["lr"] == selection["chosen_lr"]
    assert len(candidates) == len({(c["lr"], c["knob"]) for c in candidates})


def test_the_lr_grid_widens_until_interior_or_its_limit(protocol_run):
    _, saved = protocol_run
    selection = saved["selection"]["neighbor_grpo"]
    tried = selection["lrs_tried"]
    assert 2 <= len(tried) <= 3 and {1e-4, 3e-4} <= set(tried)
    if len(tried) == 3:  # the grid's choice sat at an end: one x3 step at the chosen knob
        assert selection["widened"][0]["lr"] in tried
    assert selection["at_grid_end"] == rules.at_grid_end(tried, selection["chosen_lr"])


def test_the_neutral_sampler_is_the_headline_with_dpm8_beside_it_and_steps_are_counted(protocol_run):
    out, saved = protocol_run
    assert saved["settings"]["eval_sampler"]["solver_steps"] == ["euler", 40]
    run = saved["runs"]["neighbor_grpo"]["0"]
    for record in run["curve"]:
        assert 0.0 <= record["side_gold"] <= 1.0 and record["realism"] is not None
    steps = [record["optimizer_steps"] for record in run["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and run["optimizer_steps"] == steps[-1] > 0
    # Neighbor GRPO takes more than one optimizer step per iteration (num_minibatches)
    assert run["optimizer_steps"] > run["iterations"]
    assert any(r["side_gold"] != r["gold"] for r in run["curve"])  # another sampler, other samples
    text = out.with_suffix(".md").read_text()
    assert "sustained" in text and "optimizer steps to target" in text and "final gold (dpm8)" in text
    reached = saved["methods"]["neighbor_grpo"]["time_to_target"][0]
    assert reached["crossing"] == "sustained" and "first_fe" in reached and "budget_optimizer_steps" in reached


@pytest.mark.parametrize("argv, words", [
    (["--tuning-seeds", "0", "--seeds", "0", "1"], "--tuning-seeds: expected seeds never reported, but [0]"),
    (["--max-lr-points", "7"], "--max-lr-points: expected 2 (the --lrs given) to 6, got 7"),
    (["--bands", "no/such/bands.json"], "--bands 'no/such/bands.json': expected a bands file"),
])
def test_bad_protocol_flags_get_one_line_errors(tmp_path, capsys, argv, words):
    code = main(["compare", "--out", str(tmp_path / "r.json"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
