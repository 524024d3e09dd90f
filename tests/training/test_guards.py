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


@pytest.mark.parametrize("algorithm", ["dgpo", "awm", "diffusion_nft", "flow_grpo"])
def test_a_run_whose_final_samples_are_nan_fails_without_aligned_or_best(builtin_models, tmp_path, capsys, algorithm):
    # issue 22 item 2: at lr 1e6 without clipping these ended rc 0 with eval_after {} and an aligned/ of NaN samples
    # (finite weights); Flow-GRPO was reported with sde_type cps
    run = tmp_path / "run"
    extra = ["flow_grpo.sde_type=cps"] if algorithm == "flow_grpo" else []
    code = main(["train", f"algorithm={algorithm}", "optim.lr=1e6", "optim.max_grad_norm=0", "iterations=2",
                 "prompts_per_iteration=1", "eval.samples_per_prompt=2", "prompts.eval=['0','1']", *extra,
                 "--out", str(run), "--no-progress"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, line
    assert line.startswith("ngrpo train: error: the final held-out samples (after iteration 2) are not finite")
    assert "no aligned/ was written" in line
    assert not (run / "aligned").exists() and not (run / "best").exists() and not (run / "eval_after.json").exists()


@pytest.mark.parametrize("overrides, blamed", [
    (["algorithm=awm", "awm.advantage_max=50"], "awm.advantage_max"),
    (["algorithm=dance_grpo", "dance_grpo.eta=2", "optim.lr=1e-3"], "optim.lr"),  # 10x vs 6.7x: the lr is further
    (["optim.lr=1e6"], "optim.lr"),
    (["algorithm=awm", "neighbor_grpo.ref_beta=500"], None),  # another algorithm's section is not this run's
    ([], None),
])
def test_the_blamed_setting_is_the_one_furthest_from_its_default(overrides, blamed):
    # issue 22 item 7: the hint blamed optim.lr whatever setting blew the run up
    from neighbor_grpo.training.guards import furthest_setting

    found = furthest_setting(load_config(None, overrides))
    assert (found[0] if found else None) == blamed
    if blamed == "awm.advantage_max":
        assert found[1:] == (50.0, 1.0, 50.0)
        named = likely_setting(load_config(None, overrides), nonfinite=3, idle=3)
        assert named.startswith("awm.advantage_max=50 (50x its default 1, the setting furthest from its default)")
