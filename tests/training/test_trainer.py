"""End-to-end training on the built-in model (the default suite's real training run), resume, checkpoints."""

import csv
import json
import math

import pytest
import torch

from neighbor_grpo.runs.checkpoint import latest_good_checkpoint, list_checkpoints
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.runs.io import load_safetensors
from neighbor_grpo.models import load_adapter
from neighbor_grpo.training.iteration import prompt_batch
from neighbor_grpo.training.trainer import train


def small_config(*overrides):
    base = ["iterations=6", "prompts_per_iteration=4", "eval.every=3", "eval.samples_per_prompt=4",
            "neighbor_grpo.group_size=6", "neighbor_grpo.num_anchors=2", "checkpoint_every=2", "keep_checkpoints=10"]
    return load_config(None, base + list(overrides))


def read_metrics(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_alignment_raises_heldout_reward_clearly(builtin_models, tmp_path):
    """The demo's setting, shortened: 60 iterations of Neighbor GRPO on the built-in model."""
    config = load_config(None, ["iterations=60", "eval.every=30", "checkpoint_every=30"])
    result = train(config, tmp_path / "run", progress=False)
    before, after = result.eval_before["reward"], result.eval_after["reward"]
    # measured: 0.57 -> 0.95 at these settings (ref_beta 1); demand a clear margin
    assert after > before + 0.2, f"held-out reward only went from {before:.3f} to {after:.3f}"
    assert result.eval_after["accuracy"] > result.eval_before["accuracy"] + 0.2
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "metrics.csv", "reward_curve.png", "eval_before.json", "eval_after.json",
                 "base/model.json", "aligned/model.safetensors", "best/model.json", "samples/iter-000000.png"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    metadata = json.loads((run / "run.json").read_text())
    assert metadata["versions"]["torch"] == torch.__version__
    # the aligned folder is a checkpoint the sampler loads, and it differs from the base
    aligned, base = load_adapter(run / "aligned"), load_adapter(run / "base")
    assert any(not torch.equal(a, b) for a, b in zip(aligned.net.state_dict().values(), base.net.state_dict().values()))
    rows = read_metrics(run)
    logged = {k for row in rows for k, v in row.items() if v not in ("", None)}
    for key in ("reward_mean", "reward_std", "ratio_mean", "clip_fraction", "approx_kl", "zero_variance_groups",
                "adv_clipped_share", "grad_norm", "grad_clipped_share", "s_per_iter", "model_evals_per_iter", "heldout/reward",
                "heldout/out_of_range", "heldout/diversity", "heldout/realism_nn_dist"):
        assert key in logged, key


def test_resume_gives_the_same_parameters_and_rewards(builtin_models, tmp_path):
    straight = train(small_config(), tmp_path / "straight", progress=False)

    class Stop(Exception):
        pass

    def stop_after_third(point, seen=[0]):
        if point == "after_log":
            seen[0] += 1
            if seen[0] == 3:  # the checkpoint at iteration 2 exists, iteration 3 was logged but not saved
                raise Stop()

    with pytest.raises(Stop):
        train(small_config(), tmp_path / "resumed", progress=False, fault_hook=stop_after_third)
    resumed = train(small_config(), tmp_path / "resumed", resume=True, progress=False)
    a = load_safetensors(straight.run_dir / "aligned" / "model.safetensors")
    b = load_safetensors(resumed.run_dir / "aligned" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = read_metrics(straight.run_dir), read_metrics(resumed.run_dir)
    assert [r["iteration"] for r in rows_b] == [r["iteration"] for r in rows_a]  # no iteration twice
    assert [r["reward_mean"] for r in rows_b] == [r["reward_mean"] for r in rows_a]


def test_corrupted_checkpoint_is_skipped(builtin_models, tmp_path):
    run = tmp_path / "run"
    train(small_config("iterations=4"), run, progress=False)
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [c.name for c in checkpoints] == ["iter-000002", "iter-000004"]
    with open(checkpoints[-1] / "model.safetensors", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00garbage")
    with pytest.warns(UserWarning, match="torn or corrupted"):
        assert latest_good_checkpoint(run / "checkpoints") == checkpoints[0]


def test_run_folder_refuses_non_empty_without_flags(builtin_models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("user data")
    with pytest.raises(RuntimeError, match="not empty"):
        train(small_config("iterations=1"), run, progress=False)
    assert (run / "precious.txt").read_text() == "user data"


def test_lora_finetune_trains_only_adapters(builtin_models, tmp_path):
    result = train(small_config("iterations=3", "optim.finetune=lora", "optim.lr=1e-3"), tmp_path / "run", progress=False)
    lora = load_safetensors(result.run_dir / "aligned" / "lora.safetensors")
    assert lora and all("lora_" in key for key in lora)
    aligned = load_adapter(result.run_dir / "aligned")  # merged weights load as a plain model
    base = load_adapter(result.run_dir / "base")
    changed = [k for k, v in aligned.net.state_dict().items() if not torch.equal(v, base.net.state_dict()[k])]
    assert changed and all(k.endswith(("fc1.weight", "fc2.weight")) for k in changed)


def test_reference_anchoring_and_ema_run(builtin_models, tmp_path):
    result = train(small_config("iterations=2", "neighbor_grpo.ref_beta=1.0", "optim.ema_decay=0.9"),
                   tmp_path / "run", progress=False)
    assert math.isfinite(result.eval_after["reward"])


def test_prompt_batches_cover_the_prompt_set_each_epoch():
    prompts = list("abcde")
    seen = [p for it in range(5) for p in prompt_batch(prompts, 0, it, 2)[0]]
    assert sorted(seen[:5]) == prompts and sorted(seen[5:10]) == prompts
    assert prompt_batch(prompts, 0, 3, 2) == prompt_batch(prompts, 0, 3, 2)


@pytest.mark.parametrize("overrides, source", [
    (["prompts.eval=['3', cat]"], "prompts.eval: prompt 'cat'"),
    (["prompts.file={file}"], "prompts.file '{file}': prompt 'seven'"),
])
def test_a_prompt_the_model_cannot_take_fails_before_the_run_folder_exists(builtin_models, tmp_path, capsys,
                                                                            overrides, source):
    # issue 22 item 6: it failed after the run folder was committed (138 s), so the corrected rerun was "not empty"
    from neighbor_grpo.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("3\nseven\n")
    run = tmp_path / "run"
    argv = ["train", "iterations=1", "prompts_per_iteration=1", "eval.samples_per_prompt=2"]
    assert main([*argv, *[o.format(file=prompts) for o in overrides], "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and source.format(file=prompts) in err and "knows only the prompts '0'..'9'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]
    assert main([*argv, "--out", str(run), "--no-progress"]) == 0  # the corrected rerun starts in the same folder
