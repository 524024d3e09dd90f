"""The built-in reward model: a small CNN digit classifier; reward = probability of the prompted digit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from neighbor_grpo.builtin.cache import cache_root, settings_key
from neighbor_grpo.builtin.data import prompt_to_label
from neighbor_grpo.runs.io import atomic_write_text, load_safetensors, save_safetensors
from neighbor_grpo.rewards import register_reward


@dataclass
class ClassifierSettings:
    image_size: int = 16
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def default_classifier_dir(settings: ClassifierSettings = ClassifierSettings()) -> Path:
    """The cached classifier that `ngrpo pretrain` builds with these settings."""
    return cache_root() / f"digit-classifier-{settings_key(settings)}"


class DigitClassifier(nn.Module):
    """Three convolutions and a linear head; input (batch, 1, 16, 16) in [0, 1]."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128), nn.SiLU(),
        )
        self.head = nn.Linear(128, 10)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, used by the realism monitor."""
        return self.features(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), folder / "classifier.safetensors")
        atomic_write_text(folder / "classifier.json", json.dumps({"image_size": self.image_size, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "DigitClassifier":
        folder = Path(folder)
        meta_path = folder / "classifier.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no digit classifier here; build one with `ngrpo pretrain` "
                                    "(it writes classifier.json and classifier.safetensors)")
        meta = json.loads(meta_path.read_text())
        model = cls(image_size=int(meta["image_size"]))
        model.load_state_dict(load_safetensors(folder / "classifier.safetensors"))
        return model.to(device).eval().requires_grad_(False)


class DigitProbabilityReward:
    """p(prompted digit | image) under the classifier."""

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        labels = torch.tensor([prompt_to_label(p) for p in prompts], device=images.device)
        probs = self.classifier(images.float()).softmax(-1)
        return probs.gather(1, labels[:, None]).squeeze(1)

    def extra_metrics(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Prompt accuracy: share of images the classifier reads as the prompted digit."""
        labels = torch.tensor([prompt_to_label(p) for p in prompts], device=images.device)
        return {"accuracy": float((self.classifier(images.float()).argmax(-1) == labels).float().mean())}


@register_reward("digit_prob")
def make_digit_probability_reward(path: str | None = None, device: str | torch.device = "cpu") -> DigitProbabilityReward:
    """The built-in reward; `path` defaults to the classifier that `ngrpo pretrain` caches."""
    folder = Path(path) if path else default_classifier_dir()
    return DigitProbabilityReward(DigitClassifier.load(folder, device=device))
