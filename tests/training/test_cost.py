"""Forward-equivalents, defined once (neighbor_grpo.training.cost), and the trainer's counters that use them."""

import csv

import pytest

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import backward_factor, cost_note, forward_equivalents
from neighbor_grpo.training.trainer import train


def test_backward_costs_two_forwards_for_a_full_fine_tune_and_one_for_lora():
    assert backward_factor("full") == 2.0 and backward_factor("lora") == 1.0
    assert forward_equivalents(100, 10, "full") == 100 + 3 * 10
    assert forward_equivalents(100, 10, "lora") == 100 + 2 * 10
    assert "b = 2" in cost_note("full") and "b = 1" in cost_note("lora")


def test_bad_inputs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="finetune: expected one of"):
        backward_factor("qlora")
    with pytest.raises(ValueError, match="forward counts must be >= 0"):
        forward_equivalents(-1, 0, "full")


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_trainer_logs_iteration_cost_by_the_same_rule(builtin_models, tmp_path, single_thread, finetune):
    # ref_beta 0: no reference passes, so the counts follow from the settings alone
    config = load_config(None, ["iterations=1", "prompts_per_iteration=2", "eval.every=0", "eval.samples_per_prompt=2",
                                "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2", "neighbor_grpo.ref_beta=0",
                                f"optim.finetune={finetune}"])
    train(config, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("model_evals_per_iter"))
    c = config.neighbor_grpo
    rollout = 2 * c.group_size * c.rollout_steps
    trained = 2 * c.num_anchors * c.trained_steps
    assert float(row["model_evals_rollout"]) == rollout
    assert float(row["model_evals_per_iter"]) == rollout + (1 + backward_factor(finetune)) * trained
