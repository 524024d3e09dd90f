"""Validity checks of the digits gold (issue 14, item 1), pre-registered with their thresholds.

They run in tests/rewards/test_gold.py and benchmarks/gold_validation.py (which records the numbers). A check
that fails means the gold does not discriminate; the gold and the hack run are never changed to pass one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neighbor_grpo.builtin.data import DIGIT_PROMPTS, load_digits_images, train_test_split

THRESHOLDS = {"gold_class_accuracy_on_a": 0.95, "typical_share_on_a": 0.9, "spearman_proxy_gold_base": 0.5,
              "hack_proxy_minus_gold": 0.3}
SPEARMAN_SAMPLES = {"prompts": list(DIGIT_PROMPTS), "samples_per_prompt": 32, "seed": 1_000_003, "solver": "dpm++2m",
                    "steps": 8}
"""The base-model samples of the Spearman check: the held-out noises of `ngrpo train`'s default eval seed."""


def split_a(image_size: int = 16) -> tuple[torch.Tensor, list[str]]:
    """Split A's real digits (what the base model and the proxy train on) and their labels as prompts."""
    images, labels = load_digits_images(image_size)
    a = train_test_split(len(labels))[0]
    return images[a], [str(int(y)) for y in labels[a]]


def gold_class_accuracy_on_a(gold) -> float:
    """Share of A's digits (never seen by the gold) whose most probable gold class is their label."""
    from neighbor_grpo.rewards.gold import user_view

    images, prompts = split_a(gold.settings.image_size)
    predicted = gold.classifier.predict_proba(user_view(images, gold.settings)).argmax(axis=1)
    return float(np.mean(predicted == np.array([int(p) for p in prompts])))


def typical_share_on_a(gold) -> float:
    """Share of A's real digits that pass `typical` for their own class, through the same preprocessing."""
    images, prompts = split_a(gold.settings.image_size)
    return float(gold.components(images, prompts)["typical"].mean())


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (the gold has many exact zeros)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    rx, ry = average_ranks(np.asarray(x)), average_ranks(np.asarray(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def proxy_and_gold_on_base(base_dir: str | Path, classifier_dir: str | Path, gold) -> dict[str, np.ndarray]:
    """Per-image proxy (digit_prob) and gold components on the base model's samples (SPEARMAN_SAMPLES)."""
    from neighbor_grpo.models import load_adapter
    from neighbor_grpo.training.monitors import generate
    from neighbor_grpo.rewards.digit_classifier import make_digit_probability_reward

    adapter = load_adapter(base_dir)
    s = SPEARMAN_SAMPLES
    _, images = generate(adapter, s["prompts"], s["samples_per_prompt"], s["seed"], s["solver"], s["steps"])
    flat = images.flatten(0, 1)
    prompts = [p for p in s["prompts"] for _ in range(s["samples_per_prompt"])]
    with torch.no_grad():
        proxy = make_digit_probability_reward(str(classifier_dir))(flat.clamp(0, 1), prompts)
    parts = gold.components(flat, prompts)
    return {"proxy": proxy.numpy(), **{k: v.numpy() for k, v in parts.items()}}
