"""The `ngrpo` command: sample, eval, train/resume, folder safety, pretrain, and the installed entry point."""

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from neighbor_grpo.cli import main
from neighbor_grpo.runs.io import load_safetensors
from neighbor_grpo.models import load_adapter
from neighbor_grpo.training.monitors import generate
from neighbor_grpo.rewards.digit_classifier import make_digit_probability_reward


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)


TINY = ["prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
        "eval.samples_per_prompt=2", "eval.every=0"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def folder_snapshot(folder):
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- sample -----------------------------------------------------------------------------------------------------

def sample_npz(capsys, base, path, *extra):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", base, "--out", path, *extra)
    assert code == 0, err
    with np.load(path) as data:
        return data["images"], data["prompts"]


def test_sample_npz(builtin_models, tmp_path, capsys):
    images, prompts = sample_npz(capsys, builtin_models["base"], tmp_path / "x.npz", "--prompt", "7", "--num", "5",
                                 "--seed", "0")
    assert images.dtype == np.float32
    assert images.shape == (5, 1, 16, 16)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.05  # real samples, not a blank array
    assert [str(p) for p in prompts] == ["7"] * 5


def test_sample_seeds(builtin_models, tmp_path, capsys):
    base = builtin_models["base"]
    a, _ = sample_npz(capsys, base, tmp_path / "a.npz", "--prompt", "3", "--num", "4", "--seed", "11")
    b, _ = sample_npz(capsys, base, tmp_path / "b.npz", "--prompt", "3", "--num", "4", "--seed", "11")
    c, _ = sample_npz(capsys, base, tmp_path / "c.npz", "--prompt", "3", "--num", "4", "--seed", "12")
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_sample_solver_and_steps(builtin_models, tmp_path, capsys):
    base = builtin_models["base"]
    adapter = load_adapter(base)
    default, _ = sample_npz(capsys, base, tmp_path / "d.npz", "--prompt", "2", "--num", "3", "--seed", "4")
    for solver, steps in (("euler", 4), ("heun", 3), ("dpm++2m", 5)):
        images, _ = sample_npz(capsys, base, tmp_path / f"{solver}.npz", "--prompt", "2", "--num", "3", "--seed", "4",
                               "--solver", solver, "--steps", steps)
        # the flags reach the sampler: the same as sampling in Python with that solver and step count
        _, expected = generate(adapter, ["2"], 3, 4, solver, steps)
        np.testing.assert_allclose(images, expected[0].clamp(0, 1).numpy(), rtol=0, atol=1e-6, err_msg=solver)
        assert np.abs(images - default).max() > 1e-4, solver  # differs from the default dpm++2m with 8 steps


def test_sample_png(builtin_models, tmp_path, capsys):
    base = builtin_models["base"]
    code, out, err = run_cli(capsys, "sample", "--checkpoint", base, "--prompt", "1", "--num", "5", "--out", tmp_path / "five.png")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", "--checkpoint", base, "--prompt", "1", "--num", "16", "--out", tmp_path / "sixteen.png")
    assert code == 0, err
    assert "five.png" in out
    with Image.open(tmp_path / "five.png") as five, Image.open(tmp_path / "sixteen.png") as sixteen:
        assert five.format == sixteen.format == "PNG"
        # 5 samples fit one row; 16 samples make two rows of 8
        assert sixteen.size[0] > five.size[0]
        assert abs(sixteen.size[1] - 2 * five.size[1]) <= 4
        assert len(set(np.asarray(five.convert("L")).flatten().tolist())) > 10  # not a blank canvas


@pytest.mark.parametrize("argv, words", [
    (["--out", "{tmp}/x.jpg", "--num", "2"], ".png"),
    (["--out", "{tmp}/x", "--num", "2"], ".npz"),
    (["--out", "{tmp}/x.npz", "--num", "0"], "--num"),
    (["--out", "{tmp}/x.npz", "--num", "-3"], "--num"),
])
def test_sample_bad_arguments_exit_2(builtin_models, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "sample", "--checkpoint", builtin_models["base"], "--prompt", "1", *argv)
    assert code == 2
    assert "ngrpo sample: error:" in err and words in err
    assert list(tmp_path.iterdir()) == []


def test_sample_missing_checkpoint_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", tmp_path / "nope", "--prompt", "1", "--out", tmp_path / "x.npz")
    assert code == 2 and str(tmp_path / "nope") in err


# ---- eval -------------------------------------------------------------------------------------------------------

def test_eval_writes_json_and_grid(builtin_models, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", out,
                                "--prompts", "0,1,2", "--samples-per-prompt", "3")
    assert code == 0, err
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    for key in ("reward", "accuracy", "out_of_range", "diversity", "realism_nn_dist"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["reward"] <= 1 and 0 <= metrics["out_of_range"] <= 1
    assert metrics["diversity"] > 0 and metrics["realism_nn_dist"] > 0
    assert metrics["reward_digit_prob"] == pytest.approx(metrics["reward"])  # one reward, weight 1
    assert result["prompts"] == ["0", "1", "2"] and result["samples_per_prompt"] == 3
    assert json.loads(stdout) == metrics
    with Image.open(tmp_path / "scores.png") as grid:
        assert grid.format == "PNG"
    # fixed held-out seeds: the same command gives the same numbers
    code, _, _ = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", tmp_path / "again.json",
                         "--prompts", "0,1,2", "--samples-per-prompt", "3")
    assert code == 0 and json.loads((tmp_path / "again.json").read_text())["metrics"] == metrics


def test_eval_scores_several_weighted_rewards_on_a_prompt_file(builtin_models, tmp_path, capsys):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("\n".join(json.dumps({"caption": d}) for d in "3861"), encoding="utf-8")
    out = tmp_path / "scores.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", out,
                           "--prompts-file", prompts, "--prompt-field", "caption", "--limit", "3",
                           "--reward", "digit_prob", "--reward", "jpeg_compressibility:weight=0.5,quality=50",
                           "--samples-per-prompt", "4")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["prompts"] == ["3", "8", "6"] and result["samples_per_prompt"] == 4
    metrics, summaries = result["metrics"], result["summaries"]
    assert metrics["reward"] == pytest.approx(metrics["reward_digit_prob"] + 0.5 * metrics["reward_jpeg_compressibility"], rel=1e-6)
    assert result["rewards_config"][1] == {"name": "jpeg_compressibility", "weight": 0.5, "kwargs": {"quality": 50}}
    for name in ("reward", "reward_digit_prob", "reward_jpeg_compressibility"):
        assert summaries[name]["mean"] == pytest.approx(metrics[name]) and summaries[name]["std"] >= 0
    per_prompt = result["per_prompt"]
    assert [row["prompt"] for row in per_prompt] == ["3", "8", "6"]
    assert np.mean([row["reward_digit_prob"] for row in per_prompt]) == pytest.approx(metrics["reward_digit_prob"], rel=1e-6)


