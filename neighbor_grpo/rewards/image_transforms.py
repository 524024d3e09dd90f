"""The reward models' image transforms on tensors (no torchvision, no PIL), each as its upstream scorer does it.

Two families: CLIP-style crops (`clip_score`, `pickscore`, `aesthetic`, `image_reward`: shortest side to the model's
size, centre crop) and HPSv2's letterbox (longest side to the model's size, zero padding). The sizes and offsets
are integer rules copied from the references, because a one-pixel difference moves a reward by more than its
noise: a 4:3 image resized to 224 x 299 instead of 224 x 298 moved PickScore by 0.03-0.05 (released weights)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ImageTransform = Callable[[torch.Tensor], torch.Tensor]
CROP_ROUNDINGS = ("floor", "half_even")


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shortest side `size` and the other int(size * long / short), truncated: the rule of
    torchvision's Resize(int) (_compute_resized_output_size) and transformers' get_resize_output_image_size."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def centre_crop_offset(excess: int, rounding: str) -> int:
    """Where a centred crop starts when the image is `excess` pixels larger than the crop. transformers'
    center_crop takes excess // 2 ("floor"); torchvision's CenterCrop int(round(excess / 2.0)), which rounds a
    half to the even neighbour ("half_even"): the two differ by one pixel when excess % 4 == 3."""
    if rounding == "floor":
        return excess // 2
    if rounding == "half_even":
        return int(round(excess / 2.0))
    raise ValueError(f"crop_rounding {rounding!r}: expected one of {CROP_ROUNDINGS}")


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the longest side `size` and the other round(side * size / longest), as HPSv2's
    ResizeMaxSize: Python's round, so a half goes to the even neighbour (47 x 64 at 224 -> 164 x 224)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def letterbox_padding(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Padding to a `size` square in torch's F.pad order (left, right, top, bottom); as HPSv2's ResizeMaxSize, an
    odd remainder puts the extra pixel on the right or at the bottom."""
    pad_h, pad_w = size - height, size - width
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def three_channels(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize (torch's antialias kernel uses PIL's a = -0.5, and is what torchvision's resize
    runs on tensors); a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def resize_center_crop_normalize(images: torch.Tensor, size: int, crop: int, mean: Sequence[float],
                                 std: Sequence[float], crop_rounding: str = "floor") -> torch.Tensor:
    """CLIP's image transform on tensors in [0, 1]: shortest side to `size` (long side truncated, bicubic,
    antialiased), a centred `crop` x `crop` square (offset by `crop_rounding`, see centre_crop_offset), clamped to
    [0, 1] as the references' uint8 images are, then (x - mean) / std. Grey images are repeated to three channels.
    The references resize uint8 PIL images; this resizes floats, so values differ by about 1/255, sizes not at all."""
    images = three_channels(images)
    height, width = shortest_side_size(*images.shape[-2:], size)
    height, width = max(crop, height), max(crop, width)  # a crop larger than `size` (no model here has one)
    images = bicubic(images, (height, width))
    top = centre_crop_offset(height - crop, crop_rounding)
    left = centre_crop_offset(width - crop, crop_rounding)
    images = images[..., top:top + crop, left:left + crop].clamp(0.0, 1.0)
    return normalize(images, mean, std)


def resize_longest_pad_normalize(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                                 fill: float = 0.0) -> torch.Tensor:
    """HPSv2's evaluation transform on tensors in [0, 1] (its open_clip image_transform with resize_longest_max, run
    after ToTensor): longest side to `size` (longest_side_size), bicubic antialiased on the float image, not
    clamped (torchvision clamps only uint8), padded to a square with `fill` (0: black) by letterbox_padding, then
    (x - mean) / std. An image whose longest side is already `size` is padded too (upstream skips the padding
    then and hands the model a non-square image it cannot embed)."""
    images = three_channels(images)
    height, width = longest_side_size(*images.shape[-2:], size)
    images = F.pad(bicubic(images, (height, width)), letterbox_padding(height, width, size), value=fill)
    return normalize(images, mean, std)


def centre_crop_transform(size: int, crop: int, mean: Sequence[float], std: Sequence[float],
                          crop_rounding: str = "floor") -> ImageTransform:
    centre_crop_offset(0, crop_rounding)  # refuse an unknown rounding when the reward is built, not when it scores
    return partial(resize_center_crop_normalize, size=size, crop=crop, mean=tuple(mean), std=tuple(std),
                   crop_rounding=crop_rounding)


def letterbox_transform(size: int, mean: Sequence[float], std: Sequence[float], fill: float = 0.0) -> ImageTransform:
    return partial(resize_longest_pad_normalize, size=size, mean=tuple(mean), std=tuple(std), fill=fill)
