"""The planner's FLOPs per phase (traced under fake tensors from config.json files alone) equal the FLOPs a real
CPU iteration spends in each phase, counted with FlopCounterMode's formulas (CPU attention registered); the phases
sum to the total."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neighbor_grpo.algorithms.common import Phase
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import schedule_forward_equivalents
from neighbor_grpo.models import load_adapter
from neighbor_grpo.plan.planner import plan
from neighbor_grpo.rewards import WeightedRewards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_diffusers  # noqa: E402
from real_iteration import counted_iteration, planned_groups  # noqa: E402

RED = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {"flux": tiny_diffusers.build_flux(root / "flux"), "sd3": tiny_diffusers.build_sd3(root / "sd3")}


def small_run(path: str, algorithm: str, extra: list[str]) -> list[str]:
    section = algorithm
    return [f"model.path={path}", f"algorithm={algorithm}", "prompts_per_iteration=2", "prompts.train=[a cat, a dog]",
            "prompts.eval=[a cat]", f"{section}.group_size=4", f"{section}.rollout_steps=3",
            "rewards=[{name: jpeg_compressibility}]", *extra]


def assert_phases_match(config, adapter, rewards, monkeypatch):
    result = plan(config, gpus=1, gpu="h100-80gb")
    assert sum(result["flops_per_gpu"].values()) == pytest.approx(result["flops_total_per_gpu"], rel=1e-12)
    planned = planned_groups(result)
    real = counted_iteration(config, adapter, rewards, monkeypatch)
    for key in ("policy/rollout", "policy/old", "policy/grad", "reference", "decode"):
        assert planned.get(key, 0.0) == pytest.approx(real.get(key, 0), rel=1e-9), (key, planned, real)
    assert planned["policy/rollout"] > 0 and planned["policy/grad"] > 0
    phases = [Phase(**p) for p in result["phases"]]
    assert result["forward_equivalents_per_sample"] * result["samples_per_gpu"] == pytest.approx(
        schedule_forward_equivalents(phases, config.optim.finetune))
    return result


@pytest.mark.parametrize("kind,algorithm,extra", [
    ("flux", "neighbor_grpo", ["optim.finetune=lora", "neighbor_grpo.ref_beta=1.0"]),
    ("flux", "dance_grpo", ["speed.micro_batch=1"]),
    ("sd3", "neighbor_grpo", ["optim.finetune=lora", "neighbor_grpo.old_policy=recompute"]),
])
def test_planned_flops_equal_a_real_iteration_per_phase(folders, kind, algorithm, extra, monkeypatch):
    torch.manual_seed(0)
    resolution = 32
    overrides = small_run(str(folders[kind]), algorithm, [f"model.height={resolution}", f"model.width={resolution}",
                                                          "model.dtype=float32", "model.max_sequence_length=16", *extra])
    config = load_config(None, overrides)
    adapter = load_adapter(folders[kind], options=config.model)
    assert_phases_match(config, adapter, RED, monkeypatch)


def test_builtin_model_phases(monkeypatch):
    from neighbor_grpo.training.parts import load_model

    config = load_config(None, ["prompts_per_iteration=2", "prompts.train=['1', '7']", "neighbor_grpo.group_size=4",
                                "neighbor_grpo.ref_beta=1.0", "optim.finetune=lora", "rewards=[{name: jpeg_compressibility}]"])
    adapter = load_model(config.model.path, "cpu", progress=False)
    result = assert_phases_match(config, adapter, RED, monkeypatch)
    assert result["resolution"] is None