def test_eval_scores_monitor_rewards_outside_the_reward(builtin_models, tmp_path, capsys):
    args = ["eval", "--checkpoint", builtin_models["base"], "--prompts", "0,7", "--samples-per-prompt", "3"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "plain.json")
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--monitor", "digit_gold", "--out", tmp_path / "monitored.json")
    assert code == 0, err
    plain, monitored = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "monitored"))
    assert monitored["metrics"]["reward"] == plain["metrics"]["reward"]  # a monitor never enters `reward`
    assert monitored["monitor_rewards_config"] == [{"name": "digit_gold", "weight": 1.0, "kwargs": {}}]
    gold = monitored["metrics"]["monitor/digit_gold"]
    parts = monitored["metrics"]["monitor/digit_gold/gold_class"], monitored["metrics"]["monitor/digit_gold/typical"]
    assert 0 <= gold <= min(parts) and monitored["summaries"]["monitor/digit_gold"]["mean"] == pytest.approx(gold)


def test_eval_takes_rewards_prompts_and_seeds_from_a_run_config(builtin_models, tmp_path, capsys):
    prompts = tmp_path / "digits.txt"
    prompts.write_text("\n".join(str(d) for d in range(10)), encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"prompts": {"file": str(prompts), "eval_fraction": 0.3},
                                      "eval": {"samples_per_prompt": 3, "seed": 77},
                                      "rewards": [{"name": "digit_prob", "weight": 2.0}]}), encoding="utf-8")
    out = tmp_path / "scores.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", out, "--config", config)
    assert code == 0, err
    result = json.loads(out.read_text())
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.config.prompts import resolve_prompt_sets

    assert result["prompts"] == resolve_prompt_sets(load_config(config).prompts)[1] and len(result["prompts"]) == 3
    assert result["seed"] == 77 and result["samples_per_prompt"] == 3
    assert result["metrics"]["reward"] == pytest.approx(2.0 * result["metrics"]["reward_digit_prob"], rel=1e-6)
    # a flag overrides the config's value
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", tmp_path / "b.json",
                           "--config", config, "--seed", "5", "--prompts", "1,2")
    assert code == 0, err
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["seed"] == 5 and again["prompts"] == ["1", "2"]


