"""DiffusionNFT and AWM through the real trainer: train() end to end on a tiny digits model, exact resume, and
the model evaluations of one iteration against the spec's cost figures (competitors.md 1.4 and 2.3) adjusted to
our settings (no CFG, our G and steps)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import config_schedule, forward_equivalents, schedule_forward_counts, schedule_forward_equivalents
from neighbor_grpo.training.iteration import ModelCallCounter, train_iteration
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.training.parts import build_training_parts
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

NETWORK = {"diffusion_nft": "old_policy", "awm": "ema_policy"}


def settings(name: str, iterations: int = 3) -> list[str]:
    extra = ["awm.num_times=2"] if name == "awm" else []
    return [f"algorithm={name}", f"iterations={iterations}", "prompts_per_iteration=2", "eval.every=2",
            "eval.samples_per_prompt=2", f"{name}.group_size=4", f"{name}.rollout_steps=4", "checkpoint_every=2",
            "keep_checkpoints=3", "optim.lr=1e-3", *extra]


def tiny_adapter() -> DigitsAdapter:
    return DigitsAdapter.create(DigitsNetConfig(hidden=16, depth=1, cond_dim=8), seed=0)


def brightness_rewards() -> WeightedRewards:
    return WeightedRewards({"brightness_for_test": lambda images, prompts: images.mean(dim=(1, 2, 3))},
                           {"brightness_for_test": 1.0})


def run(folder, name, iterations, resume=False):
    config = load_config(None, settings(name, iterations))
    return train(config, folder, resume=resume, progress=False, adapter=tiny_adapter(), rewards=brightness_rewards())


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("name", ["diffusion_nft", "awm"])
def test_train_three_iterations_moves_the_policy_and_its_network(tmp_path, name, single_thread):
    result = run(tmp_path / "run", name, 3)
    assert result.iterations == 3
    base = tensors(tmp_path / "run" / "base" / "model.safetensors")
    aligned = tensors(result.run_dir / "aligned" / "model.safetensors")
    assert any(not torch.equal(aligned[k], base[k]) for k in base), "the policy never moved"
    saved = tensors(tmp_path / "run" / "checkpoints" / "iter-000003" / "algorithm.safetensors")
    assert saved and all(k.startswith(NETWORK[name] + "/") for k in saved)
    assert any(not torch.equal(v, base[k.split("/", 1)[1]]) for k, v in saved.items()), "the soft update never ran"
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "policy_loss" in header and "kl_ref" in header


@pytest.mark.parametrize("name", ["diffusion_nft", "awm"])
def test_resume_is_exact(tmp_path, name, single_thread):
    whole = run(tmp_path / "whole", name, 4)
    run(tmp_path / "split", name, 2)
    config_file = tmp_path / "split" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("iterations: 2", "iterations: 4"))
    split = run(tmp_path / "split", name, 4, resume=True)
    final = lambda folder: tmp_path / folder / "checkpoints" / "iter-000004" / "algorithm.safetensors"
    for a, b in [(whole.run_dir / "aligned" / "model.safetensors", split.run_dir / "aligned" / "model.safetensors"),
                 (final("whole"), final("split"))]:
        x, y = tensors(a), tensors(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def iteration_counts(name: str, overrides: list[str]) -> tuple[int, int]:
    """(no-grad, with-grad) per-sample forwards of one iteration through the real iteration code; they equal the
    counts the algorithm's call schedule declares."""
    config = load_config(None, settings(name) + overrides)
    adapter = tiny_adapter()
    parts = build_training_parts(config, adapter)
    calls = ModelCallCounter(adapter.net, parts.reference_net, *parts.algorithm_nets.values())
    train_iteration(config, adapter, brightness_rewards(), parts.algorithm, parts.optimizer, parts.params, parts.ema,
                    parts.reference_velocity, ["0", "1", "2"], 0, lambda event: None, parts=parts)
    no_grad, with_grad = calls.reset()
    implied = schedule_forward_counts(config_schedule(config))
    assert implied["train"] == with_grad and implied["rollout"] + implied["reference"] + implied["other"] == no_grad
    assert schedule_forward_equivalents(config_schedule(config), "full") == forward_equivalents(no_grad, with_grad, "full")
    return no_grad, with_grad


@pytest.mark.parametrize("kl_beta, per_time", [(1e-4, 5), (0.0, 4)])
def test_diffusion_nft_cost_is_the_specs(kl_beta, per_time, single_thread):
    """1.4: rollout N + K_t x (old 1 + trained 3 + reference 1) = 10 + 9 x 5 = 55 per sample; 46 without the KL."""
    no_grad, with_grad = iteration_counts("diffusion_nft", ["diffusion_nft.rollout_steps=10",
                                                            f"diffusion_nft.kl_beta={kl_beta}"])
    samples, K = 2 * 4, 9
    assert with_grad == samples * K
    assert no_grad == samples * (10 + (per_time - 3) * K)
    assert forward_equivalents(no_grad, with_grad, "full") / samples == 10 + per_time * K == (55 if kl_beta else 46)


@pytest.mark.parametrize("kl_beta, ema_beta, per_time", [(1e-4, 1.0, 5), (0.0, 1.0, 4), (1e-4, 0.0, 4)])
def test_awm_cost_is_the_specs(kl_beta, ema_beta, per_time, single_thread):
    """2.3: rollout N + T x (trained 3 + reference 1 + EMA policy 1) = 14 + 6 x 5 = 44 per sample."""
    no_grad, with_grad = iteration_counts("awm", ["awm.rollout_steps=14", "awm.num_times=6", f"awm.kl_beta={kl_beta}",
                                                  f"awm.ema_beta={ema_beta}"])
    samples = 2 * 4
    assert (no_grad, with_grad) == (samples * (14 + (per_time - 3) * 6), samples * 6)
    assert forward_equivalents(no_grad, with_grad, "full") / samples == 14 + per_time * 6 == (44 if per_time == 5 else 38)


def test_minibatch_members_are_keyed_by_each_prompts_own_index():
    """member_minibatches shuffles each prompt's group with its own key: a prompt's split is the same in any batch of
    prompts (or on its own, as on another process), and two prompts get different splits."""
    from neighbor_grpo.algorithms.common import Rollout
    from neighbor_grpo.algorithms.forward_process import member_minibatches
    from neighbor_grpo.maths.flow import sigma_grid

    def split(indices: list[int]) -> list[torch.Tensor]:
        P, G = len(indices), 8
        data = Rollout([str(i) for i in indices], indices, torch.zeros(P, 3), sigma_grid(4), torch.zeros(2, P, G, 5),
                       torch.zeros(1, P, G, 5))
        batches = member_minibatches(data, 2, 3, seed=5, iteration=2)
        assert all(batch.steps == [0, 1, 2] for batch in batches)
        assert all(sorted(torch.cat([b.members[p] for b in batches]).tolist()) == list(range(G)) for p in range(P))
        return [batch.members for batch in batches]

    together = split([3, 7])
    assert not torch.equal(together[0][0], together[0][1])  # the two prompts' splits differ
    for position, index in enumerate([3, 7]):
        alone = split([index])
        assert all(torch.equal(t[position], a[0]) for t, a in zip(together, alone))
