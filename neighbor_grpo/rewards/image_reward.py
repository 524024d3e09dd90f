"""`image_reward`: ImageReward-v1.0 (BLIP ViT-L/16 image encoder, BERT-base text encoder with cross-attention to
the image, MLP head) run on transformers' BLIP classes after renaming ImageReward's keys; no torchvision, no
ImageReward package, no timm."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from neighbor_grpo.runs.io import save_safetensors
from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.aesthetic import AestheticHead
from neighbor_grpo.rewards.image_transforms import centre_crop_transform
from neighbor_grpo.rewards.model_loading import (CLIP_MEAN, CLIP_STD, frozen, import_transformers,
                                                  load_state_dict_file, parse_dtype, require_path, score_in_chunks)

IMAGE_REWARD_HOW_TO = "huggingface-cli download THUDM/ImageReward ImageReward.pt --local-dir models/ImageReward"
BERT_HOW_TO = ("huggingface-cli download google-bert/bert-base-uncased --local-dir models/bert-base-uncased "
               "--include '*.txt' '*.json'")
# ImageReward standardises the head's output with these statistics (from its training set).
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072

# ImageReward's timm-style ViT names -> transformers' BlipVisionModel names (qkv packing is the same in both).
VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc([12])\.", r"vision_model.encoder.layers.\1.mlp.fc\2."),
]
# BLIP's med.py BertModel and transformers' BlipTextModel share their parameter names.
OTHER_RENAMES = [(r"^blip\.text_encoder\.", "text_model."), (r"^mlp\.layers\.", "head.layers.")]
# In the checkpoint but not used by ImageReward's score: the contrastive projections, a saved index buffer.
UNUSED = re.compile(r"^blip\.(vision_proj|text_proj|itm_head)\.|^blip\.text_encoder\.embeddings\.position_ids$|"
                    r"^blip\.text_encoder\.pooler\.")


def image_reward_to_blip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt key names -> this module's ImageRewardNet (transformers BLIP towers + head); pure renames.
    Unknown keys are refused, so a different architecture fails here instead of scoring with random weights."""
    converted = {}
    for key, tensor in state.items():
        if UNUSED.search(key):
            continue
        for pattern, replacement in VISION_RENAMES + OTHER_RENAMES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                converted[new_key] = tensor
                break
        else:
            raise KeyError(f"unexpected ImageReward key {key!r}")
    return converted


def is_image_reward_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("blip.") for key in state)


def count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


def blip_configs(state: dict[str, torch.Tensor], vision_heads: int, text_heads: int):
    """transformers BlipVisionConfig and BlipTextConfig read off the converted weights' shapes; head counts are
    not visible in shapes (ImageReward-v1.0: 16 for ViT-L, 12 for BERT-base). LayerNorm eps as BLIP: 1e-6 in the
    ViT (timm), 1e-12 in BERT."""
    transformers = import_transformers()
    width = state["vision_model.embeddings.class_embedding"].shape[-1]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state["vision_model.embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision = transformers.BlipVisionConfig(
        hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_layers(state, "vision_model.encoder.layers."), num_attention_heads=vision_heads,
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    vocab, text_width = state["text_model.embeddings.word_embeddings.weight"].shape
    text = transformers.BlipTextConfig(
        vocab_size=vocab, hidden_size=text_width, encoder_hidden_size=width,
        intermediate_size=state["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=count_layers(state, "text_model.encoder.layer."), num_attention_heads=text_heads,
        max_position_embeddings=state["text_model.embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0)  # is_decoder: build cross-attention
    return vision, text


class ImageRewardNet(nn.Module):
    """BLIP image tower -> BERT over the prompt, cross-attending to all image tokens -> MLP on the [CLS] state."""

    def __init__(self, vision_config, text_config, head_widths: Sequence[int]):
        super().__init__()
        transformers = import_transformers()
        self.vision_model = transformers.BlipVisionModel(vision_config)
        self.text_model = transformers.BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(head_widths)  # the same Linear/Dropout stack as the aesthetic predictor

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision_model(pixel_values=pixels).last_hidden_state  # after the final LayerNorm
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                               encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        return self.head(text[:, 0].float())

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], vision_heads: int = 16,
                        text_heads: int = 12) -> "ImageRewardNet":
        if is_image_reward_layout(state):
            state = image_reward_to_blip(state)
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        widths = [head_state["layers.0.weight"].shape[1]] + [head_state[f"layers.{i}.weight"].shape[0]
                                                             for i in (0, 2, 4, 6, 7)]
        model = cls(*blip_configs(state, vision_heads, text_heads), widths)
        model.load_state_dict(state, strict=True)
        return model


def standardised_reward(raw: torch.Tensor) -> torch.Tensor:
    return (raw - REWARD_MEAN) / REWARD_STD


def convert_image_reward_checkpoint(source: str | Path, target: str | Path) -> None:
    """ImageReward.pt -> .safetensors with this module's key names (read with torch.load(weights_only=True))."""
    state = load_state_dict_file(source)
    save_safetensors(image_reward_to_blip(state) if is_image_reward_layout(state) else state, target)


class ImageRewardScore:
    """ImageReward's `score`: (mlp(text_encoder(prompt | image)[CLS]) - mean) / std; roughly N(0, 1) over its
    training images, higher is preferred. Images as ImageReward's `_transform` (torchvision Resize(224) +
    CenterCrop(224), not BLIP's square resize): shortest side to 224 (truncated), torchvision's crop offset, CLIP
    mean/std; prompts: BERT-uncased tokens, truncated to 35 as ImageReward does."""

    def __init__(self, model: ImageRewardNet, tokenizer, batch_size: int = 16, max_length: int = 35):
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        size = model.vision_model.config.image_size
        self.transform = centre_crop_transform(size, size, CLIP_MEAN, CLIP_STD, crop_rounding="half_even")
        weight = model.vision_model.embeddings.patch_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.transform(images.to(self.device, torch.float32)).to(self.dtype)
        # padding only to the longest prompt: padded positions are masked, so [CLS] is the same as with max_length
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        raw = self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return standardised_reward(raw)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return score_in_chunks(self.score_chunk, images, prompts, self.batch_size)


@register_reward("image_reward")
def make_image_reward(path: str, tokenizer_path: str, batch_size: int = 16, device: str | torch.device = "cpu",
                      dtype: str = "float32", vision_heads: int = 16, text_heads: int = 12) -> ImageRewardScore:
    """`path`: ImageReward.pt (safe loader only) or its .safetensors conversion; `tokenizer_path`: a
    bert-base-uncased tokenizer folder (ImageReward's BLIP tokenizer; the [DEC]/[ENC] tokens it adds are not used
    when scoring). `dtype` applies to the BLIP towers; the head runs in float32."""
    checkpoint = require_path(path, "ImageReward checkpoint", IMAGE_REWARD_HOW_TO)
    tokenizer_folder = require_path(tokenizer_path, "bert-base-uncased tokenizer", BERT_HOW_TO, folder=True)
    model = ImageRewardNet.from_state_dict(load_state_dict_file(checkpoint), vision_heads, text_heads)
    model = frozen(model, device, parse_dtype(dtype))
    model.head.float()
    tokenizer = import_transformers().AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    return ImageRewardScore(model, tokenizer, batch_size=batch_size)
