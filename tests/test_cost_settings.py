"""neighbor_grpo/cost.py: forward-equivalents and the forwards an algorithm's settings imply."""

from neighbor_grpo.config import load_config
from neighbor_grpo.cost import analytic_forward_counts, backward_factor, forward_equivalents


def test_lora_backward_counts_as_one_forward():
    """The accounting rule itself: a LoRA backward is one forward (input gradients), a full one two."""
    assert backward_factor("full") == 2 and backward_factor("lora") == 1
    assert forward_equivalents(13, 3, "full") == 13 + 3 * 3
    assert forward_equivalents(13, 3, "lora") == 13 + 2 * 3


def test_analytic_counts_follow_the_settings():
    config = load_config(None, ["neighbor_grpo.group_size=6", "neighbor_grpo.num_anchors=2",
                                "neighbor_grpo.rollout_steps=8", "neighbor_grpo.ref_beta=1"])
    counts = analytic_forward_counts(config, prompts=3)
    assert counts == {"rollout": 3 * 6 * 8, "train": 3 * 2 * 4, "reference": 3 * 2 * 4, "other": 0}
    dance = load_config(None, ["algorithm=dance_grpo", "dance_grpo.group_size=4", "dance_grpo.rollout_steps=10"])
    counts = analytic_forward_counts(dance, prompts=2)
    assert counts["rollout"] == 2 * 4 * 10 and counts["train"] % (2 * 4) == 0
