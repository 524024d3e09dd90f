"""Writes the upstream image-transform outputs the reward tests compare against (run once, offline afterwards):

- hpsv2_transform_reference.npz: pixels from HPSv2's OWN evaluation transform, i.e. what `hpsv2.score` feeds the
  model: `image_transform(224, is_train=False, resize_longest_max=True)` from the `hpsv2` package's bundled
  open_clip (hpsv2/src/open_clip/transform.py, the path `create_model_and_transforms(..., light_augmentation=True)`
  in hpsv2/img_score.py takes). That file is imported from the installed package, not copied: ToTensor, then
  ResizeMaxSize (torchvision resize on the float tensor, zero padding), then Normalize.
- torchvision_crop_reference.npz: ImageReward's `_transform(224)` (ImageReward/ImageReward.py; OpenAI CLIP's
  preprocess, which the LAION aesthetic predictor uses too): torchvision Resize(224, BICUBIC) and CenterCrop(224)
  on the PIL image, ToTensor, Normalize. Built here from torchvision's classes as that file does, because
  importing the ImageReward package pulls in its BLIP model code.

Environment used for the committed files (a private venv; torchvision cannot go into the shared one):
    python -m venv /tmp/hps-venv
    /tmp/hps-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/hps-venv/bin/pip install --no-deps hpsv2==1.2.0
    /tmp/hps-venv/bin/python tests/rewards/data/make_transform_references.py
The inputs are deterministic uint8 images stored in the files, so the tests feed our transforms the same bytes.
Outputs at 224 px are kept at rows and columns 3, 10, ..., 220 (every 7th) to keep the files small; at 32 px (the
tiny test models' input size) they are whole.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

HERE = Path(__file__).resolve().parent
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLED = slice(3, None, 7)  # 32 of 224 rows/columns
# (height, width): 4:3 both ways, 16:9, a half in the short side at 224 (47 * 3.5 = 164.5), an upscale, a square
HPS_SIZES = [(48, 64), (64, 48), (54, 96), (47, 64), (20, 30), (72, 72)]
# 4:3 -> 224 x 298, 16:9 -> 224 x 398, 74 x 99 -> 224 x 299 (crop offset 37 in transformers, 38 in torchvision)
CROP_SIZES = [(48, 64), (64, 48), (54, 96), (74, 99)]


def pattern_image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour ramps, a sharp bright box and pixel noise: resize, padding and crop offsets all show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    ramps = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 160
    ramps[height // 4: height // 2, width // 3: width // 2] = 230
    return np.clip(ramps + rng.integers(0, 64, size=(height, width, 3)), 0, 255).astype(np.uint8)


def hpsv2_transform_module():
    """hpsv2/src/open_clip/transform.py from the installed hpsv2 package, loaded under a bare parent package so its
    `from .constants import ...` resolves without running hpsv2/__init__.py (which imports the whole model code)."""
    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        raise SystemExit("hpsv2 is not installed here: pip install --no-deps hpsv2==1.2.0")
    folder = Path(spec.submodule_search_locations[0]) / "src" / "open_clip"
    parent = types.ModuleType("hpsv2_open_clip")
    parent.__path__ = [str(folder)]
    sys.modules[parent.__name__] = parent
    module_spec = importlib.util.spec_from_file_location("hpsv2_open_clip.transform", folder / "transform.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module, folder / "transform.py"


def imagereward_transform(size: int):
    """ImageReward/ImageReward.py `_transform(n_px)`, with torchvision's classes (RGB conversion is a no-op here)."""
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                    Normalize(CLIP_MEAN, CLIP_STD)])


def run(transform, image: np.ndarray) -> np.ndarray:
    return transform(Image.fromarray(image)).numpy().astype(np.float32)


def versions(extra: str) -> str:
    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, pillow {Image.__version__}; {extra}"


def main() -> None:
    transform_module, source = hpsv2_transform_module()
    sizes = list(dict.fromkeys(HPS_SIZES + CROP_SIZES))
    images = {f"image_{h}x{w}": pattern_image(h, w, seed) for seed, (h, w) in enumerate(sizes)}
    hps = {}
    for h, w in HPS_SIZES:
        name = f"image_{h}x{w}"
        hps[name] = images[name]
        at_224 = transform_module.image_transform(224, is_train=False, resize_longest_max=True)
        at_32 = transform_module.image_transform(32, is_train=False, resize_longest_max=True)
        hps[f"hps224_{h}x{w}"] = run(at_224, images[name])[:, SAMPLED, SAMPLED]
        hps[f"hps32_{h}x{w}"] = run(at_32, images[name])
    where = source.relative_to(source.parents[3])
    hps["source"] = np.array(versions(f"hpsv2 {importlib.metadata.version('hpsv2')}: {where}, resize_longest_max"))
    np.savez_compressed(HERE / "hpsv2_transform_reference.npz", **hps)
    crops = {}
    for h, w in CROP_SIZES:
        name = f"image_{h}x{w}"
        crops[name] = images[name]
        crops[f"crop224_{h}x{w}"] = run(imagereward_transform(224), images[name])[:, SAMPLED, SAMPLED]
    crops["source"] = np.array(versions("ImageReward's _transform(224) built from torchvision"))
    np.savez_compressed(HERE / "torchvision_crop_reference.npz", **crops)


if __name__ == "__main__":
    main()
