"""`ngrpo compare --tuning-gold final` and `--side-sampler` (issue #24's sizing of the words comparison): tuning runs
on seeds never reported score the gold (and the side sampler's gold) only at their last 3 evaluations, the final
value; everything else is as with the default, and the selection is the same; the report and the selection-regret
check read such records. A tiny words comparison on a random WordsPipeline, proxy and gold swapped for a reward
that moves on a random model's samples (rapidocr and Tesseract read nothing there)."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from neighbor_grpo.bench import rules, tasks
from neighbor_grpo.bench.compare import check_protocol, side_sampler_steps
from neighbor_grpo.builtin.words import HELDOUT_PROMPTS
from neighbor_grpo.cli import main

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")
SELECTION_REGRET = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_regret.py"
GOLD_FIELDS = ("gold", "side_gold")


def _without(record: dict, keys=(*GOLD_FIELDS, "train_s")) -> dict:
    """A held-out record without the gold fields and the training seconds so far (a timing)."""
    return {k: v for k, v in record.items() if k not in keys}


@pytest.fixture
def moving_words(monkeypatch):
    """The words task with 2 held-out words, 1 training word per iteration and JPEG compressibility as proxy and
    gold: the same code, a test-sized table whose curves move."""
    task = tasks.TASKS["words"]()
    small = dataclasses.replace(
        task, eval_prompts=HELDOUT_PROMPTS[:2], proxy={"name": "jpeg_compressibility"},
        gold={"name": "jpeg_compressibility"}, check_rewards=lambda progress: None,
        settings=tuple(s if not s.startswith("prompts_per_iteration=") else "prompts_per_iteration=1"
                       for s in task.settings))
    monkeypatch.setitem(tasks.TASKS, "words", lambda: small)
    return small


def _five_iterations(task) -> float:
    from neighbor_grpo.bench.settings import PAPER_SETTINGS
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    config = load_config(None, ["device=cpu", *task.settings, *PAPER_SETTINGS["neighbor_grpo"]])
    return 5 * schedule_forward_equivalents(config_schedule(config), config.optim.finetune)


def _compare(out, folder, task, tuning_gold):
    from neighbor_grpo.bench.compare import compare

    # 5 iterations, 4 evaluation points -> 5 records (the base's and 4): the first 2 are before the final value
    return compare(out, budget_fe=_five_iterations(task), lrs=(1e-3, 3e-3), methods=["neighbor_grpo"], seeds=(0,),
                   tuning_seeds=(100,), evals_per_run=4, eval_samples=2, base_path=str(folder), progress=False,
                   x3=False, throughput_iters=0, eval_sampler="euler:4", tuning_gold=tuning_gold)


def test_tuning_runs_score_the_gold_only_at_the_final_value_and_select_the_same(words_folder, moving_words,
                                                                                 tmp_path):
    _compare(tmp_path / "all.json", words_folder, moving_words, "all")
    _compare(tmp_path / "final.json", words_folder, moving_words, "final")
    every, final = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("all", "final"))
    assert every["settings"]["tuning_gold"]["scored_at"] == "all"
    assert final["settings"]["tuning_gold"]["scored_at"] == "final"
    assert final["settings"]["side_sampler"] == {"name": "dpm8", "solver_steps": ["dpm++2m", 8]}
    # the same selection: the grid (2 lrs x 2 tau_rel), every candidate's score, the choice
    assert len(final["selection"]["neighbor_grpo"]["candidates"]) == 4
    assert final["selection"] == every["selection"]
    scores = [c["score"] for c in final["selection"]["neighbor_grpo"]["candidates"]]
    assert len(set(scores)) > 1  # the curves moved: a selection that could have gone another way
    tuning_all = {(r["lr"], r["knob"]): r for r in every["tuning_runs"]["neighbor_grpo"]}
    assert len(final["tuning_runs"]["neighbor_grpo"]) == 4  # seed 100 is never reported, the choice's neither
    for run in final["tuning_runs"]["neighbor_grpo"]:
        twin = tuning_all[(run["lr"], run["knob"])]
        assert run["gold_at"] == "final" and twin["gold_at"] == "all" and len(run["curve"]) == 5
        early, last = run["curve"][:-rules.FINAL_EVALUATIONS], run["curve"][-rules.FINAL_EVALUATIONS:]
        assert len(early) == 2 and all(r[k] is None for r in early for k in GOLD_FIELDS)  # absent, not 0
        for mine, theirs in zip(run["curve"], twin["curve"]):
            assert _without(mine) == _without(theirs)
        for mine, theirs in zip(last, twin["curve"][-rules.FINAL_EVALUATIONS:]):  # scored later, on the same images
            assert all(mine[k] == theirs[k] and math.isfinite(mine[k]) for k in GOLD_FIELDS)
    reported = final["runs"]["neighbor_grpo"]["0"]
    assert reported["gold_at"] == "all" and all(r["gold"] is not None and r["side_gold"] is not None
                                                for r in reported["curve"])
    assert [_without(r, ("train_s",)) for r in reported["curve"]] == \
           [_without(r, ("train_s",)) for r in every["runs"]["neighbor_grpo"]["0"]["curve"]]
    assert final["methods"]["neighbor_grpo"]["final"] == every["methods"]["neighbor_grpo"]["final"]

    # the report re-renders such a file, and the selection-regret check reads its grid
    from neighbor_grpo.bench.report import render

    again = render(tmp_path / "final.json", tmp_path / "again.json")
    assert again["methods"]["neighbor_grpo"]["final"] == final["methods"]["neighbor_grpo"]["final"]
    spec = importlib.util.spec_from_file_location("selection_regret_benchmark", SELECTION_REGRET)
    regret = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regret)
    grids = {name: regret.recorded_grids(tmp_path, pattern=f"{name}.json") for name in ("all", "final")}
    assert [len(g) for g in grids.values()] == [1, 1]
    result = {name: regret.regrets(g, {"proxy area": regret.pick_proxy_area})["proxy area"]
              for name, g in grids.items()}
    assert result["final"]["mean"] == result["all"]["mean"] >= 0.0  # the final gold is all it reads


def test_side_sampler_none_skips_the_side_evaluation(words_folder, moving_words, tmp_path, capsys):
    out = tmp_path / "none.json"
    code = main(["compare", "--base", str(words_folder), "--out", str(out), "--no-progress", "--methods",
                 "neighbor_grpo", "--seeds", "0", "--lrs", "1e-3", "--no-grid", "--evals-per-run", "3",
                 "--eval-samples", "2", "--throughput-iters", "0", "--eval-sampler", "euler:4", "--side-sampler",
                 "none", "--budget-fe", str(_five_iterations(moving_words))])
    assert code == 0, capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["settings"]["side_sampler"] is None and saved["settings"]["eval_sampler"]["name"] == "euler:4"
    assert all("side_gold" not in r and "side_proxy" not in r for r in saved["runs"]["neighbor_grpo"]["0"]["curve"])


def test_the_new_flags_refuse_bad_values_in_one_line(tmp_path, capsys):
    assert side_sampler_steps(None, "euler40") == ("dpm++2m", 8) and side_sampler_steps(None, "dpm8") is None
    assert side_sampler_steps("none", "euler40") is None and side_sampler_steps("euler:4", "euler40") == ("euler", 4)
    with pytest.raises(ValueError, match="^--side-sampler: expected dpm8 or euler40, or SOLVER:STEPS"):
        check_protocol([0], [1e-3], [100], None, "euler40", side_sampler="heun")
    with pytest.raises(ValueError, match="^--tuning-gold final: expected --tuning-seeds"):
        check_protocol([0], [1e-3], None, None, "euler40", tuning_gold="final")
    out = tmp_path / "r" / "w.json"
    code = main(["compare", "--out", str(out), "--no-progress", "--tuning-gold", "final", "--seeds", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--tuning-gold final: expected --tuning-seeds" in err
    assert not out.parent.exists()  # refused before anything was written
