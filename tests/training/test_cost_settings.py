"""neighbor_grpo/training/cost.py: forward-equivalents and the forwards an algorithm's call schedule implies."""

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import (backward_factor, config_schedule, forward_equivalents, schedule_forward_counts,
                                schedule_forward_equivalents)


def test_lora_backward_counts_as_one_forward():
    """The accounting rule itself: a LoRA backward is one forward (input gradients), a full one two."""
    assert backward_factor("full") == 2 and backward_factor("lora") == 1
    assert forward_equivalents(13, 3, "full") == 13 + 3 * 3
    assert forward_equivalents(13, 3, "lora") == 13 + 2 * 3


def test_schedule_counts_follow_the_settings():
    config = load_config(None, ["neighbor_grpo.group_size=6", "neighbor_grpo.num_anchors=2",
                                "neighbor_grpo.rollout_steps=8", "neighbor_grpo.ref_beta=1"])
    counts = schedule_forward_counts(config_schedule(config, prompts=3))
    assert counts == {"rollout": 3 * 6 * 8, "train": 3 * 2 * 4, "reference": 3 * 2 * 4, "other": 0}
    assert schedule_forward_equivalents(config_schedule(config, prompts=3), "lora") == 3 * 6 * 8 + 3 * 2 * 4 * (1 + 2)
    dance = load_config(None, ["algorithm=dance_grpo", "dance_grpo.group_size=4", "dance_grpo.rollout_steps=10"])
    counts = schedule_forward_counts(config_schedule(dance, prompts=2))
    assert counts == {"rollout": 2 * 4 * 10, "train": 2 * 4 * int(0.6 * 9), "reference": 0, "other": 0}


def test_schedule_batches_follow_the_speed_settings():
    """The rollout's calls hold speed.rollout_chunk groups, the training calls speed.micro_batch groups' members;
    the old-policy recompute sees the whole batch (prepare_old_policy is not micro-batched)."""
    config = load_config(None, ["algorithm=flow_grpo", "flow_grpo.group_size=6", "flow_grpo.num_minibatches=4",
                                "flow_grpo.old_policy=recompute", "flow_grpo.kl_beta=0.1", "speed.rollout_chunk=2",
                                "speed.micro_batch=3"])
    batches = {phase.name: phase.batch for phase in config_schedule(config, prompts=8)}
    assert batches == {"rollout": 2 * 6, "old_policy": 8 * 2, "train": 3 * 2, "reference": 3 * 2}  # 6 = 2+2+1+1
