"""Every advantage setting of every algorithm in ALGORITHMS reaches the computation.

Each algorithm's `advantages` and `clip` are checked against formulas written out here (not the library's
helpers), at the default config and with each advantage setting moved away from its default; the moved setting
must change the result on these rewards, so a setting the code ignores fails."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neighbor_grpo.algorithms import (ALGORITHMS, AWMConfig, DanceGRPOConfig, DGPOConfig, DiffusionNFTConfig,
                                     FlowGRPOConfig, MixGRPOConfig, NeighborGRPOConfig)

CONFIGS = {"neighbor_grpo": NeighborGRPOConfig, "flow_grpo": FlowGRPOConfig, "dance_grpo": DanceGRPOConfig,
           "mix_grpo": MixGRPOConfig, "diffusion_nft": DiffusionNFTConfig, "awm": AWMConfig, "dgpo": DGPOConfig}

# The advantage settings each algorithm exposes, and a value far enough from the default to change the result.
MOVED = {
    "neighbor_grpo": {"quasi_norm_p": 1.7, "adv_eps": 0.5, "adv_clip": 0.6, "adv_recenter": True},
    "flow_grpo": {"global_std": False, "adv_eps": 0.5, "adv_clip": 0.6},
    "dance_grpo": {"adv_eps": 0.5, "adv_clip": 0.6},
    "mix_grpo": {"adv_eps": 0.5, "adv_clip": 0.6},
    "diffusion_nft": {"global_std": False, "adv_eps": 0.5, "adv_clip": 0.6},
    "awm": {"global_std": False, "adv_eps": 0.5, "adv_clip": 0.6},
    "dgpo": {"global_std": False, "adv_eps": 0.5, "adv_clip": 0.6},
}

# Settings that only act together with another: re-centring changes nothing unless the clip binds.
TOGETHER_WITH = {("neighbor_grpo", "adv_recenter"): {"adv_clip": 0.6}}

# (P, G) rewards: groups of different spread (so a batch-wide std differs from the per-group one), skewed groups
# (so re-centring after the clip moves them) and large outliers (so a clip of 0.6 binds; 5 binds nowhere).
REWARDS = torch.tensor([[0.0, 0.1, 0.2, 3.0, 0.15, 0.05],
                        [1.0, -2.0, 0.5, 0.4, 0.6, 0.3],
                        [0.2, 0.2, 0.25, 0.2, 0.2, 0.9]], dtype=torch.float64)


def expected_advantages(name: str, config, rewards: torch.Tensor) -> torch.Tensor:
    """Each algorithm's advantage formula, written out from the spec."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if name == "neighbor_grpo":  # Eq. 11: a / ((mean |a|^p)^(1/p) + eps)
        p = config.quasi_norm_p
        return centered / (centered.abs().pow(p).mean(dim=1, keepdim=True).pow(1 / p) + config.adv_eps)
    if name in ("flow_grpo", "diffusion_nft", "awm", "dgpo"):  # population std, of the whole batch (global_std) or of the prompt's group
        if config.global_std:
            std = ((rewards - rewards.mean()) ** 2).mean().sqrt()
        else:
            std = (centered**2).mean(dim=1, keepdim=True).sqrt()
        return centered / (std + config.adv_eps)
    # DanceGRPO and MixGRPO: torch.std (unbiased) per group
    std = (centered**2).sum(dim=1, keepdim=True).div(rewards.shape[1] - 1).sqrt()
    return centered / (std + config.adv_eps)


def expected_clip(config, advantages: torch.Tensor) -> tuple[torch.Tensor, float]:
    if config.adv_clip <= 0:
        return advantages, 0.0
    clipped = advantages.clamp(-config.adv_clip, config.adv_clip)
    if getattr(config, "adv_recenter", False):
        clipped = clipped - clipped.mean(dim=1, keepdim=True)
    return clipped, float((advantages.abs() > config.adv_clip).double().mean())


def run(name: str, config) -> tuple[torch.Tensor, torch.Tensor, float]:
    algorithm = ALGORITHMS[name](config)
    advantages = algorithm.advantages(REWARDS)
    clipped, share = algorithm.clip(advantages)
    return advantages, clipped, share


def test_every_algorithm_and_every_advantage_setting_is_listed():
    """A new algorithm, or a new adv_* setting, must be added to MOVED (and so to these tests)."""
    assert set(MOVED) == set(ALGORITHMS) == set(CONFIGS)
    for name, config_class in CONFIGS.items():
        fields = {f.name for f in dataclasses.fields(config_class)}
        advantage_fields = {f for f in fields if f.startswith("adv_") or f in ("quasi_norm_p", "global_std")}
        assert advantage_fields == set(MOVED[name]), name


@pytest.mark.parametrize("name", sorted(MOVED))
def test_default_advantages_follow_the_formula(name):
    config = CONFIGS[name]()
    advantages, clipped, share = run(name, config)
    expected = expected_advantages(name, config, REWARDS)
    torch.testing.assert_close(advantages, expected)
    expected_clipped, expected_share = expected_clip(config, expected)
    torch.testing.assert_close(clipped, expected_clipped)
    assert share == pytest.approx(expected_share)


@pytest.mark.parametrize("name,setting", [(name, setting) for name in sorted(MOVED) for setting in MOVED[name]])
def test_each_advantage_setting_reaches_the_computation(name, setting):
    default = dataclasses.replace(CONFIGS[name](), **TOGETHER_WITH.get((name, setting), {}))
    moved = dataclasses.replace(default, **{setting: MOVED[name][setting]})
    _, default_clipped, _ = run(name, default)
    advantages, clipped, share = run(name, moved)
    expected = expected_advantages(name, moved, REWARDS)
    torch.testing.assert_close(advantages, expected)
    expected_clipped, expected_share = expected_clip(moved, expected)
    torch.testing.assert_close(clipped, expected_clipped)
    assert share == pytest.approx(expected_share)
    # the setting matters on these rewards: ignoring it would give the default's result
    assert (clipped - default_clipped).abs().max() > 1e-3, f"{name}.{setting} does not change the advantages"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_zero_adv_clip_disables_clipping(name):
    config = dataclasses.replace(CONFIGS[name](), adv_clip=0.0)
    advantages, clipped, share = run(name, config)
    assert torch.equal(advantages, clipped) and share == 0.0
