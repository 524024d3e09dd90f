"""A diffusers folder is checked from its JSON files before anything is loaded or built (issue 22 items 3, 6, 8):
a size that is no integer or no real model's, a transformer whose channels do not take the VAE's latents, a
component model_index.json lists but the folder lacks. Each is one line naming the file and key, exit 2, in
seconds, from `ngrpo train` and `ngrpo plan` alike."""

import json
import shutil
import time

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.models.folder_checks import check_pipeline_folder

import tiny_diffusers


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_diffusers.build_flux(tmp_path_factory.mktemp("checks") / "flux")


def edited(flux, tmp_path, component, **changes):
    folder = tmp_path / "flux"
    shutil.copytree(flux, folder)
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def one_line_error(argv, capsys, code=2):
    started = time.perf_counter()
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert time.perf_counter() - started < 60  # found before loading, not minutes in
    return err


@pytest.mark.parametrize("component, changes, message", [
    ("transformer", {"num_layers": "1"}, "transformer/config.json: num_layers: expected an integer, got '1'"),
    ("transformer", {"num_layers": 1e9}, "transformer/config.json: num_layers: expected an integer, got 1000000000.0"),
    ("transformer", {"num_layers": 10**9}, "transformer/config.json: num_layers: expected an integer in [1, 512] (the "
                                           "size of a real model), got 1000000000"),
    ("vae", {"latent_channels": 2}, "transformer/config.json: in_channels is 4, but the VAE's latent_channels is 2"),
    ("vae", {"block_out_channels": "wide"}, "vae/config.json: block_out_channels: expected a list of 1 to 16 integers"),
])
@pytest.mark.parametrize("command", ["train", "plan"])
def test_an_implausible_or_mismatched_config_is_one_line_before_loading(flux, tmp_path, capsys, component, changes,
                                                                        message, command):
    folder = edited(flux, tmp_path, component, **changes)
    tail = ["--out", str(tmp_path / "run"), "--no-progress"] if command == "train" else ["--quiet"]
    err = one_line_error([command, f"model.path={folder}", "model.height=16", "model.width=16", *tail], capsys)
    assert err.startswith(f"ngrpo {command}: error: {folder}/") and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing, message", [
    ("scheduler", "scheduler/scheduler_config.json: missing; model_index.json lists the component 'scheduler'"),
    ("text_encoder_2", "text_encoder_2/config.json: missing; model_index.json lists the component 'text_encoder_2'"),
])
def test_a_folder_without_a_component_it_lists_is_refused_before_loading(flux, tmp_path, capsys, missing, message):
    folder = tmp_path / "flux"
    shutil.copytree(flux, folder)
    shutil.rmtree(folder / missing)
    err = one_line_error(["train", f"model.path={folder}", "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert message in err and not (tmp_path / "run").exists()


def test_a_pipeline_without_a_required_component_is_named(flux, tmp_path):
    folder = tmp_path / "flux"
    shutil.copytree(flux, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no 'scheduler' component; a FluxPipeline needs"):
        check_pipeline_folder(folder, "FluxPipeline", loading=True)
    check_pipeline_folder(folder, "FluxPipeline", loading=False)  # the planner reads config.json files only
    check_pipeline_folder(flux, "FluxPipeline", loading=True)  # the untouched folder passes
