"""Random-weight FLUX.2 ([dev], [klein]) and Z-Image pipelines built in memory, for the planner (on the meta device)
and throughput checks: the transformer and VAE of the given config, the text encoder replaced by fixed random
prompt features of the real shape (the adapters cache them; the encoder runs once per prompt).

`models.architectures.build_diffusers_adapter` hands these three families here; their shipped configs are in
`plan.architectures` (FLUX.2 [dev], [klein] 4B / 9B, Z-Image).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

# AutoencoderKLFlux2's published config is the library default (32 latent channels, 2x2 patches -> 128);
# Z-Image's VAE is FLUX.1's AutoencoderKL (16 channels, scaling 0.3611, shift 0.1159)
FLUX2_VAE: dict = {}
Z_IMAGE_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                   norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)
FAMILIES = ("flux2", "flux2-klein", "z-image")
TEXT_TOKENS = 512  # the pipelines' max_sequence_length


def text_shape(family: str, transformer: dict, max_sequence_length: int | None) -> tuple[int, int, int]:
    """(tokens, width, pooled) of the cached prompt features: FLUX.2 three text-encoder layers side by side (the
    transformer's joint_attention_dim), Z-Image one (its cap_feat_dim); neither has a pooled embedding."""
    width = transformer["cap_feat_dim"] if family == "z-image" else transformer["joint_attention_dim"]
    return (max_sequence_length or TEXT_TOKENS, int(width), 0)


def vae_config(family: str, transformer: dict | None = None) -> dict:
    return Z_IMAGE_VAE if family == "z-image" else FLUX2_VAE


def random_prompt_features(family: str, tokens: int, width: int, device, dtype):
    """encode_new_prompts stand-in: fixed random features per prompt (keyed by its CRC), every caption at full
    length (the planner's upper bound: real captions are shorter)."""

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        features = torch.stack([torch.randn(tokens, width, generator=g) for g in generators]).to(device, dtype)
        if family != "z-image":
            return {"prompt_embeds": features}
        return {"prompt_embeds": features, "prompt_lengths": torch.full((len(prompts),), tokens, device=device)}

    return encode


def build_random_adapter(family: str, spec: dict, resolution: int, device: str, dtype: torch.dtype,
                         options: dict | None = None):
    """The Flux2Adapter / Flux2KleinAdapter / ZImageAdapter around a random-weight pipeline of `spec`
    (transformer, vae, text: as `text_shape`); on device "meta" nothing is allocated."""
    import diffusers

    from neighbor_grpo.models.diffusers_common import model_options
    from neighbor_grpo.models.flux2 import Flux2Adapter, Flux2KleinAdapter
    from neighbor_grpo.models.z_image import ZImageAdapter

    if family not in FAMILIES:
        raise ValueError(f"architecture family: unknown {family!r}; choose from {FAMILIES}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created in `dtype`: a 32 B transformer never exists in fp32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if family == "z-image":
                transformer = diffusers.ZImageTransformer2DModel(**spec["transformer"])
                vae = diffusers.AutoencoderKL(**{"in_channels": 3, "out_channels": 3, **spec["vae"]})
            else:
                transformer = diffusers.Flux2Transformer2DModel(**spec["transformer"])
                vae = diffusers.AutoencoderKLFlux2(**spec["vae"])
    finally:
        torch.set_default_dtype(previous)
    if family == "z-image":  # Z-Image-Turbo's scheduler: constant shift 3
        pipeline = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                            text_encoder=torch.nn.Identity(), tokenizer=None, transformer=transformer)
        adapter_class = ZImageAdapter
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        pipeline_class = diffusers.Flux2Pipeline if family == "flux2" else diffusers.Flux2KleinPipeline
        pipeline = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=torch.nn.Identity(), tokenizer=None,
                                  transformer=transformer)
        adapter_class = Flux2Adapter if family == "flux2" else Flux2KleinAdapter
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    height, width = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    options = model_options({**(options or {}), "dtype": dtype_name, "height": height, "width": width})
    adapter = adapter_class(pipeline, Path("."), options, torch.device(device), loras=[])
    tokens, width, _ = spec["text"]
    adapter.encode_new_prompts = random_prompt_features(family, tokens, width, device, dtype)
    return adapter
