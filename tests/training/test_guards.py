"""A run that learned nothing is a failure, not a result (issue 11, item 3): when at least 90% of its updates were
skipped or changed no parameter, `ngrpo train` exits 1 naming the likely setting and writes no aligned/."""

from __future__ import annotations

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.guards import TrainingIneffective, check_effective, likely_setting

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["iterations=3", "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
        "neighbor_grpo.rollout_steps=4", "eval.every=0", "eval.samples_per_prompt=2", "eval.steps=4",
        "prompts.eval=['0','1']"]


@pytest.mark.parametrize("setting, named", [
    ("neighbor_grpo.tau=1e-30", "Likely setting: neighbor_grpo.tau=1e-30"),  # every update non-finite
    ("optim.lr=1e-30", "Likely setting: optim.lr=1e-30 (too small to move the weights)"),  # no parameter moves
])
def test_a_run_whose_updates_changed_nothing_exits_1_without_aligned(builtin_models, tmp_path, capsys, setting,
                                                                     named):
    run = tmp_path / "run"
    code = main(["train", *TINY, setting, "max_nonfinite_in_row=10", "--out", str(run), "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("ngrpo train: error: 3 of 3 updates were skipped or changed no parameter") and named in line
    assert not (run / "aligned").exists()


def test_the_threshold_is_90_percent_of_the_run():
    config = load_config(None, ["iterations=10"])
    check_effective(config, {"idle_updates": 8, "nonfinite_total": 8})  # 80%: a run that learned a little
    with pytest.raises(TrainingIneffective, match="9 of 10 updates"):
        check_effective(config, {"idle_updates": 9, "nonfinite_total": 0})
    assert likely_setting(config, nonfinite=9, idle=9).startswith("optim.lr=0.0001 or the rewards")
