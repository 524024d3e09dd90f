"""The `builtin:words` adapter: the shared diffusers adapter base over WordsPipeline (models/words_pipeline.py).

Like SD3 without classifier-free guidance: the transformer is the trained `net`, the character encoder is frozen
(it was trained with the transformer in pretraining) and its outputs are cached per prompt. There is no VAE: the
latents are the 16x64 images in [-1, 1], decoded by a bilinear 2x upsampling to 32x128 (the size the OCR reward
reads best), in the spirit of the digits model's fixed decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neighbor_grpo.builtin.words import HELDOUT_WORDS, RENDER_SIZE, decode_word_latents, render_words
from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.diffusers_common import DiffusersAdapter
from neighbor_grpo.models.words_pipeline import WordsPipeline


@register_model_adapter("words")
class WordsAdapter(DiffusersAdapter):
    NAME = "words"
    PIPELINE = "WordsPipeline"
    PIPELINE_CLASS = WordsPipeline

    def text_encoder_names(self) -> list[str]:
        return ["char_encoder"]

    def frozen_components(self) -> list[str]:
        return ["char_encoder"]

    def resolution(self) -> tuple[int, int]:
        """The decoded images' (height, width): fixed, the model draws one size."""
        for name, value in (("height", RENDER_SIZE[0]), ("width", RENDER_SIZE[1])):
            if self.options[name] not in (None, value):
                raise ValueError(f"model.{name}: builtin:words draws {RENDER_SIZE[0]}x{RENDER_SIZE[1]} images; "
                                 f"leave it unset or {value}, got {self.options[name]}")
        return RENDER_SIZE

    def latent_shape(self) -> tuple[int, int, int]:
        return self.pipeline.latent_shape()

    def default_shift(self) -> float:
        return float(self.pipeline.scheduler.config.get("shift", 1.0))

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = self.pipeline.encode_prompt(prompts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._chunked(lambda xs, ts, rows: self._velocity(xs, ts, rows).to(x.dtype),
                             x, self._timesteps(s, x.shape[0]), cond)

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        embeds = self.cache.gather("prompt_embeds", rows, self.device, self.dtype)
        pooled = self.cache.gather("pooled_prompt_embeds", rows, self.device, self.dtype)
        # timesteps in [0, 1000], as SD3 and diffusers' scheduler (timesteps = sigmas * 1000)
        return self.net(x.to(self.device, self.dtype), encoder_hidden_states=embeds, pooled_projections=pooled,
                        timestep=s * 1000, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (batch, 1, 16, 64) -> images (batch, 1, 32, 128), nominal range [0, 1], NOT clamped."""
        return decode_word_latents(latents)

    def reference_images(self) -> torch.Tensor:
        """The held-out words, cleanly rendered and decoded like samples (the realism monitor's reference)."""
        if getattr(self, "_reference", None) is None:
            pixels = render_words(HELDOUT_WORDS, image_size=tuple(self.latent_shape()[1:]))
            self._reference = self.decode(pixels * 2.0 - 1.0)
        return self._reference

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "WordsAdapter":
        return cls.from_folder(Path(folder), device, options)
