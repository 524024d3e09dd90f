"""`hpsv2`: Human Preference Score v2.1, an OpenCLIP ViT-H/14 fine-tuned on human preferences, run as a
transformers CLIPModel after converting its OpenCLIP keys (no open_clip, no torchvision)."""

from __future__ import annotations

from pathlib import Path

import torch

from neighbor_grpo.runs.io import save_safetensors
from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.clip_rewards import CLIP_H_HOW_TO, ClipSimilarity, load_tokenizer
from neighbor_grpo.rewards.image_transforms import letterbox_transform
from neighbor_grpo.rewards.model_loading import (CLIP_MEAN, CLIP_STD, frozen, import_transformers,
                                                  load_state_dict_file, parse_dtype, require_path)
from neighbor_grpo.rewards.openclip_convert import is_openclip_layout, openclip_to_transformers_clip

HPS_HOW_TO = "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir models/hpsv2"


def load_hpsv2_state(path: Path) -> dict[str, torch.Tensor]:
    """CLIPModel weights from the original .pt (OpenCLIP keys; safe loader only) or a .safetensors file with either
    OpenCLIP keys or already-converted ones."""
    state = load_state_dict_file(path)
    return openclip_to_transformers_clip(state) if is_openclip_layout(state) else state


def convert_hpsv2_checkpoint(source: str | Path, target: str | Path) -> None:
    """HPS_v2.1_compressed.pt -> a .safetensors file with CLIPModel key names (`python -m
    neighbor_grpo.rewards.convert hpsv2 SRC DST`)."""
    save_safetensors(load_hpsv2_state(Path(source)), target)


@register_reward("hpsv2")
def make_hpsv2(path: str, clip_path: str, batch_size: int = 16, device: str | torch.device = "cpu",
               dtype: str = "float32") -> ClipSimilarity:
    """cos(image, prompt) of HPSv2.1's L2-normalised embeddings: HPSv2's `score` takes the diagonal of
    image_features @ text_features.T with normalised features, i.e. a raw cosine (about 0.2-0.35 on real images),
    not multiplied by logit_scale.

    `path`: HPS_v2.1_compressed.pt (or its .safetensors conversion). `clip_path`: a folder with OpenCLIP
    ViT-H/14's transformers config.json and tokenizer (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; its weights are
    not read). Input as HPSv2's own scorer (`create_model_and_transforms(..., light_augmentation=True)`, i.e.
    open_clip's ResizeMaxSize): longest side to 224, bicubic, zero-padded to a square, CLIP mean/std; no crop."""
    checkpoint = require_path(path, "HPSv2 checkpoint", HPS_HOW_TO)
    clip_folder = require_path(clip_path, "OpenCLIP ViT-H/14 config and tokenizer", CLIP_H_HOW_TO, folder=True)
    tokenizer = load_tokenizer(clip_folder, CLIP_H_HOW_TO)
    transformers = import_transformers()
    config = transformers.CLIPConfig.from_pretrained(str(clip_folder), local_files_only=True)
    model = transformers.CLIPModel(config)
    model.load_state_dict(load_hpsv2_state(checkpoint), strict=True)
    model = frozen(model, device, parse_dtype(dtype))
    size = config.vision_config.image_size
    return ClipSimilarity(model, tokenizer, letterbox_transform(size, CLIP_MEAN, CLIP_STD, fill=0.0),
                          scale=1.0, batch_size=batch_size)
