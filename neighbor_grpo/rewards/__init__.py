"""Rewards behind one small interface: images in [0, 1] (batch, C, H, W) + prompts -> one score per image.

A reward is any callable with that signature. Register a factory with `@register_reward("name")`, or name a
factory by dotted path (`package.module:make_reward`) in the config. Several rewards combine with weights.
"""

from __future__ import annotations

from neighbor_grpo.config.plugins import resolve_plugin
import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

REWARDS: dict[str, Callable[..., "Reward"]] = {}


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


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


@dataclass
class WeightedRewards:
    """Several named rewards with weights; `score` returns each one's scores, `total` their weighted sum."""

    rewards: dict[str, Reward]
    weights: dict[str, float] = field(default_factory=dict)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        images = images.clamp(0.0, 1.0)
        with torch.no_grad():
            return {name: check_scores(reward(images, prompts), len(prompts), name).to(images.device)
                    for name, reward in self.rewards.items()}

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
from neighbor_grpo.rewards import gold  # noqa: E402,F401  (registers digit_gold)
