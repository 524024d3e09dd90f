"""OpenCLIP state dict -> transformers CLIPModel state dict, pure over tensors (no open_clip, no torchvision).

OpenCLIP keeps each attention's q/k/v in one `in_proj_weight` (3*width, width) and applies its projections as
`x @ proj` (width, embed_dim); transformers has separate q/k/v Linear layers and stores projections as Linear
weights (embed_dim, width), hence the split and the transposes. Everything else is a rename."""

from __future__ import annotations

import re

import torch

# Persistent in some old OpenCLIP checkpoints, rebuilt by the model itself, not weights.
IGNORED_OPENCLIP_KEYS = ("attn_mask", "visual.attn_mask")

BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

TOP_LEVEL_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}

# `x @ proj` in OpenCLIP is `Linear(weight=proj.T)` in transformers.
TRANSPOSED_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}

BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def split_in_proj(prefix: str, weight_or_bias: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """nn.MultiheadAttention's packed [q; k; v] rows -> q_proj, k_proj, v_proj."""
    query, key, value = tensor.chunk(3, dim=0)
    return {f"{prefix}.self_attn.q_proj.{weight_or_bias}": query,
            f"{prefix}.self_attn.k_proj.{weight_or_bias}": key,
            f"{prefix}.self_attn.v_proj.{weight_or_bias}": value}


def convert_block_key(tower: str, layer: str, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{tower}.encoder.layers.{layer}"
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return split_in_proj(prefix, "weight" if rest.endswith("weight") else "bias", tensor)
    module, _, parameter = rest.rpartition(".")
    if module not in BLOCK_RENAMES:
        raise KeyError(f"unsupported OpenCLIP block parameter {rest!r} (layer scale, attention pooling and other "
                       "variants have no CLIPModel counterpart)")
    return {f"{prefix}.{BLOCK_RENAMES[module]}.{parameter}": tensor}


def openclip_to_transformers_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an OpenCLIP CLIP state dict (ViT towers, e.g. ViT-H/14 as in HPSv2) to CLIPModel's key names.
    Unknown keys are refused rather than dropped, so a wrong architecture fails here, not as silent garbage."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        block = BLOCK_KEY.match(key)
        if key in IGNORED_OPENCLIP_KEYS:
            continue
        if block:
            tower = "vision_model" if block.group(1) else "text_model"
            converted.update(convert_block_key(tower, block.group(2), block.group(3), tensor))
        elif key in TRANSPOSED_PROJECTIONS:
            converted[TRANSPOSED_PROJECTIONS[key]] = tensor.t().contiguous()
        elif key in TOP_LEVEL_RENAMES:
            converted[TOP_LEVEL_RENAMES[key]] = tensor
        else:
            raise KeyError(f"unexpected OpenCLIP key {key!r}: not a ViT CLIP checkpoint this converter knows")
    return converted


def is_openclip_layout(state: dict[str, torch.Tensor]) -> bool:
    return "visual.proj" in state or "visual.conv1.weight" in state
