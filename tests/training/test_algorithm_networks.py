"""Networks an algorithm declares (`networks`): the run builds them as frozen copies of the policy, counts their
passes, hands the algorithm their velocities, checkpoints them (`algorithm_state`) and resumes them exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from neighbor_grpo.algorithms import ALGORITHMS, NeighborGRPO
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.iteration import ModelCallCounter
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.training.trainer import train

SETTINGS = ["iterations=4", "prompts_per_iteration=2", "eval.every=2", "eval.samples_per_prompt=2",
            "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=4",
            "checkpoint_every=2", "keep_checkpoints=3", "optim.lr=1e-3"]


class SoftOldPolicy(NeighborGRPO):
    """Neighbor GRPO that keeps an old policy by soft update and evaluates it once per rollout (as DiffusionNFT
    does): enough to exercise every duty the run has towards an algorithm's own network."""

    networks = ("old_policy",)
    rate = 0.5

    def attach(self, velocities, nets) -> None:
        self.old_velocity, self.old_net = velocities["old_policy"], nets["old_policy"]

    def prepare_old_policy(self, velocity, rollout, batches):
        self.old_velocity(rollout.states[0, :, 0], rollout.sigmas[:1].expand(rollout.states.shape[1]), rollout.cond)
        return super().prepare_old_policy(velocity, rollout, batches)

    @torch.no_grad()
    def after_step(self, net) -> None:
        for old, new in zip(self.old_net.parameters(), net.parameters()):
            old.lerp_(new, self.rate)


def tiny_adapter() -> DigitsAdapter:
    return DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)


def digit_reward(images, prompts):
    return images.mean(dim=(1, 2, 3))


def run(folder, monkeypatch, resume=False, iterations=4):
    monkeypatch.setitem(ALGORITHMS, "neighbor_grpo", SoftOldPolicy)
    config = load_config(None, SETTINGS + [f"iterations={iterations}"])
    from neighbor_grpo.rewards import WeightedRewards

    rewards = WeightedRewards({"brightness_for_test": digit_reward}, {"brightness_for_test": 1.0})
    return train(config, folder, resume=resume, progress=False, adapter=tiny_adapter(), rewards=rewards)


def test_the_run_builds_counts_and_hands_over_the_networks(monkeypatch):
    monkeypatch.setitem(ALGORITHMS, "neighbor_grpo", SoftOldPolicy)
    adapter = tiny_adapter()
    parts = build_training_parts(load_config(None, SETTINGS), adapter)
    old = parts.algorithm_nets["old_policy"]
    assert old is parts.algorithm.old_net and old is not adapter.net
    assert not any(p.requires_grad for p in old.parameters())
    for a, b in zip(old.parameters(), adapter.net.parameters()):
        assert torch.equal(a, b)  # a copy of the policy at the start
    calls = ModelCallCounter(adapter.net, parts.reference_net, *parts.algorithm_nets.values())
    cond = adapter.encode_prompts(["1", "2", "3"])
    parts.algorithm.old_velocity(torch.randn(3, *adapter.latent_shape()), torch.full((3,), 0.5), cond)
    assert calls.reset() == (3, 0)  # its passes are model evaluations like the policy's


def test_soft_update_is_checkpointed_and_resumed_exactly(tmp_path, monkeypatch, single_thread):
    whole = run(tmp_path / "whole", monkeypatch)
    run(tmp_path / "split", monkeypatch, iterations=2)
    config_file = tmp_path / "split" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("iterations: 2", "iterations: 4"))
    split = run(tmp_path / "split", monkeypatch, resume=True)
    saved = load_file(str(tmp_path / "whole" / "checkpoints" / "iter-000002" / "algorithm.safetensors"))
    assert saved and all(key.startswith("old_policy/") for key in saved)
    for name in ("aligned",):
        a = load_file(str(whole.run_dir / name / "model.safetensors"))
        b = load_file(str(split.run_dir / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_whole = load_file(str(tmp_path / "whole" / "checkpoints" / "iter-000004" / "algorithm.safetensors"))
    final_split = load_file(str(tmp_path / "split" / "checkpoints" / "iter-000004" / "algorithm.safetensors"))
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)
    start = load_file(str(tmp_path / "whole" / "base" / "model.safetensors"))
    moved = [k for k in final_whole if not torch.equal(final_whole[k], start[k.split("/", 1)[1]])]
    assert moved, "the soft update never moved the old policy"
