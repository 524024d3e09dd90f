"""scikit-learn's bundled handwritten digits as a tiny image dataset (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_PROMPTS = tuple(str(d) for d in range(10))


def load_digits_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as images in [0, 1], shape (n, 1, image_size, image_size), and labels (n,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0), torch.tensor(digits.target, dtype=torch.long)


def train_test_split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of indices, the same for the flow model and the reward classifier."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


def gold_split_b(n: int) -> np.ndarray:
    """Split B: the held-out digits (the test side of `train_test_split`), which only the gold reward
    (neighbor_grpo.rewards.gold) fits on. Split A (the train side) is all the base model and the proxy classifier
    ever train on; tests/rewards/test_gold.py checks that their training never reads B."""
    return train_test_split(n)[1]


def prompt_to_label(prompt: str) -> int:
    """'7' -> 7; anything else is refused with the prompts the built-in model knows."""
    text = prompt.strip()
    if text not in DIGIT_PROMPTS:
        raise ValueError(f"prompt {prompt!r}: the built-in digits model knows only the prompts '0'..'9'")
    return int(text)
