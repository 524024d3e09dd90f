"""Video latents (batch, C, T, H, W) through every algorithm unchanged: one short training run each, through the real
trainer, with a tiny random video model; and the per-sample reductions of each algorithm checked against the same
latents flattened to 4-D (an algorithm that assumed 4-D latents would reduce over the wrong dimensions)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.training.trainer import train

pytestmark = pytest.mark.usefixtures("single_thread")

VIDEO = (2, 3, 4, 4)  # (C, T, H, W) latents; decoded to (T, 3, 4, 4) frames


class TinyVideoNet(nn.Module):
    def __init__(self, shape=VIDEO, hidden: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.shape = shape
        self.embed = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(math.prod(shape) + 1 + 8, hidden)
        self.fc2 = nn.Linear(hidden, math.prod(shape))

    def forward(self, x, s, labels):
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.cat([x.flatten(1), s, self.embed(labels)], dim=1)
        return self.fc2(torch.nn.functional.silu(self.fc1(h))).view(x.shape)


class TinyVideoAdapter:
    """The adapter contract with video latents: prompts are digits, videos (batch, T, 3, H, W)."""

    def __init__(self, shape=VIDEO):
        self.net = TinyVideoNet(shape)
        self.shape = shape

    @property
    def device(self):
        return torch.device("cpu")

    def latent_shape(self):
        return self.shape

    def encode_prompts(self, prompts):
        return torch.tensor([int(p) for p in prompts], dtype=torch.long)

    def velocity(self, x, s, cond):
        return self.net(x, s, cond)

    def decode(self, latents):
        frames = (latents[:, :1].expand(-1, 3, -1, -1, -1) + 1) / 2  # (batch, 3, T, H, W)
        return frames.permute(0, 2, 1, 3, 4)

    def save(self, folder, extra=None):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "model.json", json.dumps({"adapter": "tiny-video", **(extra or {})}))


def red_frames(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def steadiness(videos, prompts):
    return -(videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


steadiness.needs = ("video",)

SETTINGS = {  # small groups and grids: each run is a few seconds
    "neighbor_grpo": ["neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=3"],
    "flow_grpo": ["flow_grpo.group_size=4", "flow_grpo.rollout_steps=3", "flow_grpo.num_minibatches=1"],
    "dance_grpo": ["dance_grpo.group_size=4", "dance_grpo.rollout_steps=3", "dance_grpo.num_minibatches=1"],
    "mix_grpo": ["mix_grpo.group_size=4", "mix_grpo.rollout_steps=4", "mix_grpo.window_size=2", "mix_grpo.num_minibatches=1"],
    "diffusion_nft": ["diffusion_nft.group_size=4", "diffusion_nft.rollout_steps=3"],
    "awm": ["awm.group_size=4", "awm.rollout_steps=4", "awm.num_times=2"],
    "dgpo": ["dgpo.group_size=4", "dgpo.rollout_steps=3", "dgpo.trunc_steps=1", "dgpo.num_times=2"],
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_on_video_latents(algorithm, tmp_path):
    assert set(SETTINGS) == set(ALGORITHMS)
    config = load_config(None, [f"algorithm={algorithm}", "iterations=2", "prompts_per_iteration=2",
                                "eval.samples_per_prompt=2", "eval.steps=2", "eval.every=0", "optim.lr=1e-3",
                                "optim.finetune=full", "prompts.train=['1', '2', '3']", "prompts.eval=['4']",
                                *SETTINGS[algorithm]])
    rewards = WeightedRewards({"red": red_frames, "steady": steadiness}, {"red": 1.0, "steady": 1.0})
    adapter = TinyVideoAdapter()
    before = [p.detach().clone() for p in adapter.net.parameters()]
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=rewards)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.net.parameters()))
    after = json.loads((result.run_dir / "eval_after.json").read_text())
    assert "temporal_difference" in json.dumps(after)
    assert (result.run_dir / "samples").is_dir() and any((result.run_dir / "samples").glob("*.png"))


@pytest.mark.parametrize("algorithm", ["neighbor_grpo", "flow_grpo", "diffusion_nft", "awm"])
def test_the_loss_is_the_same_for_video_latents_flattened_to_images(algorithm):
    """A video (C, T, H, W) and the same numbers as an image (C * T, H, W) give the same loss: every reduction over
    the latent is over all of its dimensions."""
    losses = []
    for shape in (VIDEO, (VIDEO[0] * VIDEO[1], *VIDEO[2:])):
        config = load_config(None, [f"algorithm={algorithm}", *SETTINGS[algorithm]])
        method = ALGORITHMS[algorithm](getattr(config, algorithm), seed=3)
        net = TinyVideoNet(VIDEO)

        def velocity(x, s, cond, shape=shape):  # the same network on the same numbers, whatever the layout
            return net(x.reshape(x.shape[0], *VIDEO), s, cond).reshape(x.shape)

        cond = torch.tensor([1, 2])
        rollout = method.rollout(velocity, cond, ["1", "2"], [0, 1], 0, shape)
        rewards = rollout.final.flatten(2).mean(-1)
        advantages, _ = method.clip(method.advantages(rewards))
        batch = method.minibatches(rollout, 0)[0]
        rollout = method.prepare_old_policy(velocity, rollout, [batch]) if hasattr(method, "prepare_old_policy") else rollout
        loss, _ = method.loss(velocity, rollout, advantages, batch)
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
