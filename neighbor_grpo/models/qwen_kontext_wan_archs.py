"""Random-weight Qwen-Image, FLUX.1 Kontext and Wan (2.1, 2.2 TI2V-5B, 2.2 A14B with its two experts) pipelines built
in memory, for the planner (on the meta device): the transformer(s) and VAE of the given config, the text encoders
replaced by fixed random prompt features of the real shape (the adapters cache them; the encoders run once per
prompt), Kontext's source image by random source latents at the output resolution.

`models.architectures.build_diffusers_adapter` hands these families here; their shipped configs are in
`plan.architectures` (Qwen-Image, FLUX.1 Kontext [dev], Wan2.1-T2V-1.3B, Wan2.2-TI2V-5B, Wan2.2-T2V-A14B).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from neighbor_grpo.models.flux2_zimage_archs import Z_IMAGE_VAE

FAMILIES = ("qwen-image", "flux-kontext", "wan")
# AutoencoderKLQwenImage's and AutoencoderKLWan's defaults are Qwen/Qwen-Image's and Wan2.1's vae/config.json;
# Wan2.2-TI2V-5B's VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json): 48 channels, 2x2 pixel patches, 16x16x4.
# Its latents_mean/latents_std (48 values each) are left at 0 and 1: they change neither shapes nor cost.
QWEN_IMAGE_VAE: dict = {}
WAN21_VAE: dict = {}
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
                 latents_std=[1.0] * 48)
FLUX1_VAE = Z_IMAGE_VAE  # Kontext's VAE is FLUX.1's AutoencoderKL (which Z-Image shares)
# the adapters' default max_sequence_length: Qwen-Image's tokenizer limit, FLUX.1's T5 length, Wan's UMT5 length
TEXT_TOKENS = {"qwen-image": 1024, "flux-kontext": 512, "wan": 512}


def text_shape(family: str, transformer: dict, max_sequence_length: int | None) -> tuple[int, int, int]:
    """(tokens, width, pooled) of the cached prompt features: Qwen-Image's Qwen2.5-VL states (joint_attention_dim;
    every caption at full length, the planner's upper bound), Kontext FLUX.1's T5 + pooled CLIP, Wan's UMT5 states
    (text_dim; the pipeline pads every caption to the full length)."""
    tokens = max_sequence_length or TEXT_TOKENS[family]
    if family == "wan":
        return (tokens, int(transformer.get("text_dim", 4096)), 0)
    pooled = int(transformer["pooled_projection_dim"]) if family == "flux-kontext" else 0
    return (tokens, int(transformer["joint_attention_dim"]), pooled)


def vae_config(family: str, transformer: dict) -> dict:
    if family == "wan":
        return WAN22_VAE if int(transformer.get("in_channels", 16)) == 48 else WAN21_VAE
    return QWEN_IMAGE_VAE if family == "qwen-image" else FLUX1_VAE


def random_prompt_features(family: str, tokens: int, width: int, pooled: int, source_latent: tuple | None,
                           device, dtype):
    """encode_new_prompts stand-in: fixed random features per prompt (keyed by its CRC); Qwen-Image's with their
    lengths (every caption at full length), Kontext's with a pooled embedding and the source image's latents, Wan's
    with an empty first frame (text-to-video). `source_latent`: the adapter's latent shape (Kontext, Wan)."""

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(str(p).encode())) for p in prompts]
        out = {"prompt_embeds": torch.stack([torch.randn(tokens, width, generator=g) for g in generators])}
        if family == "qwen-image":
            out["prompt_lengths"] = torch.full((len(prompts),), tokens)
        if family == "flux-kontext":
            out["pooled_prompt_embeds"] = torch.stack([torch.randn(pooled, generator=g) for g in generators])
            out["image_latents"] = torch.stack([torch.randn(*source_latent, generator=g) for g in generators])
        if family == "wan":  # text-to-video: no given first frame (0 frames), as WanAdapter.encode_new_prompts caches
            channels, _, latent_height, latent_width = source_latent
            out["first_frame"] = torch.zeros(len(prompts), channels, 0, latent_height, latent_width)
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}

    return encode


def build_pipeline(family: str, spec: dict):
    """The diffusers pipeline of `spec` on the current default device and dtype, text encoders left out."""
    import diffusers

    config = spec["transformer"]
    if family == "qwen-image":  # Qwen/Qwen-Image scheduler_config.json
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
        return diffusers.QwenImagePipeline(scheduler=scheduler, vae=diffusers.AutoencoderKLQwenImage(**spec["vae"]),
                                           text_encoder=torch.nn.Identity(), tokenizer=None,
                                           transformer=diffusers.QwenImageTransformer2DModel(**config))
    if family == "flux-kontext":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=256,
                                                              max_image_seq_len=4096)
        vae = diffusers.AutoencoderKL(**{"in_channels": 3, "out_channels": 3, **spec["vae"]})
        return diffusers.FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=torch.nn.Identity(),
                                             tokenizer=None, text_encoder_2=torch.nn.Identity(), tokenizer_2=None,
                                             transformer=diffusers.FluxTransformer2DModel(**config))
    pipeline = dict(spec.get("pipeline") or {})  # boundary_ratio (two experts), expand_timesteps
    second = diffusers.WanTransformer3DModel(**spec.get("transformer_2", config)) if pipeline.get("boundary_ratio") else None
    return diffusers.WanPipeline(tokenizer=None, text_encoder=torch.nn.Identity(),
                                 vae=diffusers.AutoencoderKLWan(**spec["vae"]),
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=float(pipeline.pop("shift", 3.0))),
                                 transformer=diffusers.WanTransformer3DModel(**config), transformer_2=second,
                                 boundary_ratio=pipeline.get("boundary_ratio"),
                                 expand_timesteps=bool(pipeline.get("expand_timesteps", False)))


def build_random_adapter(family: str, spec: dict, size, device: str, dtype: torch.dtype, options: dict | None = None):
    """The QwenImageAdapter / FluxKontextAdapter / WanAdapter around a random-weight pipeline of `spec`
    (transformer, vae, text: as `text_shape`; Wan's `pipeline`: model_index.json's boundary_ratio and
    expand_timesteps); `size` is a side or (height, width). On device "meta" nothing is allocated."""
    from neighbor_grpo.models.diffusers_common import model_options
    from neighbor_grpo.models.flux_kontext import FluxKontextAdapter
    from neighbor_grpo.models.qwen_image import QwenImageAdapter
    from neighbor_grpo.models.wan import WanAdapter

    if family not in FAMILIES:
        raise ValueError(f"architecture family: unknown {family!r}; choose from {FAMILIES}")
    height, width = size if isinstance(size, tuple) else (size, size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters created in `dtype`: a 20 B transformer never exists in fp32
    try:
        with torch.device(device):
            torch.manual_seed(0)
            pipeline = build_pipeline(family, spec)
    finally:
        torch.set_default_dtype(previous)
    adapter_class = {"qwen-image": QwenImageAdapter, "flux-kontext": FluxKontextAdapter, "wan": WanAdapter}[family]
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    options = model_options({**(options or {}), "dtype": dtype_name, "height": height, "width": width})
    adapter = adapter_class(pipeline, Path("."), options, torch.device(device), loras=[])
    adapter.encode_new_prompts = prompt_stand_in(adapter, family, spec["text"], device, dtype)
    return adapter


def prompt_stand_in(adapter, family: str, text: tuple, device, dtype):
    """random_prompt_features for `adapter`'s family and text shape; Kontext's source at the output size."""
    source = adapter.latent_shape() if family in ("flux-kontext", "wan") else None
    return random_prompt_features(family, *text, source, device, dtype)
