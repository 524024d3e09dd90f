"""The upstream transform outputs committed in tests/rewards/data (written by make_transform_references.py)."""

from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"
SAMPLED = slice(3, None, 7)  # the rows/columns the 224-px references keep


def load_reference(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name) as data:
        return {key: data[key] for key in data.files}


def image_sizes(reference: dict[str, np.ndarray]) -> list[str]:
    """The stored inputs' "HxW" names, e.g. "48x64"."""
    return sorted(key[len("image_"):] for key in reference if key.startswith("image_"))


def as_float(image: np.ndarray) -> torch.Tensor:
    """A stored uint8 (H, W, 3) image as the rewards receive images: (1, 3, H, W) in [0, 1], as ToTensor makes it."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
