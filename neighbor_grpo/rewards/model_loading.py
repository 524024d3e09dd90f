"""Shared plumbing for rewards backed by pretrained networks: optional imports, local-only weights, safe loading,
the image processor's settings and scoring in chunks on the model's device (the image transforms themselves are in
image_transforms.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

# CLIP's normalisation constants (OpenAI CLIP, OpenCLIP's defaults, BLIP and ImageReward use the same values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def import_transformers():
    """transformers, or an error naming the extra that installs it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError('this reward needs transformers: pip install "neighbor-grpo[diffusers]"') from error
    return transformers


def require_path(path: str | Path | None, what: str, how_to_get: str, folder: bool = False) -> Path:
    """The local file or folder a reward reads; missing ones are refused with the command that fetches them."""
    if not path:
        raise ValueError(f"{what}: no path given; pass kwargs.path. To get the files: {how_to_get}")
    path = Path(path).expanduser()
    exists = path.is_dir() if folder else path.is_file()
    if not exists:
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{path}: {what} {kind} not found (nothing is downloaded at run time). "
                                f"To get it: {how_to_get}")
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a torch pickle through the safe loader only (weights_only=True,
    which refuses arbitrary objects); a `state_dict` wrapper and DataParallel's `module.` prefix are removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from neighbor_grpo.runs.io import load_safetensors

        state = load_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({error}); "
                             "only plain tensor checkpoints are accepted, never arbitrary pickles") from error
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of names to tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def frozen(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode (dropout off), no gradients, on the reward's device and dtype."""
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in named:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(named)}")
    return named[dtype]


def read_image_processor_config(folder: Path, default_size: int = 224) -> tuple[int, int, tuple, tuple]:
    """(resize shortest side, crop size, mean, std) from a transformers `preprocessor_config.json`; read as JSON
    so the tensor transform in image_transforms.py, not an image processor class, does the work. Without the file: CLIP's transform
    at the model's own input size."""
    config_path = folder / "preprocessor_config.json"
    if not config_path.is_file():
        return default_size, default_size, CLIP_MEAN, CLIP_STD
    config = json.loads(config_path.read_text())
    size = config.get("size", default_size)
    size = size.get("shortest_edge", size.get("height", default_size)) if isinstance(size, dict) else size
    crop = config.get("crop_size", size)
    crop = crop.get("height", size) if isinstance(crop, dict) else crop
    return int(size), int(crop), tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


def score_in_chunks(score_chunk: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], images: torch.Tensor,
                    prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Scores of `batch_size` images at a time, concatenated as float32 on the images' device."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    with torch.no_grad():
        scores = [score_chunk(images[start:start + batch_size], list(prompts[start:start + batch_size])).float()
                  for start in range(0, len(images), batch_size)]
    return torch.cat(scores).to(images.device)
