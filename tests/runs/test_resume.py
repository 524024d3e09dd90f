"""Resume refuses what it cannot replay (issue 11, item 2): the checkpoint records the config and the prompt files'
SHA-256; a changed setting or file is refused as `key: old -> new`, except `iterations` growing and the settings
accepted on purpose with --accept-changes (CLI) / accept_changes (Python). Non-finite weights are never checkpointed
or exported, and the NaN abort prints the command that continues the run."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
import yaml

from neighbor_grpo.runs.checkpoint import latest_good_checkpoint, list_checkpoints, read_checkpoint
from neighbor_grpo.cli import main
from neighbor_grpo.config.train_config import ConfigError, load_config
from neighbor_grpo.training.guards import NonFiniteWeights
from neighbor_grpo.runs.io import load_safetensors
from neighbor_grpo.runs.resume import ResumeRefused, apply_changes, differences, input_fingerprint
from neighbor_grpo.training.trainer import TrainingAborted, load_model, train

pytestmark = pytest.mark.usefixtures("single_thread")

# 4 iterations of 2 prompts x 4 candidates, 2 optimizer steps each, a checkpoint every 2
TINY = ["iterations=4", "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
        "neighbor_grpo.rollout_steps=4", "eval.every=0", "eval.samples_per_prompt=2", "eval.steps=4",
        "prompts.eval=['0','1']", "checkpoint_every=2"]


def tiny(*extra):
    return load_config(None, TINY + list(extra))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def edit_config(run, **changes):
    """Edit RUN/config.yaml by hand, as a user would ('optim.lr': 3e-4)."""
    data = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        node, *path = data, *key.split("__")
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture()
def stopped_run(builtin_models, tmp_path):
    """A run stopped after its first checkpoint (iteration 2 of 4), with its prompts in a file."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0\n1\n2\n3\n")

    def stop(point):
        if point == "after_checkpoint":
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(f"prompts.file={prompts}"), run, progress=False, fault_hook=stop)
    return run, prompts


# ---- the comparison itself --------------------------------------------------------------------------------------

def test_differences_name_each_key_with_old_and_new_value_and_let_iterations_grow(tmp_path):
    recorded = input_fingerprint(tiny())
    refused, allowed = differences(recorded, tiny("optim.lr=3e-4", "neighbor_grpo.neighbor_sigma=0.5",
                                                  "iterations=9"), done=2)
    assert refused == ["neighbor_grpo.neighbor_sigma: 0.3 -> 0.5"]
    assert allowed == ["iterations: 4 -> 9", "optim.lr: 0.0001 -> 0.0003"]
    refused, _ = differences(recorded, tiny("iterations=1"), done=2)
    assert refused == ["iterations: 4 -> 1 (the checkpoint already holds 2 iterations)"]


def test_only_the_documented_settings_can_be_accepted():
    assert apply_changes(tiny(), {"optim.lr": 3e-5, "eval.steps": 2}).optim.lr == 3e-5
    with pytest.raises(ConfigError, match=r"--accept-changes neighbor_grpo.neighbor_sigma: only optim.lr, "
                                          r"optim.max_grad_norm, iterations, eval.\*, checkpoint_every, keep_checkpoints"):
        apply_changes(tiny(), {"neighbor_grpo.neighbor_sigma": 0.5})
    with pytest.raises(ConfigError, match="optim.lr: expected a learning rate > 0"):
        apply_changes(tiny(), {"optim.lr": -1.0})


# ---- the CLI and the Python API ---------------------------------------------------------------------------------

def test_cli_resume_refuses_an_edited_config_listing_each_change(stopped_run, capsys):
    run, _ = stopped_run
    edit_config(run, optim__lr=3e-4, neighbor_grpo__neighbor_sigma=0.5)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("ngrpo train: error: --resume ") and "checkpoint iter-000002" in line
    assert "neighbor_grpo.neighbor_sigma: 0.3 -> 0.5" in line
    assert "optim.lr: 0.0001 -> 0.0003 (to keep it: --accept-changes optim.lr=0.0003)" in line
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000002"]  # nothing trained
    assert not (run / "aligned").exists()


def test_cli_resume_refuses_a_changed_prompt_file(stopped_run, capsys):
    run, prompts = stopped_run
    prompts.write_text("0\n1\n2\n3\n4\n")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2
    assert re.search(r"prompts.file \(.*prompts.txt\): sha256 [0-9a-f]{12} -> [0-9a-f]{12} \(the file changed\)", err)
    prompts.unlink()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2 and "missing (the file is gone)" in err


def test_python_api_follows_the_same_rule(stopped_run):
    run, prompts = stopped_run
    with pytest.raises(ResumeRefused, match=r"optim.lr: 0.0001 -> 0.0003 \(to keep it: --accept-changes"):
        train(tiny(f"prompts.file={prompts}", "optim.lr=3e-4"), run, resume=True, progress=False)
    with pytest.raises(ValueError, match="applies to a resumed run only"):
        train(tiny(), run.parent / "fresh", progress=False, accept_changes={"optim.lr": 3e-5})
    # accepted on purpose: the optimizer gets the new lr (not the checkpoint's), iterations grow
    train(tiny(f"prompts.file={prompts}"), run, resume=True, progress=False,
          accept_changes={"optim.lr": 3e-5, "iterations": 6})
    _, state = read_checkpoint(latest_good_checkpoint(run / "checkpoints"))
    assert state["iteration"] == 6
    assert {group["lr"] for group in state["optimizer"]["param_groups"]} == {3e-5}
    metadata = json.loads((run / "run.json").read_text())
    assert metadata["exact_replay"] is False
    assert metadata["config_history"] == [{"iteration": 2, "changes": ["iterations: 4 -> 6", "optim.lr: 0.0001 -> 3e-05"]}]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 3e-5 and saved["iterations"] == 6


