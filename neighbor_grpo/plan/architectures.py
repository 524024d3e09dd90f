"""The shipped architectures of the models users train, as their published configs, built on the `meta` device
(shapes only: no memory, no weights, no download). The planner reads parameter counts and traces shapes from them.

Each config is the `config.json` of the Hub repository named in `source` (only the fields that differ from the
library class's defaults, plus the ones that define the size); `published` is the figure the model's authors or
its model card state, which tests/plan/test_architectures.py checks the meta build against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Component:
    library: str        # "diffusers" or "transformers"
    class_name: str     # the model class, built from `config`
    config: dict = field(default_factory=dict)
    source: str = ""    # the config.json these values are copied from
    published: float = 0.0  # published parameter count
    published_source: str = ""
    tolerance: float = 0.01  # relative gap allowed between the meta build's count and `published`
    config_class: str = ""  # transformers config class; "" is T5Config for T5EncoderModel, else CLIPTextConfig


FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        axes_dims_rope=(16, 56, 56))
HUB = "https://huggingface.co"
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
FLUX_PUBLISHED = "12 B per the FLUX.1 model cards; 11.9 B for the transformer as counted by diffusers"

COMPONENTS: dict[str, Component] = {
    "flux-dev-transformer": Component(
        "diffusers", "FluxTransformer2DModel", {**FLUX_TRANSFORMER, "guidance_embeds": True},
        f"{HUB}/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json", 11.9e9, FLUX_PUBLISHED),
    "flux-schnell-transformer": Component(
        "diffusers", "FluxTransformer2DModel", {**FLUX_TRANSFORMER, "guidance_embeds": False},
        f"{HUB}/black-forest-labs/FLUX.1-schnell/blob/main/transformer/config.json", 11.9e9, FLUX_PUBLISHED),
    "sd35-medium-transformer": Component(
        "diffusers", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        f"{HUB}/stabilityai/stable-diffusion-3.5-medium/blob/main/transformer/config.json", 2.5e9,
        "2.5 B (MMDiT-X) per the Stable Diffusion 3.5 Medium model card; the config counts 2.243 B, so the card rounds "
        "up by 10% (every copy of this config.json we found agrees, dual attention in blocks 0-12)", tolerance=0.11),
    "sd35-large-transformer": Component(
        "diffusers", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        f"{HUB}/stabilityai/stable-diffusion-3.5-large/blob/main/transformer/config.json", 8.1e9,
        "8.1 B per the Stable Diffusion 3.5 Large model card"),
    "t5-xxl-encoder": Component(
        "transformers", "T5EncoderModel",
        dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
             relative_attention_num_buckets=32, relative_attention_max_distance=128,
             feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False),
        f"{HUB}/black-forest-labs/FLUX.1-dev/blob/main/text_encoder_2/config.json (google/t5-v1_1-xxl)", 4.76e9,
        "4.76 B: the encoder half of T5 v1.1 XXL (11 B), as used by FLUX.1 and SD3"),
    "clip-l": Component(
        "transformers", "CLIPTextModelWithProjection",
        dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
        f"{HUB}/stabilityai/stable-diffusion-3.5-medium/blob/main/text_encoder/config.json (openai/clip-vit-large-patch14)",
        123e6, "123 M: the CLIP ViT-L/14 text tower (OpenAI CLIP paper, Table 20 text width 768, 12 layers)"),
    "clip-g": Component(
        "transformers", "CLIPTextModelWithProjection",
        dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
             num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
        f"{HUB}/stabilityai/stable-diffusion-3.5-medium/blob/main/text_encoder_2/config.json (laion/CLIP-ViT-bigG-14)",
        695e6, "695 M: the OpenCLIP ViT-bigG/14 text tower (SDXL paper: 'OpenCLIP ViT-bigG' text encoder)"),
    # Qwen-Image family (QwenImagePipeline; Qwen-Image-Edit(-Plus) share the transformer and the text encoder)
    "qwen-image-transformer": Component(
        "diffusers", "QwenImageTransformer2DModel",
        QWEN_IMAGE_TRANSFORMER, f"{HUB}/Qwen/Qwen-Image/blob/main/transformer/config.json", 20e9,
        "20 B per the Qwen-Image model card and technical report ('a 20B MMDiT'); the config counts 20.43 B",
        tolerance=0.03),
    # Qwen-Image-Edit (QwenImageEditPipeline) and Edit-Plus 2509 / 2511 (QwenImageEditPlusPipeline): Qwen-Image's
    # transformer config, 2511 adding `zero_cond_t` (source tokens modulated at timestep 0: no parameters)
    **{f"qwen-image-edit{suffix}-transformer": Component(
        "diffusers", "QwenImageTransformer2DModel", {**QWEN_IMAGE_TRANSFORMER, **extra},
        f"{HUB}/Qwen/Qwen-Image-Edit{suffix}/blob/main/transformer/config.json", 20e9,
        f"20 B per the Qwen-Image-Edit{suffix} model card (Qwen-Image's 20 B MMDiT, trained for editing)",
        tolerance=0.03) for suffix, extra in (("", {}), ("-2509", {}), ("-2511", {"zero_cond_t": True}))},
    "qwen2.5-vl-7b": Component(
        "transformers", "Qwen2_5_VLForConditionalGeneration",
        dict(text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
             vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu"),
             vocab_size=152064, tie_word_embeddings=False, image_token_id=151655, video_token_id=151656,
             vision_start_token_id=151652, vision_end_token_id=151653),
        f"{HUB}/Qwen/Qwen-Image/blob/main/text_encoder/config.json (Qwen/Qwen2.5-VL-7B-Instruct)", 8.29e9,
        "8.29 B: Qwen2.5-VL-7B-Instruct as its Hub page counts it (language model, vision tower and LM head)",
        config_class="Qwen2_5_VLConfig"),
    "flux-kontext-dev-transformer": Component(
        "diffusers", "FluxTransformer2DModel", {**FLUX_TRANSFORMER, "guidance_embeds": True},
        f"{HUB}/black-forest-labs/FLUX.1-Kontext-dev/blob/main/transformer/config.json", 12e9,
        "12 B per the FLUX.1 Kontext [dev] model card (the FLUX.1-dev transformer; the image condition is more tokens)",
        tolerance=0.01),
    # Wan video transformers (WanTransformer3DModel): diffusers' conversion script (scripts/convert_wan_to_diffusers.py)
    # and the checkpoints' transformer/config.json
    "wan21-t2v-1.3b-transformer": Component(
        "diffusers", "WanTransformer3DModel", dict(**WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
        f"{HUB}/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/transformer/config.json", 1.3e9,
        "1.3 B per the Wan2.1-T2V-1.3B model card (the name rounds: the config counts 1.419 B)", tolerance=0.1),
    "wan22-ti2v-5b-transformer": Component(
        "diffusers", "WanTransformer3DModel",
        dict(**{**WAN_COMMON, "in_channels": 48, "out_channels": 48}, num_attention_heads=24, ffn_dim=14336,
             num_layers=30),
        f"{HUB}/Wan-AI/Wan2.2-TI2V-5B-Diffusers/blob/main/transformer/config.json", 5.0e9,
        "5 B per the Wan2.2-TI2V-5B model card (dense, with its own 48-channel, 16x16x4 VAE)"),
    "wan22-t2v-a14b-expert": Component(
        "diffusers", "WanTransformer3DModel", dict(**WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
        f"{HUB}/Wan-AI/Wan2.2-T2V-A14B-Diffusers/blob/main/transformer/config.json", 14e9,
        "14 B active of 27 B total per the Wan2.2-T2V-A14B model card: two 14 B experts (transformer, transformer_2), "
        "one per denoising step", tolerance=0.03),
}

# FLUX.2 and Z-Image (their transformers' published configs; FLUX.2's fields other than these are the library
# defaults, which are FLUX.2 [dev]'s: patch 1, head dim 128, mlp ratio 3, RoPE axes (32, 32, 32, 32), theta 2000)
FLUX2 = "black-forest-labs/FLUX.2"
QWEN3 = dict(vocab_size=151936, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             max_position_embeddings=40960, rope_theta=1000000)
COMPONENTS.update({
    "flux2-dev-transformer": Component(
        "diffusers", "Flux2Transformer2DModel",
        dict(in_channels=128, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
             guidance_embeds=True),
        f"{HUB}/{FLUX2}-dev/blob/main/transformer/config.json", 32e9, "32 B per the FLUX.2 [dev] model card"),
    "flux2-klein-4b-transformer": Component(
        "diffusers", "Flux2Transformer2DModel",
        dict(in_channels=128, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
             guidance_embeds=False),
        f"{HUB}/{FLUX2}-klein-base-4B/blob/main/transformer/config.json", 4e9,
        "4 B per the FLUX.2 [klein] 4B model card (the config counts 3.88 B)", tolerance=0.04),
    "flux2-klein-9b-transformer": Component(
        "diffusers", "Flux2Transformer2DModel",
        dict(in_channels=128, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
             guidance_embeds=False),
        f"{HUB}/{FLUX2}-klein-base-9B/blob/main/transformer/config.json", 9e9,
        "9 B per the FLUX.2 [klein] 9B model card"),
    "z-image-transformer": Component(
        "diffusers", "ZImageTransformer2DModel",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
             n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
        f"{HUB}/Tongyi-MAI/Z-Image-Turbo/blob/main/transformer/config.json", 6e9,
        "6 B per the Z-Image model card and paper (arXiv 2511.22699; the config counts 6.15 B)", tolerance=0.03),
    "mistral-small-3.1-24b": Component(
        "transformers", "Mistral3ForConditionalGeneration",
        dict(text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                              num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              tie_word_embeddings=False),
             vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, image_size=1540, patch_size=14),
             spatial_merge_size=2, multimodal_projector_bias=False, projector_hidden_act="gelu",
             tie_word_embeddings=False),
        f"{HUB}/{FLUX2}-dev/blob/main/text_encoder/config.json (mistralai/Mistral-Small-3.1-24B-Instruct-2503)", 24e9,
        "24 B per the Mistral Small 3.1 model card"),
    "qwen3-4b": Component(
        "transformers", "Qwen3ForCausalLM",
        dict(QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
        f"{HUB}/Tongyi-MAI/Z-Image-Turbo/blob/main/text_encoder/config.json (Qwen/Qwen3-4B; FLUX.2 [klein] 4B's too)",
        4.0e9, "4.0 B per the Qwen3-4B model card"),
    "qwen3-8b": Component(
        "transformers", "Qwen3ForCausalLM",
        dict(QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
        f"{HUB}/{FLUX2}-klein-base-9B/blob/main/text_encoder/config.json (Qwen/Qwen3-8B)", 8.2e9,
        "8.2 B per the Qwen3-8B model card"),
})

# Wan's text encoder (every Wan 2.1 / 2.2 checkpoint's text_encoder/config.json: google/umt5-xxl's encoder)
COMPONENTS["umt5-xxl-encoder"] = Component(
    "transformers", "UMT5EncoderModel",
    dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
         relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
         is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False),
    f"{HUB}/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/text_encoder/config.json (google/umt5-xxl)", 5.68e9,
    "5.68 B: the encoder half of UMT5-XXL, as the Wan repositories ship it (models_t5_umt5-xxl-enc-bf16.pth, "
    "11.36 GB in bf16)", config_class="UMT5Config")

# Which components make up each model the planner knows (the text encoders run once per prompt).
MODELS = {
    "flux-dev": ("flux-dev-transformer", "t5-xxl-encoder", "clip-l"),
    "flux-schnell": ("flux-schnell-transformer", "t5-xxl-encoder", "clip-l"),
    "sd35-medium": ("sd35-medium-transformer", "clip-l", "clip-g", "t5-xxl-encoder"),
    "sd35-large": ("sd35-large-transformer", "clip-l", "clip-g", "t5-xxl-encoder"),
}
MODELS.update({"flux2-dev": ("flux2-dev-transformer", "mistral-small-3.1-24b"),
               "flux2-klein-4b": ("flux2-klein-4b-transformer", "qwen3-4b"),
               "flux2-klein-9b": ("flux2-klein-9b-transformer", "qwen3-8b"),
               "z-image": ("z-image-transformer", "qwen3-4b")})
MODELS.update({"qwen-image": ("qwen-image-transformer", "qwen2.5-vl-7b"),
               **{f"qwen-image-edit{suffix}": (f"qwen-image-edit{suffix}-transformer", "qwen2.5-vl-7b")
                  for suffix in ("", "-2509", "-2511")},
               "flux-kontext-dev": ("flux-kontext-dev-transformer", "t5-xxl-encoder", "clip-l"),
               "wan21-t2v-1.3b": ("wan21-t2v-1.3b-transformer", "umt5-xxl-encoder"),
               "wan22-ti2v-5b": ("wan22-ti2v-5b-transformer", "umt5-xxl-encoder"),
               "wan22-t2v-a14b": ("wan22-t2v-a14b-expert", "umt5-xxl-encoder")})
# The adapter family of each model that is not FLUX.1 or SD3 (models.flux2_zimage_archs and
# models.qwen_kontext_wan_archs build them)
FAMILY = {"flux2-dev": "flux2", "flux2-klein-4b": "flux2-klein", "flux2-klein-9b": "flux2-klein", "z-image": "z-image",
          "qwen-image": "qwen-image", "qwen-image-edit": "qwen-image-edit",
          "qwen-image-edit-2509": "qwen-image-edit-plus", "qwen-image-edit-2511": "qwen-image-edit-plus",
          "flux-kontext-dev": "flux-kontext", "wan21-t2v-1.3b": "wan", "wan22-ti2v-5b": "wan", "wan22-t2v-a14b": "wan"}
# The Qwen-Image-Edit models' VL image processor: Qwen2.5-VL-7B-Instruct's preprocessor_config.json, which the Edit
# repositories ship as processor/preprocessor_config.json (the fields that size an image's tokens: sides multiples
# of patch_size x merge_size = 28 within min_pixels..max_pixels, 2x2 patches merged into one token)
QWEN_VL_IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                               merge_size=2)
QWEN_VL_IMAGE_PROCESSOR_SOURCE = (f"{HUB}/Qwen/Qwen-Image-Edit/blob/main/processor/preprocessor_config.json "
                                  "(Qwen/Qwen2.5-VL-7B-Instruct's)")
# What a Wan checkpoint's model_index.json adds to its transformer: Wan2.2-T2V-A14B's second expert (transformer_2,
# the same config) below boundary_ratio x 1000, Wan2.2-TI2V-5B's one timestep per token (expand_timesteps)
WAN_PIPELINE = {"wan21-t2v-1.3b": {}, "wan22-ti2v-5b": {"expand_timesteps": True},
                "wan22-t2v-a14b": {"boundary_ratio": 0.875}}


def build_on_meta(name: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The component `name` with every parameter on the meta device (shapes and dtypes, no storage)."""
    if name not in COMPONENTS:
        raise ValueError(f"architecture: unknown {name!r}; choose from {sorted(COMPONENTS)}")
    component = COMPONENTS[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            if component.library == "diffusers":
                import diffusers

                return getattr(diffusers, component.class_name)(**component.config)
            import transformers

            model_class = getattr(transformers, component.class_name)
            config_class = getattr(transformers, component.config_class) if component.config_class else model_class.config_class
            return model_class(config_class(**component.config))
    finally:
        torch.set_default_dtype(previous)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights once), meta or real."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class VideoModel:
    """A Wan text-to-video model: its experts (components, one per denoising step) and its default video geometry."""

    experts: tuple[str, ...]
    frames: int          # the pipeline's default num_frames
    height: int
    width: int
    vae_temporal: int    # frames per latent frame (after the first)
    vae_spatial: int     # pixels per latent pixel
    patch: tuple[int, int, int] = (1, 2, 2)  # the transformer's (t, h, w) patch


