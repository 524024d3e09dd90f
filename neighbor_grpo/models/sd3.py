"""Stable Diffusion 3 / 3.5 through diffusers: SD3Transformer2DModel, two CLIP encoders + T5, classifier-free
guidance.

CFG is explicit: `model.cfg_scale` (> 1 enables it, like diffusers' `guidance_scale`) and `model.negative_prompt`
(its embedding is cached like any prompt). `velocity` returns the guided velocity
`v_neg + cfg_scale (v_pos - v_neg)`, so rollouts, the training (leaping) step and evaluation share it exactly; it
runs the transformer on twice the batch (doubles the cost of every call, and the trainer's call count shows it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.models.diffusers_common import DiffusersAdapter


@register_model_adapter("sd3")
class SD3Adapter(NegativePromptCFG, DiffusersAdapter):
    NAME = "sd3"
    PIPELINE = "StableDiffusion3Pipeline"

    def text_encoder_names(self) -> list[str]:
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self.pipeline, n) is not None]

    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)

    def default_shift(self) -> float:
        """The scheduler config's shift (3.0 for SD3.5)."""
        _, h, w = self.latent_shape()
        patch = self.pipeline.transformer.config.patch_size
        return self.scheduler_shift((h // patch) * (w // patch))

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The negative prompt is encoded by the same call diffusers makes for its negative branch, so caching it as
        # an ordinary prompt row gives the pipeline's negative embeddings exactly.
        length = self.options["max_sequence_length"] or 256
        embeds, _, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                           device=self.device, do_classifier_free_guidance=False,
                                                           max_sequence_length=length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        rows, x, s = self._with_negative(rows, x.to(self.device, dtype), s)
        embeds = self.cache.gather("prompt_embeds", rows, self.device, dtype)
        pooled = self.cache.gather("pooled_prompt_embeds", rows, self.device, dtype)
        # SD3 takes timesteps in [0, 1000] (diffusers' scheduler.timesteps = sigmas * 1000)
        out = self.net(x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=s * 1000,
                       return_dict=False)[0]
        return self._guided(out)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "SD3Adapter":
        return cls.from_folder(Path(folder), device, options)
