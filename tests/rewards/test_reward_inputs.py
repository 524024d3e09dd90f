"""The reward contract beyond images and prompts: a reward declares `needs` (source images for editing, group ids
for group-wise judges, whole videos) and receives exactly those; videos go frame by frame to image rewards."""

from types import SimpleNamespace

import pytest
import torch

from neighbor_grpo.rewards import REWARD_INPUTS, WeightedRewards, reward_needs
from neighbor_grpo.rewards.retry import with_retries
from neighbor_grpo.training.iteration import score_chunk
from neighbor_grpo.training.monitors import score_model


class Spy:
    """A real reward (mean brightness) that records what it was called with."""

    def __init__(self, needs=()):
        self.needs, self.calls = needs, []

    def __call__(self, images, prompts, **inputs):
        self.calls.append({"shape": tuple(images.shape), "prompts": list(prompts), **inputs})
        return images.flatten(1).mean(dim=1)


def test_a_plain_reward_gets_images_and_prompts_only():
    spy = Spy()
    WeightedRewards({"spy": spy}).score(torch.rand(3, 1, 4, 4), ["a", "b", "c"], source_images=torch.rand(3, 1, 4, 4))
    assert set(spy.calls[0]) == {"shape", "prompts"}


def test_declared_inputs_arrive_and_group_ids_default_to_one_group_per_sample():
    spy = Spy(needs=("group_ids", "source_images"))
    source = torch.rand(4, 3, 4, 4)
    WeightedRewards({"spy": spy}).score(torch.rand(4, 3, 4, 4), list("abcd"), source_images=source)
    assert spy.calls[0]["source_images"] is source
    assert spy.calls[0]["group_ids"].tolist() == [0, 1, 2, 3]
    WeightedRewards({"spy": spy}).score(torch.rand(4, 3, 4, 4), list("abcd"), source_images=source,
                                        group_ids=torch.tensor([5, 5, 7, 7]))
    assert spy.calls[1]["group_ids"].tolist() == [5, 5, 7, 7]


def test_a_missing_or_unknown_input_is_one_line_naming_the_reward():
    with pytest.raises(ValueError, match=r"reward 'judge' needs \['source_images'\].*`image`"):
        WeightedRewards({"judge": Spy(needs=("source_images",))}).score(torch.rand(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match=r"reward 'odd' declares needs \['depth'\]; expected a subset of"):
        reward_needs(Spy(needs=("depth",)), "odd")
    assert set(REWARD_INPUTS) == {"source_images", "group_ids", "video"}


def test_a_video_is_scored_frame_by_frame_unless_the_reward_takes_videos():
    videos = torch.rand(2, 5, 3, 4, 4)  # (batch, T, C, H, W)
    framewise, whole = Spy(needs=("group_ids",)), Spy(needs=("video",))
    whole_scores = lambda images, prompts, **inputs: (whole(images, prompts), images.flatten(1).std(dim=1))[1]
    whole_scores.needs = ("video",)
    scores = WeightedRewards({"frames": framewise, "whole": whole_scores}).score(videos, ["a", "b"])
    torch.testing.assert_close(scores["frames"], videos.flatten(2).mean(dim=2).mean(dim=1))
    assert framewise.calls[0]["shape"] == (10, 3, 4, 4) and framewise.calls[0]["prompts"] == ["a"] * 5 + ["b"] * 5
    assert framewise.calls[0]["group_ids"].tolist() == [0] * 5 + [1] * 5  # the frames of a video stay in its group
    assert whole.calls[0]["shape"] == (2, 5, 3, 4, 4)
    torch.testing.assert_close(scores["whole"], videos.flatten(1).std(dim=1))


def test_retries_pass_the_inputs_and_the_declaration_through():
    spy = Spy(needs=("group_ids",))
    wrapped = with_retries(WeightedRewards({"spy": spy}))
    assert reward_needs(wrapped.rewards["spy"], "spy") == {"group_ids"}
    wrapped.score(torch.rand(2, 1, 2, 2), ["a", "b"], group_ids=torch.tensor([3, 3]))
    assert spy.calls[0]["group_ids"].tolist() == [3, 3]


def test_training_and_evaluation_give_each_group_its_prompt_as_id():
    spy = Spy(needs=("group_ids",))
    rewards = WeightedRewards({"spy": spy})
    adapter = SimpleNamespace(decode=lambda latents: latents)
    rollout = SimpleNamespace(final=torch.rand(2, 3, 1, 4, 4), prompts=["x", "y"], prompt_indices=[7, 2], cond=torch.arange(2))
    scores, _, fault = score_chunk(adapter, rewards, rollout)
    assert not fault and scores["spy"].shape == (2, 3)
    assert spy.calls[0]["group_ids"].tolist() == [7, 7, 7, 2, 2, 2]
    torch.testing.assert_close(scores["spy"], rollout.final.flatten(2).mean(dim=2))


def test_held_out_evaluation_groups_the_samples_of_each_prompt(builtin_models):
    from neighbor_grpo.models import load_adapter

    spy = Spy(needs=("group_ids",))
    adapter = load_adapter(builtin_models["base"])
    score_model(adapter, WeightedRewards({"spy": spy}), ["3", "4"], samples_per_prompt=3, seed=0, steps=2)
    assert spy.calls[0]["group_ids"].tolist() == [0, 0, 0, 1, 1, 1]


def edit_prompts(tmp_path):
    from PIL import Image

    from neighbor_grpo.config.prompts import EditPrompt

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    return [EditPrompt("make it green", tmp_path / "red.png"), EditPrompt("make it green", tmp_path / "blue.png")]


def test_training_and_evaluation_pass_editing_prompts_source_images(tmp_path):
    """score_chunk (training) gives each sample its prompt's source image, at the decoded images' size."""
    spy = Spy(needs=("source_images",))
    adapter = SimpleNamespace(decode=lambda latents: latents)
    rollout = SimpleNamespace(final=torch.rand(2, 3, 3, 4, 4), prompts=edit_prompts(tmp_path), prompt_indices=[0, 1],
                              cond=torch.arange(2))
    scores, _, fault = score_chunk(adapter, WeightedRewards({"spy": spy}), rollout)
    assert not fault and scores["spy"].shape == (2, 3)
    sources = spy.calls[0]["source_images"]
    assert sources.shape == (6, 3, 4, 4)
    assert torch.equal(sources[:3, 0], torch.ones(3, 4, 4)) and torch.equal(sources[3:, 2], torch.ones(3, 4, 4))
    assert torch.equal(sources[3:, 0], torch.zeros(3, 4, 4))


def test_a_reward_that_needs_source_images_is_refused_before_work_without_them(tmp_path):
    from neighbor_grpo.rewards import check_reward_inputs

    rewards = WeightedRewards({"keep": Spy(needs=("source_images",))})
    with pytest.raises(ValueError, match=r"reward 'keep' needs source images, which the training prompts do not"):
        check_reward_inputs(rewards, training=["a cat"])
    with pytest.raises(ValueError, match=r"which the held-out prompts do not have"):
        check_reward_inputs(rewards, training=edit_prompts(tmp_path), held_out=["a cat"])
    check_reward_inputs(rewards, training=edit_prompts(tmp_path), held_out=[])
    check_reward_inputs(WeightedRewards({"plain": Spy()}), training=["a cat"])
