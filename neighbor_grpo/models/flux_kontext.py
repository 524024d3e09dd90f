"""FLUX.1 Kontext (instruction editing) through diffusers' FluxKontextPipeline: FLUX.1's transformer, prompts and
guidance embedding, plus the source image as extra tokens.

Every prompt is an editing prompt (`EditPrompt`: a JSONL prompt set whose rows give an `image`). As the pipeline
does it, the source image is resized and normalised by the pipeline's image processor, encoded by the VAE (the
distribution's mode, shifted and scaled), packed into 2x2 tokens and appended after the noisy image tokens, with
position ids whose first coordinate is 1; the velocity is the prediction at the noisy tokens only. The source image
is brought to the output resolution (`model.height` x `model.width`): the pipeline called with `_auto_resize=False`
on an image of that size (at 1024 x 1024, Kontext's preferred square resolution, the same as its default). Its
latents are cached with the prompt's embeddings, so each source image is encoded once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neighbor_grpo.config.prompts import source_image_paths
from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.flux import FluxAdapter


def source_pixels(pipeline, path: str, height: int, width: int) -> torch.Tensor:
    """The source image as the pipeline preprocesses it: (1, 3, height, width) in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image = pipeline.image_processor.resize(image, height, width)
    return pipeline.image_processor.preprocess(image, height, width)


def require_sources(prompts: list[str], adapter: str) -> list[str]:
    paths = source_image_paths(prompts)
    if paths is None:
        raise ValueError(f"the {adapter} adapter edits images: every prompt needs a source image (a JSONL prompt "
                         "set whose rows give an `image`, for prompts.file and prompts.eval_file); got text-only "
                         f"prompts such as {str(prompts[0])!r}")
    return paths


@register_model_adapter("flux_kontext")
class FluxKontextAdapter(FluxAdapter):
    NAME = "flux_kontext"
    PIPELINE = "FluxKontextPipeline"

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        paths = require_sources(prompts, self.NAME)
        encoded = super().encode_new_prompts([str(p) for p in prompts])
        encoded["image_latents"] = self.source_latents(paths)
        return encoded

    @torch.no_grad()
    def source_latents(self, paths: list[str]) -> torch.Tensor:
        """VAE latents (n, C, h, w) of the source images at the output resolution, as the pipeline encodes them."""
        vae = self.pipeline.vae
        vae_device = next(vae.parameters()).device  # on the CPU under model.offload_vae
        height, width = self.resolution()
        pixels = torch.cat([source_pixels(self.pipeline, path, height, width) for path in paths])
        return self.pipeline._encode_vae_image(pixels.to(vae_device, vae.dtype), generator=None).to(self.device)

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pipeline, dtype, device = self.pipeline, self.dtype, self.device
        B, C, H, W = x.shape
        embeds = self.cache.gather("prompt_embeds", rows, device, dtype)
        pooled = self.cache.gather("pooled_prompt_embeds", rows, device, dtype)
        source = self.cache.gather("image_latents", rows, device, dtype)
        h, w = source.shape[-2:]
        tokens = torch.cat([pipeline._pack_latents(x.to(device, dtype), B, C, H, W),
                            pipeline._pack_latents(source, B, C, h, w)], dim=1)
        source_ids = pipeline._prepare_latent_image_ids(B, h // 2, w // 2, device, dtype)
        source_ids[..., 0] = 1  # the condition image's tokens sit in a second "frame" of the RoPE grid
        image_ids = torch.cat([pipeline._prepare_latent_image_ids(B, H // 2, W // 2, device, dtype), source_ids])
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if pipeline.transformer.config.guidance_embeds:
            guidance = torch.full((B,), float(self.options["guidance"]), device=device, dtype=torch.float32)
        out = self.net(tokens, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=s.to(dtype),
                       img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        factor = pipeline.vae_scale_factor
        return pipeline._unpack_latents(out[:, :(H // 2) * (W // 2)], H * factor, W * factor, factor)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "FluxKontextAdapter":
        return cls.from_folder(Path(folder), device, options)
