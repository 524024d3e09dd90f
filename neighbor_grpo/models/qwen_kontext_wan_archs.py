"""Random-weight Qwen-Image, Qwen-Image-Edit(-Plus), FLUX.1 Kontext and Wan (2.1, 2.2 TI2V-5B, 2.2 A14B with its two
experts) pipelines built in memory, for the planner (on the meta device): the transformer(s) and VAE of the given
config, the text encoders replaced by fixed random prompt features of the real shape (the adapters cache them; the
encoders run once per prompt), an editing model's source image by random source latents: Kontext's at the output
resolution, Qwen-Image-Edit's at the pipeline's ~1 MP at the output's aspect ratio.

Qwen-Image-Edit's prompt features are longer than the caption: Qwen2.5-VL reads the instruction together with the
source image, and the image's tokens (its `<|image_pad|>` run) stay in the embeddings the transformer attends to
(`edit_text_tokens`).

`models.architectures.build_diffusers_adapter` hands these families here; their shipped configs are in
`plan.architectures` (Qwen-Image, Qwen-Image-Edit, -2509, -2511, FLUX.1 Kontext [dev], Wan2.1-T2V-1.3B,
Wan2.2-TI2V-5B, Wan2.2-T2V-A14B).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from neighbor_grpo.models.flux2_zimage_archs import Z_IMAGE_VAE

FAMILIES = ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "flux-kontext", "wan")
QWEN_EDIT = ("qwen-image-edit", "qwen-image-edit-plus")  # QwenImageEditPipeline, QwenImageEditPlusPipeline
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
# (Qwen-Image-Edit's: the caption's share, as Qwen-Image's; its pipelines cut nothing, the source image adds its own)
TEXT_TOKENS = {"qwen-image": 1024, "qwen-image-edit": 1024, "qwen-image-edit-plus": 1024, "flux-kontext": 512,
               "wan": 512}


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
    return QWEN_IMAGE_VAE if family.startswith("qwen-image") else FLUX1_VAE


def edit_adapter_class(family: str):
    from neighbor_grpo.models.qwen_image_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter

    return {"qwen-image-edit": QwenImageEditAdapter, "qwen-image-edit-plus": QwenImageEditPlusAdapter}[family]


def edit_text_tokens(family: str, caption_tokens: int, height: int, width: int, image_processor: dict) -> int:
    """Qwen-Image-Edit(-Plus)'s prompt features per row: the caption's tokens plus the source image's tokens in
    Qwen2.5-VL's prompt, for a source at the output's aspect ratio (Edit: its ~1 MP copy, Plus: its ~384 x 384 copy;
    `image_processor`: the processor's preprocessor_config.json)."""
    from transformers import Qwen2VLImageProcessorPil

    from neighbor_grpo.models.qwen_image_edit import vl_image_tokens

    (vl_width, vl_height), _ = edit_adapter_class(family).source_sizes(width / height)
    return caption_tokens + vl_image_tokens(Qwen2VLImageProcessorPil.from_dict(image_processor), vl_width, vl_height)


def random_prompt_features(family: str, tokens: int, width: int, pooled: int, source_latent: tuple | None,
                           device, dtype):
    """encode_new_prompts stand-in: fixed random features per prompt (keyed by its CRC); Qwen-Image's with their
    lengths (every caption at full length; the Edit models' with the source image's latents too), Kontext's with a
    pooled embedding and the source image's latents, Wan's with an empty first frame (text-to-video).
    `source_latent`: the source's latent shape (Kontext, Qwen-Image-Edit), the adapter's latent shape (Wan)."""

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(str(p).encode())) for p in prompts]
        out = {"prompt_embeds": torch.stack([torch.randn(tokens, width, generator=g) for g in generators])}
        if family.startswith("qwen-image"):
            out["prompt_lengths"] = torch.full((len(prompts),), tokens)
        if family in QWEN_EDIT:
            out["image_latents"] = torch.stack([torch.randn(*source_latent, generator=g) for g in generators])
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
    if family.startswith("qwen-image"):  # Qwen/Qwen-Image scheduler_config.json (the Edit models' shift is the same)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
        parts = dict(scheduler=scheduler, vae=diffusers.AutoencoderKLQwenImage(**spec["vae"]),
                     text_encoder=torch.nn.Identity(), tokenizer=None,
                     transformer=diffusers.QwenImageTransformer2DModel(**config))
        if family in QWEN_EDIT:  # the VL processor is left out too: the prompt stand-in replaces the encoder
            return getattr(diffusers, edit_adapter_class(family).PIPELINE)(processor=None, **parts)
        return diffusers.QwenImagePipeline(**parts)
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
    adapter_class = ({"qwen-image": QwenImageAdapter, "flux-kontext": FluxKontextAdapter, "wan": WanAdapter}[family]
                     if family not in QWEN_EDIT else edit_adapter_class(family))
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    options = model_options({**(options or {}), "dtype": dtype_name, "height": height, "width": width})
    adapter = adapter_class(pipeline, Path("."), options, torch.device(device), loras=[])
    adapter.encode_new_prompts = prompt_stand_in(adapter, family, spec["text"], device, dtype)
    return adapter


def prompt_stand_in(adapter, family: str, text: tuple, device, dtype):
    """random_prompt_features for `adapter`'s family and text shape; Kontext's source at the output size,
    Qwen-Image-Edit's at the size its VAE copy has for a source of the output's aspect ratio."""
    source = adapter.latent_shape() if family in ("flux-kontext", "wan") else None
    if family in QWEN_EDIT:
        channels, height, width = adapter.latent_shape()
        _, (vae_width, vae_height) = adapter.source_sizes(width / height)
        factor = adapter.pipeline.vae_scale_factor
        source = (channels, vae_height // factor, vae_width // factor)
    return random_prompt_features(family, *text, source, device, dtype)
