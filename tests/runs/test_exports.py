"""Exported model folders carry checksums (issue 11, item 3): a changed or missing file is a one-line error naming
it; NaN/inf weights and NaN/inf samples are errors, never NaN arrays or black PNGs with exit status 0."""

from __future__ import annotations

import json
import shutil

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.runs.exports import MANIFEST, ExportDamaged, verify_manifest, write_manifest
from neighbor_grpo.runs.io import load_safetensors, save_safetensors
from neighbor_grpo.models import load_adapter

pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def export(builtin_models, tmp_path):
    """A copy of the built-in base model with its checksums, as a run exports it."""
    folder = tmp_path / "export"
    shutil.copytree(builtin_models["base"], folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    write_manifest(folder)
    return folder


def fill_first_weight(folder, value):
    weights = load_safetensors(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight"))
    weights[name] = weights[name].clone().fill_(value)
    save_safetensors(weights, folder / "model.safetensors")


def test_the_manifest_lists_every_file_and_verifies(export):
    assert set(json.loads((export / MANIFEST).read_text())["files"]) == {"model.json", "model.safetensors"}
    verify_manifest(export)
    load_adapter(export)


def test_a_changed_or_missing_file_is_named(export, tmp_path, capsys):
    with open(export / "model.safetensors", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ExportDamaged, match=r"export/model.safetensors: checksum mismatch"):
        load_adapter(export)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", export, "--prompt", "3", "--out", tmp_path / "s.png")
    assert code == 2 and err.count("\n") == 1 and "model.safetensors: checksum mismatch" in err
    assert not (tmp_path / "s.png").exists()
    (export / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "eval", "--checkpoint", export, "--out", tmp_path / "e.json")
    assert code == 2 and "model.safetensors: missing (listed in manifest.json)" in err
    assert not (tmp_path / "e.json").exists()


def test_nan_weights_are_refused_by_sample_and_eval(export, tmp_path, capsys):
    fill_first_weight(export, float("nan"))
    write_manifest(export)  # consistent checksums: the weights themselves are the problem
    for argv in (["sample", "--prompt", "3", "--out", tmp_path / "s.npz"], ["eval", "--out", tmp_path / "e.json"]):
        code, _, err = run_cli(capsys, argv[0], "--checkpoint", export, *argv[1:])
        assert code == 2 and "its weights hold NaN/inf; not a usable model" in err, err
    assert not list(tmp_path.glob("s.*")) and not list(tmp_path.glob("e.*"))


def test_finite_weights_with_non_finite_samples_are_refused(export, tmp_path, capsys):
    fill_first_weight(export, 1e30)  # finite, but every activation overflows
    write_manifest(export)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", export, "--prompt", "3", "--out", tmp_path / "s.png")
    assert code == 2 and "the samples hold NaN/inf" in err and "nothing written" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", export, "--out", tmp_path / "e.json")
    assert code == 2 and "the samples hold NaN/inf" in err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "e.json").exists()


def test_eval_and_pretrain_refuse_out_of_range_counts(builtin_models, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--limit", "0", "--out",
                           tmp_path / "e.json")
    assert code == 2 and "--limit: expected a count >= 1, got 0" in err
    for noise in ("-0.1", "1.5"):
        code, _, err = run_cli(capsys, "pretrain", "--label-noise", noise, "--no-progress")
        assert code == 2 and f"--label-noise: expected a share in [0, 1], got {float(noise)}" in err
    code, _, err = run_cli(capsys, "eval", "--checkpoint", builtin_models["base"], "--reward", "digit_prob",
                           "--reward", "digit_prob:weight=2", "--out", tmp_path / "e.json")
    assert code == 2 and "reward 'digit_prob' is given twice; give one of them a distinct label" in err
