"""neighbor_grpo/plan/rewards.py: what a reward costs the training GPU; rewards served elsewhere cost nothing here,
a win rate costs its comparator."""

from neighbor_grpo.plan.rewards import reward_estimate


def test_served_rewards_cost_nothing_here_and_a_win_rate_costs_its_comparator():
    assert reward_estimate("remote", {"url": "http://h:8100"}) == reward_estimate("remote", {})
    assert reward_estimate("remote", {}).weight_bytes == 0 and reward_estimate("remote", {}).known
    endpoint = reward_estimate("vlm_judge", {"base_url": "http://h:8001/v1", "model": "judge"})
    assert endpoint.known and endpoint.weight_bytes == 0
    assert not reward_estimate("vlm_judge", {"path": "models/Qwen2.5-VL-7B-Instruct"}).known  # in process: unknown size
    pickscore = reward_estimate("pickscore", {"dtype": "bfloat16"})
    wins = reward_estimate("pairwise_win_rate", {"comparator": {"name": "pickscore", "kwargs": {"dtype": "bfloat16"}}})
    assert (wins.weight_bytes, wins.flops_per_image, wins.known) == (pickscore.weight_bytes, pickscore.flops_per_image, True)
    assert pickscore.weight_bytes == 986e6 * 2