VIDEO_MODELS = {
    "wan21-t2v-1.3b": VideoModel(("wan21-t2v-1.3b-transformer",), 81, 480, 832, 4, 8),
    "wan22-ti2v-5b": VideoModel(("wan22-ti2v-5b-transformer",), 121, 704, 1280, 4, 16),
    "wan22-t2v-a14b": VideoModel(("wan22-t2v-a14b-expert", "wan22-t2v-a14b-expert"), 81, 720, 1280, 4, 8),
}
"""Wan video models, at their model cards' default resolution and frames (TI2V-5B: 720p at 24 fps, 121 frames)."""


def video_tokens(model: VideoModel, frames: int | None = None, height: int | None = None,
                 width: int | None = None) -> int:
    """Tokens one video is in the transformer: latent frames x latent patches, ((F - 1) / vae_t + 1) / p_t x
    (H / vae_s / p_h) x (W / vae_s / p_w). Attention costs grow with its square."""
    frames, height, width = frames or model.frames, height or model.height, width or model.width
    if (frames - 1) % model.vae_temporal:
        raise ValueError(f"model.num_frames: expected {model.vae_temporal}k + 1 frames, got {frames}")
    latent = ((frames - 1) // model.vae_temporal + 1, height // model.vae_spatial, width // model.vae_spatial)
    return (latent[0] // model.patch[0]) * (latent[1] // model.patch[1]) * (latent[2] // model.patch[2])
