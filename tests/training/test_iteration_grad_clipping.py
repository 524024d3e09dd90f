"""iteration.train_iteration logs `grad_clipped_share`: the share of optimizer steps whose gradient norm was above
optim.max_grad_norm (DanceGRPO's FLUX recipe clips at 0.01, so nearly every step is clipped there)."""

from __future__ import annotations

import pytest
import torch

from neighbor_grpo.algorithms.dance_grpo import DanceGRPO, DanceGRPOConfig
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.iteration import train_iteration

pytestmark = pytest.mark.usefixtures("single_thread")

REAL_CLIP = torch.nn.utils.clip_grad_norm_


def brightness(images, prompts):
    return images.flatten(1).mean(1)


def run(max_grad_norm: float, monkeypatch) -> tuple[dict, list[float]]:
    """One DanceGRPO iteration (3 optimizer steps) with lr 0, so every call sees the same gradients."""
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=1, cond_dim=16), seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in adapter.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    norms = []

    def recording_clip(params, max_norm, *args, **kwargs):
        norm = REAL_CLIP(params, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    config = load_config(None, ["algorithm=dance_grpo", "prompts_per_iteration=2", f"optim.max_grad_norm={max_grad_norm}"])
    algorithm = DanceGRPO(DanceGRPOConfig(group_size=6, rollout_steps=5, num_minibatches=3), seed=0)
    params = list(adapter.net.parameters())
    values, skipped = train_iteration(config, adapter, WeightedRewards({"brightness": brightness}), algorithm,
                                      torch.optim.SGD(params, lr=0.0), params, None, None, ["1", "7"], 0,
                                      lambda point: None)
    assert skipped == ""
    return values, norms


def test_grad_clipped_share_counts_the_steps_above_the_threshold(monkeypatch):
    values, norms = run(0.0, monkeypatch)  # 0 disables clipping: nothing counted
    assert len(norms) == 3 and len(set(norms)) == 3 and min(norms) > 0
    assert values["grad_clipped_share"] == 0.0
    assert run(1e-12, monkeypatch)[0]["grad_clipped_share"] == 1.0
    assert run(1e12, monkeypatch)[0]["grad_clipped_share"] == 0.0
    ordered = sorted(norms)
    for threshold, share in (((ordered[0] + ordered[1]) / 2, 2 / 3), ((ordered[1] + ordered[2]) / 2, 1 / 3)):
        values, again = run(threshold, monkeypatch)
        assert again == pytest.approx(norms)  # lr 0: the same gradients every time
        assert values["grad_clipped_share"] == pytest.approx(share)