@pytest.mark.parametrize("flag, message", [
    (":path=/x", "expected NAME or NAME:key=value"),
    ("digit_prob:oops", "'oops' is not key=value"),
    ("digit_prob:weight=heavy", "weight must be a number"),
    ("no_such_reward", "no_such_reward"),
])
def test_eval_refuses_bad_reward_flags(builtin_models, tmp_path, capsys, flag, message):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", tmp_path / "s.json",
                           "--prompts", "1,2", "--reward", flag)
    assert code == 2 and message in err


def test_eval_without_prompts_exits_2(builtin_models, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", tmp_path / "s.json",
                           "--prompts", " , ")
    assert code == 2 and "prompts" in err


@pytest.mark.parametrize("count", [0, 1])
def test_eval_with_fewer_than_two_samples_per_prompt(builtin_models, tmp_path, capsys, count):
    out = tmp_path / "scores.json"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", out, "--prompts", "0,1",
                           "--samples-per-prompt", count)
    if code == 0:  # accepted: then the file must be strict JSON (no NaN)
        def refuse(constant):
            raise ValueError(f"not valid JSON: {constant}")

        json.loads(out.read_text(), parse_constant=refuse)
    else:  # refused: with a message that names the option
        assert code == 2 and "--samples-per-prompt" in err, err


# ---- train / resume ---------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("iterations: 2\n")
    return path


