"""A model-free reward: JPEG compressibility (as in DDPO), minus the encoded size in kilobytes."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch

from neighbor_grpo.rewards import register_reward


class JpegCompressibility:
    def __init__(self, quality: int = 95):
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        sizes = []
        for image in pixels:
            array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility")
def make_jpeg_compressibility(quality: int = 95) -> JpegCompressibility:
    return JpegCompressibility(quality)