def test_iterations_may_grow_without_accept_changes_and_stay_an_exact_replay(stopped_run, capsys):
    run, _ = stopped_run
    edit_config(run, iterations=5)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 0, err
    metadata = json.loads((run / "run.json").read_text())
    assert metadata["exact_replay"] is True
    assert metadata["config_history"] == [{"iteration": 2, "changes": ["iterations: 4 -> 5"]}]
    assert latest_good_checkpoint(run / "checkpoints").name == "iter-000005"


def test_cli_accept_changes_refuses_other_keys_and_needs_resume(stopped_run, capsys, tmp_path):
    run, _ = stopped_run
    code, _, err = run_cli(capsys, "train", "--resume", run, "--accept-changes", "seed=3")
    assert code == 2 and "--accept-changes seed: only optim.lr, optim.max_grad_norm, iterations, eval.*" in err
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "new", "--accept-changes", "optim.lr=1e-5")
    assert code == 2 and "--accept-changes goes with --resume RUN" in err


# ---- non-finite weights and the abort message -------------------------------------------------------------------

def test_nan_weights_abort_without_a_checkpoint_and_the_printed_command_finishes_the_run(builtin_models, tmp_path,
                                                                                         capsys):
    """The weights turn NaN in the last iteration; the abort writes no checkpoint and no export and prints the
    command; running that command continues from the last finite checkpoint and ends with finite aligned/."""
    config = tiny("max_nonfinite_in_row=1")
    adapter = load_model(config.model.path, "cpu", progress=False)
    steps = [0]

    def poison(point):  # the first optimizer step of iteration 4 (2 steps per iteration) leaves NaN weights
        if point == "after_optimizer_step":
            steps[0] += 1
            if steps[0] == 7:
                with torch.no_grad():
                    next(p for p in adapter.net.parameters() if p.requires_grad).fill_(float("nan"))

    run = tmp_path / "run"
    with pytest.raises((TrainingAborted, NonFiniteWeights)) as error:
        train(config, run, progress=False, fault_hook=poison, adapter=adapter)
    message = str(error.value)
    assert "NaN/inf" in message
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["iter-000002"]  # the NaN state is not saved
    assert not (run / "aligned").exists()
    command = re.search(r"ngrpo train --resume \S+ --accept-changes optim\.lr=\S+", message).group(0)
    assert command.endswith("optim.lr=3.33e-05")
    code, _, err = run_cli(capsys, *shlex.split(command)[1:], "--no-progress")
    assert code == 0, err
    weights = load_safetensors(run / "aligned" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    metadata = json.loads((run / "run.json").read_text())
    assert metadata["exact_replay"] is False
    assert metadata["config_history"] == [{"iteration": 2, "changes": ["optim.lr: 0.0001 -> 3.33e-05"]}]


def test_a_checkpoint_with_nonfinite_state_is_skipped_on_resume(stopped_run):
    run, prompts = stopped_run
    train(tiny(f"prompts.file={prompts}"), run, resume=True, progress=False)  # checkpoints 2 and 4
    newest = latest_good_checkpoint(run / "checkpoints")
    assert newest.name == "iter-000004"
    from neighbor_grpo.runs.checkpoint import write_checkpoint

    tensors, state = read_checkpoint(newest)
    first = next(iter(tensors["optimizer"]))
    tensors["optimizer"][first] = torch.full_like(tensors["optimizer"][first], float("inf"))
    write_checkpoint(run / "checkpoints", 4, tensors, state)  # verifies, but holds inf (as an older version could)
    with pytest.warns(UserWarning, match="iter-000004 holds NaN/inf weights or optimizer state; skipping it"):
        assert latest_good_checkpoint(run / "checkpoints").name == "iter-000002"


@pytest.mark.parametrize("overrides, advice", [
    # issue 22 item 7: a third of lr=1e6 (333000) blew up again; the suggestion is at most the default
    (["optim.lr=1e6"], "Continue from the last good checkpoint with a lower learning rate: ngrpo train --resume RUN "
                       "--accept-changes optim.lr=0.0001 "),
    (["optim.lr=3e-4"], "--accept-changes optim.lr=0.0001 "),
    (["optim.lr=1.5e-4"], "--accept-changes optim.lr=5e-05 "),
    (["algorithm=awm", "awm.advantage_max=50"], "Likely setting: awm.advantage_max=50 (50x its default 1, the furthest "
                                                 "from its default); start a new run with it nearer its default "
                                                 "(awm.advantage_max cannot change on resume)"),
    (["optim.max_grad_norm=100"], "Likely setting: optim.max_grad_norm=100 (100x its default 1, the furthest from its "
                                  "default); continue with it at its default: ngrpo train --resume RUN "
                                  "--accept-changes optim.max_grad_norm=1 "),
])
def test_the_advice_after_a_blow_up_is_one_that_can_work(overrides, advice):
    from pathlib import Path

    from neighbor_grpo.runs.resume import recovery

    assert advice in recovery(Path("RUN"), load_config(None, overrides))