def read_metrics(run):
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_then_resume_of_a_finished_run_is_a_no_op(builtin_models, tmp_path, capsys, tiny_yaml):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", tiny_yaml, *TINY, "--out", run, "--no-progress")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run"] == str(run)
    assert {"reward", "accuracy"} <= set(summary["before"]) and {"reward", "accuracy"} <= set(summary["after"])
    for name in ("config.yaml", "metrics.csv", "aligned/model.safetensors", "aligned/model.json", "base/model.json",
                 "eval_before.json", "eval_after.json"):
        assert (run / name).is_file(), name
    assert [r["iteration"] for r in read_metrics(run)] == ["0", "1", "2"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["iterations"] == 2 and saved["neighbor_grpo"]["group_size"] == 4 and saved["eval"]["every"] == 0
    aligned_before = load_safetensors(run / "aligned" / "model.safetensors")
    metrics_before = (run / "metrics.csv").read_text()
    eval_after_before = json.loads((run / "eval_after.json").read_text())
    checkpoints_before = sorted(p.name for p in (run / "checkpoints").iterdir())

    code, out, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 0, err
    assert json.loads(out)["after"] == eval_after_before
    aligned_after = load_safetensors(run / "aligned" / "model.safetensors")
    assert aligned_after.keys() == aligned_before.keys()
    for key in aligned_before:
        assert torch.equal(aligned_before[key], aligned_after[key]), key
    assert (run / "metrics.csv").read_text() == metrics_before  # no iteration was run again
    assert json.loads((run / "eval_after.json").read_text()) == eval_after_before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints_before
    assert load_adapter(run / "aligned") is not None


def test_train_resume_refuses_overrides(builtin_models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("iterations: 2\n")
    code, _, err = run_cli(capsys, "train", "iterations=3", "--resume", run, "--no-progress")
    assert code == 2 and "--resume" in err


def test_train_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path, "--no-progress")
    assert code == 2 and "config.yaml" in err


def test_train_with_overrides_only(builtin_models, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "iterations=1", *TINY, "--out", run, "--no-progress")
    assert code == 0, err
    assert (run / "aligned" / "model.safetensors").is_file()


def test_train_into_a_non_empty_folder_exits_2_and_keeps_its_files(builtin_models, tmp_path, capsys, tiny_yaml):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("my work")
    (run / "sub").mkdir()
    (run / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = folder_snapshot(run)
    code, out, err = run_cli(capsys, "train", tiny_yaml, *TINY, "--out", run, "--no-progress")
    assert code == 2
    assert "not empty" in err and str(run) in err
    after = folder_snapshot(run)
    # the user's files are untouched and nothing of a run was written (only the run-folder lock file appears)
    assert {k: v for k, v in after.items() if k != ".lock"} == before


def test_train_without_out_exits_2(capsys, tiny_yaml):
    code, _, err = run_cli(capsys, "train", tiny_yaml)
    assert code == 2 and "--out" in err


def test_train_with_a_bad_override_exits_2_naming_the_field(tmp_path, capsys, tiny_yaml):
    code, _, err = run_cli(capsys, "train", tiny_yaml, "neighbor_grpo.neighbor_sigma=1.5", "--out", tmp_path / "r")
    assert code == 2 and "neighbor_grpo.neighbor_sigma" in err
    assert not (tmp_path / "r").exists()


# ---- demo -------------------------------------------------------------------------------------------------------

def test_demo_refuses_a_non_empty_folder_without_touching_it(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = folder_snapshot(out)
    names_before = sorted(p.name for p in out.iterdir())
    code, stdout, err = run_cli(capsys, "demo", "--out", out, "--no-progress")
    assert code == 2
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == names_before
    assert folder_snapshot(out) == before


# ---- pretrain ---------------------------------------------------------------------------------------------------

def test_pretrain_out_copies_base_and_reward(builtin_models, tmp_path, capsys):
    out = tmp_path / "models"
    code, stdout, err = run_cli(capsys, "pretrain", "--out", out, "--no-progress")
    assert code == 0, err
    for copied, source in ((out / "base", builtin_models["base"]), (out / "reward", builtin_models["classifier"])):
        names = sorted(p.name for p in source.iterdir())
        assert sorted(p.name for p in copied.iterdir()) == names
        for name in names:
            assert (copied / name).read_bytes() == (source / name).read_bytes(), name
    assert str(builtin_models["base"]) in stdout and str(builtin_models["classifier"]) in stdout
    # the copies are usable: a --checkpoint and a digit_prob kwargs.path
    assert load_adapter(out / "base").net_config.image_size == 16
    reward = make_digit_probability_reward(path=str(out / "reward"))
    assert reward(torch.zeros(1, 1, 16, 16), ["0"]).shape == (1,)
    # a second time into the now non-empty folder needs --overwrite
    code, _, err = run_cli(capsys, "pretrain", "--out", out, "--no-progress")
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(capsys, "pretrain", "--out", out, "--overwrite", "--no-progress")
    assert code == 0, err


def test_pretrain_model_digits_unet_builds_its_own_cached_model(builtin_models, tmp_path, capsys):
    """--model digits-unet at the default width, 3 steps: its own cache folder and adapter, the MLP untouched."""
    from neighbor_grpo.models import DigitsUNetAdapter
    from neighbor_grpo.builtin.pretrain import UNetBaseModelSettings, default_base_dir

    code, stdout, err = run_cli(capsys, "pretrain", "--model", "digits-unet", "--steps", "3", "--no-progress",
                                "--out", tmp_path / "models")
    assert code == 0, err
    expected = default_base_dir(UNetBaseModelSettings(steps=3))
    assert f"base model:        {expected}" in stdout and expected != builtin_models["base"]
    assert isinstance(load_adapter(tmp_path / "models" / "base"), DigitsUNetAdapter)
    assert json.loads((expected / "model.json").read_text())["pretrain"]["steps"] == 3


# ---- config and the installed entry point -----------------------------------------------------------------------

def test_config_prints_the_reference(capsys):
    from neighbor_grpo.config.train_config import config_reference

    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "| key | type | default | meaning |"
    assert len(lines) == 2 + len(config_reference())
    for key, *_ in config_reference():
        assert f"| `{key}` |" in out


def test_ngrpo_console_script(capsys):
    executable = shutil.which("ngrpo")
    assert executable, "the `ngrpo` console script is not installed (pip install -e .)"
    result = subprocess.run([executable, "config"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    main(["config"])
    in_process, _ = capsys.readouterr()
    assert result.stdout == in_process


def test_a_missing_optional_package_is_named_with_its_extra(builtin_models, tmp_path, capsys, monkeypatch):
    """Installed without extras: the OCR reward and FLUX/SD3 folders say which extra to install (exit 2, no
    traceback). A None entry in sys.modules makes the import fail as if the package were absent."""
    import sys

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--out", tmp_path / "s.json",
                           "--prompts", "1,2", "--reward", "ocr")
    assert code == 2 and 'pip install "neighbor-grpo[ocr]"' in err
    monkeypatch.setitem(sys.modules, "diffusers", None)
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    code, _, err = run_cli(capsys, "sample", "--checkpoint", folder, "--prompt", "a cat", "--out", tmp_path / "x.png")
    assert code == 2 and 'pip install "neighbor-grpo[diffusers]"' in err


# ---- --overwrite replaces only what ngrpo made, and only after start-up succeeded ------------------------------

def without_lock(snapshot):
    return {k: v for k, v in snapshot.items() if k != ".lock"}  # a run records its pid in the lock file


@pytest.fixture(scope="module")
def finished_run(builtin_models, tmp_path_factory):
    """A finished two-iteration run with checkpoints after iterations 1 and 2 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "iterations=2", "checkpoint_every=1", "keep_checkpoints=2", *TINY, "--out", str(run),
                 "--no-progress"]) == 0
    return run


def test_a_new_run_folder_carries_the_ownership_marker(finished_run):
    assert json.loads((finished_run / ".ngrpo-owned.json").read_text())["kind"] == "run"
    assert not [p.name for p in finished_run.parent.iterdir() if p.name.startswith(".run.")]  # no staging left


def test_overwrite_with_a_typo_in_model_path_keeps_the_old_run(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = without_lock(folder_snapshot(run))
    code, _, err = run_cli(capsys, "train", "iterations=1", *TINY, "model.path=/nonexistent/typo", "--out", run,
                           "--overwrite", "--no-progress")
    assert code == 2 and "typo" in err and len(err.strip().splitlines()) == 1, err
    assert without_lock(folder_snapshot(run)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the half-made replacement is gone
    # a good start-up replaces it: a one-iteration run, nothing left of the two-iteration one
    code, _, err = run_cli(capsys, "train", "iterations=1", *TINY, "--out", run, "--overwrite", "--no-progress")
    assert code == 0, err
    assert [r["iteration"] for r in read_metrics(run)] == ["0", "1"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_of_the_working_directory_in_a_git_project_is_refused(tmp_path, monkeypatch, capsys):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "code.py").write_text("print('mine')\n")
    before = folder_snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "train", "iterations=1", "--out", ".", "--overwrite", "--no-progress")
    assert code == 2 and "working directory" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "demo", "--out", ".", "--overwrite", "--no-progress")
    assert code == 2 and "working directory" in err, err
    assert folder_snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_of_someone_elses_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config")  # looks like a run, but holds more than a run
    (mine / "thesis.tex").write_text("chapter 1")
    before = folder_snapshot(mine)
    for argv in (["train", "iterations=1", "--out", mine], ["pretrain", "--out", mine], ["demo", "--out", mine]):
        code, _, err = run_cli(capsys, *argv, "--overwrite", "--no-progress")
        assert code == 2 and "was not made by ngrpo" in err and "thesis.tex" in err, err
    assert folder_snapshot(mine) == before


def test_resume_refuses_when_every_checkpoint_is_damaged(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for checkpoint in (run / "checkpoints").iterdir():
        with open(checkpoint / "model.safetensors", "r+b") as handle:
            handle.seek(-4, 2)
            handle.write(b"\x00bad")
    before = without_lock(folder_snapshot(run))
    with pytest.warns(UserWarning, match="torn or corrupted"):
        code, _, err = run_cli(capsys, "train", "--resume", run, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "iter-000002: model.safetensors (checksum mismatch)" in err and "iter-000001: model.safetensors" in err
    assert "iter-000002/optimizer.safetensors" in err and "aligned/" in err  # what is still intact
    assert without_lock(folder_snapshot(run)) == before  # nothing restarted from iteration 0 over them


# ---- file outputs -------------------------------------------------------------------------------------------------

def test_eval_refuses_an_existing_output_and_overwrite_replaces_only_its_files(builtin_models, tmp_path, capsys):
    out = tmp_path / "scores.json"
    out.write_text("my old scores")
    (tmp_path / "scores.csv").write_text("a sibling the command does not name")
    argv = ["eval", "--checkpoint", builtin_models["base"], "--prompts", "1", "--samples-per-prompt", "2",
            "--steps", "2", "--out", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "--overwrite" in err and out.read_text() == "my old scores"
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert "reward" in json.loads(out.read_text())["metrics"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores.json", "scores.png"]
    assert (tmp_path / "scores.csv").read_text() == "a sibling the command does not name"


def test_sample_refuses_an_existing_file_and_a_folder(builtin_models, tmp_path, capsys):
    (tmp_path / "grid.png").write_bytes(b"mine")
    (tmp_path / "dir.png").mkdir()
    for name, message in (("grid.png", "--overwrite"), ("dir.png", "is a folder")):
        code, _, err = run_cli(capsys, "sample", "--checkpoint", builtin_models["base"], "--prompt", "1",
                               "--out", tmp_path / name)
        assert code == 2 and message in err, err
    assert (tmp_path / "grid.png").read_bytes() == b"mine"


# ---- every expected failure is one line `ngrpo CMD: error: ...` ---------------------------------------------------

def one_line_error(capsys, command, *argv, code=2):
    got, _, err = run_cli(capsys, command, *argv)
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith(f"ngrpo {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_a_malformed_yaml_file_is_named_with_line_and_column(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("iterations: 2\noptim:\n  lr: 1e-4\n   max_grad_norm: 1\n")
    line = one_line_error(capsys, "train", config, "--out", tmp_path / "r")
    assert f"{str(config)!r}:4:" in line and "<unicode string>" not in line
    assert not (tmp_path / "r").exists()


def test_a_bad_yaml_value_in_an_override(tmp_path, capsys):
    line = one_line_error(capsys, "train", "optim.lr=[1e-4", "--out", tmp_path / "r")
    assert "override 'optim.lr=[1e-4'" in line and "not valid YAML" in line


def test_a_device_this_torch_cannot_use(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(capsys, "train", "iterations=1", "device=cuda", "--out", tmp_path / "r")
    assert "device: 'cuda' needs CUDA" in line
    line = one_line_error(capsys, "sample", "--checkpoint", tmp_path, "--prompt", "1", "--device", "cuda:0",
                          "--out", tmp_path / "x.png")
    assert "--device: 'cuda:0' needs CUDA" in line
    assert not (tmp_path / "r").exists()


def test_out_below_a_file_or_equal_to_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep")
    assert "is a file, not a folder" in one_line_error(capsys, "train", "iterations=1", "--out", tmp_path / "f" / "r")
    assert "is a file, not a folder" in one_line_error(capsys, "train", "iterations=1", "--out", tmp_path / "f")
    assert "is a file, not a folder" in one_line_error(capsys, "eval", "--checkpoint", tmp_path,
                                                       "--out", tmp_path / "f" / "x.json")
    assert (tmp_path / "f").read_text() == "keep"


def test_a_read_only_file_system(capsys):
    # /sys refuses new files even to root (chmod does not stop root; a read-only mount needs privileges)
    line = one_line_error(capsys, "train", "iterations=1", "--out", "/sys/ngrpo-run")
    assert "cannot write in '/sys'" in line


def test_eval_with_a_reward_that_returns_nan(builtin_models, tmp_path, monkeypatch, capsys):
    (tmp_path / "nan_reward.py").write_text("import torch\n\ndef make():\n"
                                            "    return lambda images, prompts: torch.full((len(prompts),), float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = one_line_error(capsys, "eval", "--checkpoint", builtin_models["base"], "--prompts", "1", "--steps", "2",
                          "--samples-per-prompt", "2", "--reward", "nan_reward.make", "--out", tmp_path / "x.json",
                          code=1)
    assert "non-finite score(s)" in line
    assert not (tmp_path / "x.json").exists()


def test_compare_with_a_zero_budget(tmp_path, capsys):
    assert "--budget-fe: expected > 0" in one_line_error(capsys, "compare", "--budget-fe", "0",
                                                         "--out", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--debug", "compare", "--budget-fe", "0", "--out", tmp_path / "c.json")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("ngrpo compare: error:")


def test_an_unexpected_exception_is_one_line_pointing_at_debug(monkeypatch, capsys):
    import neighbor_grpo.config.train_config as config_module

    monkeypatch.setattr(config_module, "config_reference", lambda: [][0])  # an IndexError: a bug in the tool
    code, _, err = run_cli(capsys, "config")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected IndexError" in err and "--debug" in err


def test_a_closed_pipe_and_an_early_ctrl_c_are_quiet(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    piped = subprocess.run(f"{shutil.which('python') or 'python'} -m neighbor_grpo.cli config | head -1",
                           shell=True, capture_output=True, text=True, env=env, timeout=300)
    assert piped.stdout.startswith("| key |") and piped.stderr == "", piped.stderr
    import signal
    import time

    for delay in (0.5, 1.5):  # while Python imports torch (an interrupted import may surface as another error)
        worker = subprocess.Popen([shutil.which("python") or "python", "-m", "neighbor_grpo.cli", "train",
                                   "iterations=1", "--out", str(tmp_path / "r")], stderr=subprocess.PIPE, text=True,
                                  env=env)
        time.sleep(delay)
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines() == ["ngrpo train: interrupted (a run continues from its latest checkpoint "
                                            "with `ngrpo train --resume RUN`)"], err
        assert list(tmp_path.iterdir()) == []  # no half-made run folder


# ---- issue 22: nothing silent at the edges ------------------------------------------------------------------------

PACKAGE = __import__("pathlib").Path(__import__("neighbor_grpo").__file__).resolve().parent


@pytest.mark.parametrize("argv, words", [
    (["train", "optim.lr", "--out", "{tmp}/r"], "override 'optim.lr': expected key=value, e.g. optim.lr=3e-4"),
    (["train", "optim.finetune=lora", "optim.lora_targets=[]", "--out", "{tmp}/r"],
     "optim.lora_targets: expected a list of at least one linear layer name to adapt"),
    (["pretrain", "--steps", "-1"], "--steps: expected a count of training steps >= 1, got -1"),
    (["pretrain", "--classifier-epochs", "-3"], "--classifier-epochs: expected a count of epochs >= 1, got -3"),
    (["sample", "--checkpoint", "{tmp}", "--prompt", "3", "--steps", "0", "--out", "{tmp}/s.png"],
     "--steps: expected a count of solver steps >= 1, got 0"),
    (["eval", "--checkpoint", "{tmp}", "--steps", "-1", "--out", "{tmp}/e.json"],
     "--steps: expected a count of solver steps >= 1, got -1"),
    (["train", *TINY, "--out", f"{PACKAGE}/runs_x"], "is inside the installed neighbor_grpo package"),
    (["sample", "--checkpoint", "{tmp}", "--prompt", "3", "--out", f"{PACKAGE}/x.png"],
     "is inside the installed neighbor_grpo package"),
])
def test_library_text_becomes_one_line_naming_the_key(tmp_path, capsys, argv, words):
    # issue 22 item 8: peft's text for lora_targets=[], torch's for --steps -1, a key read as a missing config file,
    # --out inside the installed package accepted
    code, _, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (PACKAGE / "runs_x").exists() and not (PACKAGE / "x.png").exists() and not (tmp_path / "r").exists()


def test_accept_changes_with_a_key_twice_is_refused(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = folder_snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "--accept-changes", "optim.lr=1e-5", "optim.lr=3e-5")
    assert code == 2 and "--accept-changes optim.lr: given twice" in err and err.count("\n") == 1
    assert {k: v for k, v in folder_snapshot(run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_overwrite_keeps_a_run_whose_folder_holds_a_users_notes(finished_run, tmp_path, capsys):
    # issue 22 item 1, as reported: `ngrpo train … --out runs/r1 --overwrite` deleted NOTES.md and analysis/
    run = tmp_path / "r1"
    shutil.copytree(finished_run, run)
    (run / "NOTES.md").write_text("what I saw")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("...")
    before = folder_snapshot(run)
    code, _, err = run_cli(capsys, "train", "iterations=1", *TINY, "--out", run, "--overwrite", "--no-progress")
    assert code == 2 and "holds 2 entries ngrpo did not write ['NOTES.md', 'analysis']" in err
    assert folder_snapshot(run) == before


def test_overrides_may_follow_options():
    """`ngrpo train c.yaml --out r key=value`: argparse alone would refuse the overrides after --out."""
    from neighbor_grpo.cli.commands import parse_command_line

    args = parse_command_line(["train", "c.yaml", "--out", "r", "iterations=3", "optim.lr=1e-3"])
    assert (args.config, args.out, args.overrides) == ("c.yaml", "r", ["iterations=3", "optim.lr=1e-3"])
    args = parse_command_line(["train", "c.yaml", "iterations=2", "--out", "r", "optim.lr=1e-3"])
    assert args.overrides == ["iterations=2", "optim.lr=1e-3"]
    for stray in (["--bogus"], ["stray"]):  # anything else is still argparse's one-line error
        with pytest.raises(SystemExit):
            parse_command_line(["train", "c.yaml", "--out", "r", *stray])
