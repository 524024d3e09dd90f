"""`aesthetic`: the LAION aesthetic predictor v2 (improved-aesthetic-predictor), an MLP on L2-normalised CLIP
ViT-L/14 image embeddings that predicts a 1-10 rating. The prompt is not used."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from neighbor_grpo.runs.io import save_safetensors
from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.clip_rewards import CLIP_HOW_TO, clip_image_embeddings, load_clip_model
from neighbor_grpo.rewards.image_transforms import ImageTransform, centre_crop_transform
from neighbor_grpo.rewards.model_loading import (frozen, load_state_dict_file, parse_dtype, read_image_processor_config,
                                                  require_path, score_in_chunks)

HEAD_HOW_TO = ("download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-"
               "predictor and convert it: python -m neighbor_grpo.rewards.convert aesthetic "
               "sac+logos+ava1-l14-linearMSE.pth models/aesthetic-head.safetensors")
LINEAR_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers in the original nn.Sequential (Dropouts between)
DROPOUTS = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The original `layers` Sequential: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (no
    activations, as trained). Widths come from the weights: 768-1024-128-64-16-1 for the released head."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        linears = [nn.Linear(widths[i], widths[i + 1]) for i in range(len(LINEAR_LAYERS))]
        self.layers = nn.Sequential(linears[0], nn.Dropout(DROPOUTS[0]), linears[1], nn.Dropout(DROPOUTS[1]),
                                    linears[2], nn.Dropout(DROPOUTS[2]), linears[3], linears[4])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "AestheticHead":
        expected = {f"layers.{i}.{p}" for i in LINEAR_LAYERS for p in ("weight", "bias")}
        if set(state) != expected:
            raise ValueError(f"not an aesthetic predictor head: expected keys {sorted(expected)}, got {sorted(state)}")
        widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in LINEAR_LAYERS]
        head = cls(widths)
        head.load_state_dict(state, strict=True)
        return head


def convert_aesthetic_head(source: str | Path, target: str | Path) -> None:
    """sac+logos+ava1-l14-linearMSE.pth (a torch pickle) -> .safetensors, read with torch.load(weights_only=True),
    which loads tensors only and refuses arbitrary objects."""
    state = load_state_dict_file(source)
    AestheticHead.from_state_dict(state)  # refuse anything that is not the head before writing it
    save_safetensors(state, target)


class AestheticScore:
    """head(normalise(CLIP image embedding)). Images: `transform`, OpenAI CLIP's preprocess (which the predictor's
    reference code uses): shortest side to 224 (truncated), torchvision's CenterCrop offset, CLIP mean/std."""

    def __init__(self, clip_model, head: AestheticHead, transform: ImageTransform, batch_size: int = 16):
        self.model, self.head, self.transform = clip_model, head, transform
        self.batch_size = batch_size
        self.device, self.dtype = clip_model.visual_projection.weight.device, clip_model.visual_projection.weight.dtype

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.transform(images.to(self.device, torch.float32))
        embeddings = clip_image_embeddings(self.model, pixels.to(self.dtype))  # float32, unit length
        return self.head(embeddings)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return score_in_chunks(self.score_chunk, images, prompts, self.batch_size)


@register_reward("aesthetic")
def make_aesthetic(path: str, clip_path: str, batch_size: int = 16, device: str | torch.device = "cpu",
                   dtype: str = "float32") -> AestheticScore:
    """`path`: the head as .safetensors (see HEAD_HOW_TO); `clip_path`: the openai/clip-vit-large-patch14 folder.
    `dtype` applies to CLIP; the small head always runs in float32."""
    head_path = require_path(path, "aesthetic predictor head", HEAD_HOW_TO)
    if head_path.suffix != ".safetensors":
        raise ValueError(f"{head_path}: the aesthetic head must be a .safetensors file (pickles are never loaded "
                         f"here); convert it first: {HEAD_HOW_TO}")
    clip_folder = require_path(clip_path, "CLIP ViT-L/14 model", CLIP_HOW_TO, folder=True)
    head = frozen(AestheticHead.from_state_dict(load_state_dict_file(head_path)), device, torch.float32)
    clip_model = load_clip_model(clip_folder, device, parse_dtype(dtype))
    settings = read_image_processor_config(clip_folder, clip_model.config.vision_config.image_size)
    # improved-aesthetic-predictor embeds with clip.load's preprocess: torchvision Resize + CenterCrop
    transform = centre_crop_transform(*settings, crop_rounding="half_even")
    return AestheticScore(clip_model, head, transform, batch_size=batch_size)
