"""neighbor_grpo/runs/training_state.py: a checkpoint written by the trainer before it was split into parts (commit
f4802ab, tests/fixtures/make_run_fixture.py) still loads, and resuming it continues the run exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from neighbor_grpo.runs.checkpoint import read_checkpoint
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train
from neighbor_grpo.runs.training_state import load_state

FIXTURES = Path(__file__).parents[1] / "fixtures"
OLD_RUN = FIXTURES / "run_f4802ab"


def tiny_adapter() -> DigitsAdapter:
    return DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)


def brightness() -> WeightedRewards:
    return WeightedRewards({"brightness": lambda images, prompts: images.mean(dim=(1, 2, 3))}, {"brightness": 1.0})


def test_old_checkpoint_loads_into_the_live_parts():
    config = load_config(OLD_RUN / "config.yaml")
    adapter = tiny_adapter()
    parts = build_training_parts(config, adapter)
    path = OLD_RUN / "checkpoints" / "iter-000002"
    state = load_state(path, adapter.net, parts)
    tensors, plain = read_checkpoint(path)
    assert state.iteration == 2 and state.counters["model_evals"] == plain["counters"]["model_evals"] > 0
    assert state.inputs is None  # written before checkpoints recorded their inputs (resume then checks config.yaml)
    for name, param in adapter.net.named_parameters():
        assert torch.equal(param, tensors["model"][name])
    assert parts.optimizer.state_dict()["state"], "the optimizer moments were not restored"
    assert all(torch.equal(parts.ema.shadow[k], v) for k, v in tensors["ema"].items())


def test_resuming_an_old_run_equals_the_old_uninterrupted_run(tmp_path, single_thread):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    config_file = run / "config.yaml"
    config_file.write_text(config_file.read_text().replace("iterations: 2", "iterations: 3"))
    train(load_config(config_file), run, resume=True, progress=False, adapter=tiny_adapter(), rewards=brightness())
    resumed = load_file(str(run / "aligned" / "model.safetensors"))
    expected = load_file(str(FIXTURES / "run_f4802ab_aligned_after_3.safetensors"))  # the old code, 3 iterations
    assert resumed.keys() == expected.keys()
    for key in expected:  # bitwise on the machine that wrote it; float tolerance elsewhere (another CPU's kernels)
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
