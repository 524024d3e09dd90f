"""FLUX.1 (dev/schnell) through diffusers: FluxTransformer2DModel, CLIP (pooled) + T5 prompts, guidance embedding.

Latents are kept unpacked, (batch, C, H, W) with C = 16 for FLUX.1; `velocity` packs them into FLUX's 2x2 patch
tokens and unpacks the prediction, with diffusers' own `_pack_latents`/`_unpack_latents`. The guidance value
(`model.guidance`, FLUX.1-dev's distilled guidance, default 3.5) enters the transformer's guidance embedding in
every call, so rollouts, the training (leaping) step and evaluation all use the same one; it costs nothing extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.diffusers_common import DiffusersAdapter


@register_model_adapter("flux")
class FluxAdapter(DiffusersAdapter):
    NAME = "flux"
    PIPELINE = "FluxPipeline"
    PACKED_CHANNELS = 4  # 2x2 latent pixels packed into each token's input

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"]

    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)

    def default_shift(self) -> float:
        """FLUX's resolution-dependent shift exp(mu) for this resolution (image tokens = (H/2)(W/2) latents)."""
        _, h, w = self.latent_shape()
        return self.scheduler_shift((h // 2) * (w // 2))

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        length = self.options["max_sequence_length"] or 512
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pipeline, dtype = self.pipeline, self.dtype
        B, C, H, W = x.shape
        embeds = self.cache.gather("prompt_embeds", rows, self.device, dtype)
        pooled = self.cache.gather("pooled_prompt_embeds", rows, self.device, dtype)
        packed = pipeline._pack_latents(x.to(self.device, dtype), B, C, H, W)
        image_ids = pipeline._prepare_latent_image_ids(B, H // 2, W // 2, self.device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if pipeline.transformer.config.guidance_embeds:
            guidance = torch.full((B,), float(self.options["guidance"]), device=self.device, dtype=torch.float32)
        # positional hidden states: the trainer's call counter reads the batch size from the first input
        out = self.net(packed, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=s.to(dtype),
                       img_ids=image_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        factor = pipeline.vae_scale_factor
        return pipeline._unpack_latents(out, H * factor, W * factor, factor)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "FluxAdapter":
        return cls.from_folder(Path(folder), device, options)
