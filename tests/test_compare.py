"""A short version of the side-by-side benchmark (the full one: benchmarks/compare_algorithms.py)."""

import json

import pytest

from neighbor_grpo.compare import ABLATIONS, PAPER_SETTINGS, equal_steps_overrides, time_to_target
from neighbor_grpo.config import load_config


def test_short_comparison_writes_results_in_the_documented_structure(builtin_models, tmp_path):
    from neighbor_grpo.compare import compare

    out = tmp_path / "results.json"
    results = compare(out, budget_s=1.0, lrs=(3e-4,), methods=["neighbor_grpo", "dance_grpo"], evals_per_run=2,
                      eval_samples=2, equal_steps=4, progress=False)
    saved = json.loads(out.read_text())
    assert saved["methods"].keys() == {"neighbor_grpo", "dance_grpo"}
    for table in (saved, saved["equal_steps"]):
        assert isinstance(table["target_reward"], float)
        for metrics in table["methods"].values():
            for key in ("s_per_iter", "model_evals_per_iter", "final_reward", "heldout_reward", "time_to_target_s",
                        "diversity", "out_of_range", "realism", "best_lr"):
                assert key in metrics
    # the default target is the best final held-out reward among the SDE baselines run
    assert saved["target_reward"] == saved["methods"]["dance_grpo"]["heldout_reward"]
    # forward-pass equivalents per iteration: N*P*G rollout + 3 * trained (backward = 2 forwards) + the frozen
    # reference copy's no-grad pass at each trained anchor state (reference anchoring, on by default)
    neighbor = load_config(None, [])
    P, G, N, B = 8, neighbor.neighbor_grpo.group_size, 8, neighbor.neighbor_grpo.num_anchors
    K = neighbor.neighbor_grpo.trained_steps
    assert neighbor.neighbor_grpo.ref_beta > 0
    assert saved["methods"]["neighbor_grpo"]["model_evals_per_iter"] == N * P * G + 3 * K * P * B + K * P * B
    assert saved["methods"]["dance_grpo"]["model_evals_per_iter"] > 5 * saved["methods"]["neighbor_grpo"]["model_evals_per_iter"]
    for name in ("reward_vs_time.png", "reward_vs_evals.png", "results.md"):
        assert (tmp_path / name).is_file()
    assert results["speedup"]["evals_per_iter_dance_over_neighbor"] > 5


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _assert_applied(config, overrides: list[str]) -> None:
    """Every `key=value` override is the loaded config's value (numbers compared as numbers)."""
    for override in overrides:
        key, _, text = override.partition("=")
        value = _setting(config, key)
        if isinstance(value, bool):
            assert value == (text.lower() == "true"), override
        elif isinstance(value, (int, float)):
            assert value == pytest.approx(float(text)), override
        else:
            assert str(value) == text, override


def test_every_method_and_ablation_builds_the_config_it_names():
    algorithm_of = {"neighbor_grpo": "neighbor_grpo", "flow_grpo": "flow_grpo", "dance_grpo": "dance_grpo",
                    "mix_grpo": "mix_grpo", "mix_grpo_flash": "mix_grpo"}
    assert set(PAPER_SETTINGS) == set(algorithm_of)
    for name, overrides in PAPER_SETTINGS.items():
        config = load_config(None, overrides)
        assert config.algorithm == algorithm_of[name]
        assert config.mix_grpo.flash == (name == "mix_grpo_flash")
        _assert_applied(config, overrides)
        short = load_config(None, equal_steps_overrides(name, 8))
        assert _setting(short, f"{algorithm_of[name]}.rollout_steps") == 8
        assert short.algorithm == config.algorithm
        if name.startswith("mix_grpo"):
            assert short.mix_grpo.window_size == 4  # min(4, 8 - 2)
    assert load_config(None, equal_steps_overrides("mix_grpo", 5)).mix_grpo.window_size == 3
    for ablation, variants in ABLATIONS.items():
        for label, overrides in variants.items():
            config = load_config(None, overrides)
            assert config.algorithm == "neighbor_grpo", (ablation, label)
            _assert_applied(config, overrides)
    assert load_config(None, ABLATIONS["p"]["p=2.0"]).neighbor_grpo.quasi_norm_p == 2.0


def test_time_to_target_is_the_first_crossing():
    run = {"curve": {"train_s": [0.0, 1.0, 2.0, 3.0], "heldout": [{"reward": r} for r in (0.5, 0.7, 0.6, 0.9)]}}
    assert time_to_target(run, 0.65) == 1.0
    assert time_to_target(run, 0.95) is None


# Each baseline's settings in its reference repository (docs/benchmarks.md cites file:line for each):
# (max grad norm, weight decay, adam betas, adam eps, PPO clip range, advantage clip)
REFERENCE_SETTINGS = {
    "flow_grpo": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),       # yifan123/flow_grpo config/base.py:63-91
    "dance_grpo": (0.01, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),      # finetune_flux_grpo_8gpus.sh:46-55
    "mix_grpo": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),         # finetune_flux_grpo_MixGRPO.sh:148-157
    "mix_grpo_flash": (1.0, 1e-4, (0.9, 0.999), 1e-8, 1e-4, 5.0),   # finetune_flux_grpo_MixGRPO_Flash.sh:148-157
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SETTINGS))
def test_baselines_compare_with_their_references_optimizer_settings(name):
    import torch

    from neighbor_grpo.speed import make_optimizer

    max_grad_norm, weight_decay, betas, adam_eps, eps_clip, adv_clip = REFERENCE_SETTINGS[name]
    config = load_config(None, PAPER_SETTINGS[name])
    section = getattr(config, config.algorithm)
    assert config.optim.max_grad_norm == max_grad_norm
    assert config.optim.weight_decay == weight_decay
    assert (config.optim.beta1, config.optim.beta2) == betas
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config.optim.lr,
                               (config.optim.beta1, config.optim.beta2), config.optim.weight_decay, config.speed.optimizer)
    assert optimizer.defaults["eps"] == adam_eps and optimizer.defaults["weight_decay"] == weight_decay
    assert section.eps_clip == eps_clip and section.adv_clip == adv_clip
