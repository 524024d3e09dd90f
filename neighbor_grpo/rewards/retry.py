"""A reward that raises is retried once on the same images; a second failure stops the run (resumable)."""

from __future__ import annotations

import dataclasses
import warnings

from neighbor_grpo.rewards import WeightedRewards


class RewardFailed(RuntimeError):
    """A reward raised twice in a row on the same images (it is retried once)."""


class RetryOnce:
    """Wraps one reward: an exception is retried once on the same images, a second one stops the run.
    (A NaN/inf *score* is not an exception here: `check_scores` turns it into a skipped update.)"""

    def __init__(self, name: str, reward):
        self.name, self.reward = name, reward

    def __call__(self, images, prompts, **inputs):
        try:
            return self.reward(images, prompts, **inputs)
        except Exception as error:
            warnings.warn(f"reward {self.name!r} raised {type(error).__name__}: {error}; retrying once")
            try:
                return self.reward(images, prompts, **inputs)
            except Exception as again:
                raise RewardFailed(f"reward {self.name!r} failed twice in a row ({type(again).__name__}: {again}); "
                                   "the run stops. Fix the reward, then continue with `ngrpo train --resume RUN` "
                                   "(train(..., resume=True))") from again

    def __getattr__(self, name: str):  # extra_metrics and the like come from the wrapped reward
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)


def with_retries(rewards):
    """Every reward of a WeightedRewards wrapped in RetryOnce (other reward objects as they are)."""
    if isinstance(rewards, WeightedRewards):
        wrapped = {n: r if isinstance(r, RetryOnce) else RetryOnce(n, r) for n, r in rewards.rewards.items()}
        return dataclasses.replace(rewards, rewards=wrapped)
    return rewards
