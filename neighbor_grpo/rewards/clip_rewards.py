"""CLIP-family rewards: `clip_score` (cosine of image and prompt embeddings), `pickscore` (PickScore_v1,
logit_scale * cosine), and `clip_source_similarity` (editing: cosine of the edited image's and its source image's
embeddings). They load a transformers CLIPModel (and a tokenizer) from local folders; nothing downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.image_transforms import ImageTransform, centre_crop_transform
from neighbor_grpo.rewards.model_loading import (frozen, import_transformers, parse_dtype, read_image_processor_config,
                                                  require_path, score_in_chunks)


def clip_image_embeddings(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projected CLS embedding of the vision tower, L2-normalised (works on transformers 4.x and 5.x outputs)."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def clip_text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected end-of-text embedding of the text tower, L2-normalised."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


def paired_cosine(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """cos(image_i, text_i) of unit vectors: the diagonal of image @ text.T, without the off-diagonal work."""
    return (image_embeddings * text_embeddings).sum(-1)


class ClipSimilarity:
    """scale * cos(image embedding, prompt embedding), one score per (image, prompt) pair.

    Images (batch, C, H, W) in [0, 1] become the model's pixels through `transform` (image_transforms.py): a
    centre crop as transformers' CLIPImageProcessor for clip_score and pickscore, HPSv2's letterbox for hpsv2."""

    def __init__(self, model, tokenizer, transform: ImageTransform, scale: float = 1.0, batch_size: int = 16):
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.scale, self.batch_size = float(scale), int(batch_size)
        self.device, self.dtype = model.text_projection.weight.device, model.text_projection.weight.dtype
        self.max_length = model.config.text_config.max_position_embeddings

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform(images.to(self.device, torch.float32)).to(self.dtype)

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Long prompts are cut to the text tower's context (77 tokens for CLIP), keeping the end-of-text token.
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image_embeddings = clip_image_embeddings(self.model, self.pixels(images))
        text_embeddings = clip_text_embeddings(self.model, *self.tokens(prompts))
        return self.scale * paired_cosine(image_embeddings, text_embeddings)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return score_in_chunks(self.score_chunk, images, prompts, self.batch_size)


def processor_crop_transform(processor_folder: Path, model) -> ImageTransform:
    """transformers' CLIPImageProcessor as the folder's preprocessor_config.json sets it: shortest side truncated,
    crop offset (excess // 2) as its center_crop."""
    return centre_crop_transform(*read_image_processor_config(processor_folder, model.config.vision_config.image_size),
                                 crop_rounding="floor")


def load_clip_model(folder: Path, device, dtype: torch.dtype):
    transformers = import_transformers()
    model = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True)
    return frozen(model, device, dtype)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder: Path, how_to_get: str):
    """The tokenizer saved in `folder`; a folder without one (PickScore_v1 ships none) is refused by name."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}). "
                                f"To get them: {how_to_get}")
    transformers = import_transformers()
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


CLIP_HOW_TO = "huggingface-cli download openai/clip-vit-large-patch14 --local-dir models/clip-vit-large-patch14"
PICKSCORE_HOW_TO = "huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir models/PickScore_v1"
CLIP_H_HOW_TO = ("huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir "
                 "models/CLIP-ViT-H-14 --include '*.json' '*.txt'")


@register_reward("clip_score")
def make_clip_score(path: str, processor_path: str | None = None, scale: float = 1.0, batch_size: int = 16,
                    device: str | torch.device = "cpu", dtype: str = "float32") -> ClipSimilarity:
    """Raw cosine similarity (scale=1.0, in [-1, 1]) of CLIP image and prompt embeddings. torchmetrics'
    CLIPScore is 100 * max(cos, 0): pass scale=100 for its scale (without the clamp at 0)."""
    folder = require_path(path, "CLIP model", CLIP_HOW_TO, folder=True)
    processor_folder = require_path(processor_path or folder, "CLIP processor", CLIP_HOW_TO, folder=True)
    tokenizer = load_tokenizer(processor_folder, CLIP_HOW_TO)  # before the large model, so a gap fails fast
    model = load_clip_model(folder, device, parse_dtype(dtype))
    return ClipSimilarity(model, tokenizer, processor_crop_transform(processor_folder, model), scale=scale,
                          batch_size=batch_size)


@register_reward("pickscore")
def make_pickscore(path: str, processor_path: str | None = None, batch_size: int = 16,
                   device: str | torch.device = "cpu", dtype: str = "float32") -> ClipSimilarity:
    """PickScore_v1: logit_scale.exp() * cos(image, prompt), as PickScore's reference code (logit_scale.exp() is
    about 100, so scores are about 100 * cos). `path`: the PickScore_v1 folder; `processor_path`: the folder of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and preprocessor files (PickScore_v1 ships none)."""
    folder = require_path(path, "PickScore model", PICKSCORE_HOW_TO, folder=True)
    processor_folder = require_path(processor_path or folder, "PickScore processor (CLIP-H tokenizer)",
                                    CLIP_H_HOW_TO, folder=True)
    tokenizer = load_tokenizer(processor_folder, CLIP_H_HOW_TO)
    model = load_clip_model(folder, device, parse_dtype(dtype))
    scale = float(model.logit_scale.detach().float().exp())
    return ClipSimilarity(model, tokenizer, processor_crop_transform(processor_folder, model), scale=scale,
                          batch_size=batch_size)


class ClipSourceSimilarity:
    """cos(CLIP embedding of the edited image, CLIP embedding of its source image): how much of the source an edit
    keeps. A baseline for edit consistency, not a judge of the edit: it is highest for no edit at all, so it goes
    beside a reward for following the instruction (clip_score of the instruction, or a VLM judge)."""

    needs = ("source_images",)

    def __init__(self, model, transform: ImageTransform, batch_size: int = 16):
        self.model, self.transform, self.batch_size = model, transform, int(batch_size)
        self.device, self.dtype = model.visual_projection.weight.device, model.visual_projection.weight.dtype

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return clip_image_embeddings(self.model, self.transform(images.to(self.device, torch.float32)).to(self.dtype))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], source_images: torch.Tensor) -> torch.Tensor:
        if source_images.shape[0] != images.shape[0]:
            raise ValueError(f"clip_source_similarity: {len(images)} images but {len(source_images)} source images")
        with torch.no_grad():
            scores = [paired_cosine(self.embeddings(images[i:i + self.batch_size]),
                                    self.embeddings(source_images[i:i + self.batch_size]))
                      for i in range(0, len(images), self.batch_size)]
        return torch.cat(scores).float().to(images.device)


@register_reward("clip_source_similarity")
def make_clip_source_similarity(path: str, processor_path: str | None = None, batch_size: int = 16,
                                device: str | torch.device = "cpu", dtype: str = "float32") -> ClipSourceSimilarity:
    """Editing baseline: raw cosine (in [-1, 1]) of the CLIP image embeddings of each edit and its source image
    (the prompt set's `image`); the same CLIP folders as clip_score (no tokenizer needed)."""
    folder = require_path(path, "CLIP model", CLIP_HOW_TO, folder=True)
    processor_folder = require_path(processor_path or folder, "CLIP processor", CLIP_HOW_TO, folder=True)
    model = load_clip_model(folder, device, parse_dtype(dtype))
    return ClipSourceSimilarity(model, processor_crop_transform(processor_folder, model), batch_size=batch_size)
