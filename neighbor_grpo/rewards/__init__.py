"""Rewards behind one small interface: images in [0, 1] (batch, C, H, W) + prompts -> one score per image.

A reward is any callable with that signature. Register a factory with `@register_reward("name")`, or name a
factory by dotted path (`package.module:make_reward`) in the config. Several rewards combine with weights.

A reward that needs more than the images and prompts declares it in an attribute `needs` (names from
`REWARD_INPUTS`) and receives those as keyword arguments: `source_images` (editing: the condition image of each
sample), `group_ids` (which group each sample belongs to: a group-wise reward scores whole groups together),
`video` (it takes videos (batch, T, C, H, W) whole; any other reward scores a video frame by frame and gets the
mean over frames). One contract for editing, group-wise judges and video; see docs/rewards.md.
"""

from __future__ import annotations

from neighbor_grpo.config.plugins import resolve_plugin
import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

REWARDS: dict[str, Callable[..., "Reward"]] = {}


REWARD_INPUTS = {
    "source_images": "the source image of each sample (editing), float (batch, C, H, W) in [0, 1]",
    "group_ids": "the group of each sample, int64 (batch,): samples of one prompt's group share an id",
    "video": "videos whole, (batch, T, C, H, W), instead of one frame at a time",
}


class Reward(Protocol):
    """`reward(images, prompts, **inputs) -> scores (batch,)`; `needs` (optional): which REWARD_INPUTS it takes."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def reward_needs(reward: Reward, name: str) -> frozenset[str]:
    """What a reward declared it needs beyond images and prompts, checked against REWARD_INPUTS."""
    needs = getattr(reward, "needs", ())
    needs = frozenset([needs] if isinstance(needs, str) else needs)
    unknown = sorted(needs - REWARD_INPUTS.keys())
    if unknown:
        raise ValueError(f"reward {name!r} declares needs {unknown}; expected a subset of {sorted(REWARD_INPUTS)}")
    return needs


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: make a reward factory buildable by `name` from a config."""

    def add(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REWARDS[name] = factory
        return factory

    return add


def resolve_reward_factory(name: str) -> Callable[..., Reward]:
    """A registered entry by name, or a user's object by dotted path."""
    return resolve_plugin(name, REWARDS, "reward", "package.module:factory")


def check_scores(scores: object, count: int, name: str) -> torch.Tensor:
    """A reward's output must be `count` finite floats; anything else is refused with a message naming it."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"reward {name!r} returned {type(scores).__name__}; expected a torch.Tensor of shape ({count},)")
    if scores.shape != (count,):
        raise ValueError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}; expected ({count},), one per image")
    if not torch.is_floating_point(scores):
        raise TypeError(f"reward {name!r} returned dtype {scores.dtype}; expected a floating-point tensor")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).sum())
        raise FloatingPointError(f"reward {name!r} returned {bad} non-finite score(s) (NaN or inf) out of {count}")
    return scores.float()


def score_one(name: str, reward: Reward, images: torch.Tensor, prompts: Sequence[str], inputs: dict) -> torch.Tensor:
    """One reward's call with the inputs it declared; a video goes frame by frame to a reward that takes images."""
    needs = reward_needs(reward, name)
    missing = [key for key in sorted(needs - {"video"}) if inputs.get(key) is None]
    if missing:
        raise ValueError(f"reward {name!r} needs {missing}, which these prompts do not have"
                         + (" (editing prompts: a JSONL prompt set whose rows give an `image`)"
                            if "source_images" in missing else ""))
    kwargs = {key: inputs[key] for key in needs - {"video"}}
    if images.dim() == 5 and "video" not in needs:
        batch, frames = images.shape[:2]
        per_frame = {key: value.repeat_interleave(frames, dim=0) for key, value in kwargs.items()}
        scores = reward(images.flatten(0, 1), [p for p in prompts for _ in range(frames)], **per_frame)
        return check_scores(scores, batch * frames, name).view(batch, frames).mean(dim=1)
    return reward(images, prompts, **kwargs)


def check_reward_inputs(rewards: "WeightedRewards", **prompt_sets: Sequence[str]) -> None:
    """Before any work: a reward that needs source images, given a prompt set (named by its keyword, e.g.
    training=...) whose prompts carry none, is one clear error."""
    from neighbor_grpo.config.prompts import source_image_paths

    for where, prompts in prompt_sets.items():
        if not prompts or source_image_paths(prompts) is not None:
            continue
        for name, reward in rewards.rewards.items():
            if "source_images" in reward_needs(reward, name):
                raise ValueError(f"reward {name!r} needs source images, which the {where.replace('_', '-')} prompts "
                                 "do not have (editing prompts: a JSONL prompt set whose rows give an `image`)")


@dataclass
class WeightedRewards:
    """Several named rewards with weights; `score` returns each one's scores, `total` their weighted sum."""

    rewards: dict[str, Reward]
    weights: dict[str, float] = field(default_factory=dict)

    def score(self, images: torch.Tensor, prompts: Sequence[str], source_images: torch.Tensor | None = None,
              group_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each reward's scores of `images` (batch, C, H, W), or videos (batch, T, C, H, W). `group_ids` defaults to
        one group per sample; `source_images` only exist for editing prompts."""
        images = images.clamp(0.0, 1.0)
        inputs = {"source_images": source_images, "group_ids": group_ids}
        if group_ids is None:
            inputs["group_ids"] = torch.arange(len(prompts), device=images.device)
        with torch.no_grad():
            return {name: check_scores(score_one(name, reward, images, prompts, inputs), len(prompts), name)
                    .to(images.device) for name, reward in self.rewards.items()}

    def total(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(name, 1.0) * value for name, value in scores.items())


def build_rewards(specs: Sequence[dict], device: str | torch.device = "cpu") -> WeightedRewards:
    """From config entries {name, weight, kwargs, label} to a WeightedRewards keyed by label (else name)."""
    rewards, weights = {}, {}
    for spec in specs:
        name = spec["name"]
        key = spec.get("label") or name
        if key in weights:  # one would silently replace the other
            raise ValueError(f"reward {key!r} is given twice; give one of them a distinct label (e.g. {key}_2)")
        weights[key] = float(spec.get("weight", 1.0))
        factory = resolve_reward_factory(name)
        kwargs = dict(spec.get("kwargs") or {})
        if "device" in inspect.signature(factory).parameters:
            kwargs.setdefault("device", device)
        rewards[key] = factory(**kwargs)
    return WeightedRewards(rewards, weights)


from neighbor_grpo.rewards import compressibility, digit_classifier  # noqa: E402,F401  (registers them)
from neighbor_grpo.rewards import aesthetic, clip_rewards, hpsv2, image_reward, ocr  # noqa: E402,F401  (registers them)
from neighbor_grpo.rewards import gold, tesseract  # noqa: E402,F401  (registers digit_gold, ocr_tesseract)
from neighbor_grpo.rewards import remote  # noqa: E402,F401  (registers remote; httpx is imported when one is built)
from neighbor_grpo.rewards import judge  # noqa: E402,F401  (registers vlm_judge; transformers/httpx load when one is built)
from neighbor_grpo.rewards import group_rewards  # noqa: E402,F401  (registers pairwise_win_rate)
