"""Z-Image (Turbo and base) through diffusers: ZImagePipeline, a single-stream DiT conditioned on Qwen3 hidden states.

Z-Image's conventions differ from FLUX's in three places, all kept inside `velocity`:
- its transformer takes the time as 1 - sigma (the pipeline passes (1000 - t) / 1000) and predicts the negative of
  our velocity (the pipeline negates the output before the Euler step);
- it takes lists (one latent of shape (C, 1, H, W) and one caption of its own length per sample);
- caption features are the Qwen3 hidden states before the last layer, of the chat-templated prompt (thinking on),
  with the padding removed: the cache keeps them padded to `model.max_sequence_length` next to each prompt's length.
Latents are the VAE's (batch, 16, H/8, W/8), scaled and shifted like FLUX.1's. CFG: `model.cfg_scale` w > 1 gives
`neg + w (pos - neg)`, which is Z-Image's `pos + g (pos - neg)` with its guidance_scale g = w - 1 (Turbo: w = 1, no
CFG; the base model's card suggests g = 3 to 5); cfg_truncation and cfg_normalization are not supported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.models.diffusers_common import DiffusersAdapter

# The peers' Z-Image LoRA targets (DiffSynth-Studio's and AI Toolkit's): attention and the SwiGLU feed-forward of
# every block (main layers, noise and context refiners).
Z_IMAGE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
DEFAULT_RESOLUTION = 1024  # the pipeline's default height and width


@register_model_adapter("z-image")
class ZImageAdapter(NegativePromptCFG, DiffusersAdapter):
    NAME = "z-image"
    PIPELINE = "ZImagePipeline"
    NEGATIVE_FIRST = False  # the pipeline's order: the prompts' half first

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    def default_resolution(self) -> int:
        return DEFAULT_RESOLUTION

    def default_lora_targets(self) -> list[str]:
        names = [n for n, m in self._transformer().named_modules() if isinstance(m, torch.nn.Linear)]
        return [t for t in Z_IMAGE_LORA_TARGETS if any(n.endswith("." + t) for n in names)]

    def default_shift(self) -> float:
        """The scheduler config's shift (3 for Z-Image-Turbo), or exp(mu) for its image tokens if it shifts
        dynamically."""
        _, h, w = self.latent_shape()
        return self.scheduler_shift((h // 2) * (w // 2))

    def max_sequence_length(self) -> int:
        return self.options["max_sequence_length"] or 512

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # _encode_prompt writes the templated text back into the list it is given: hand it a copy
        features = self.pipeline._encode_prompt(prompt=list(prompts), device=self.device,
                                                max_sequence_length=self.max_sequence_length())
        padded = torch.zeros(len(features), self.max_sequence_length(), features[0].shape[-1],
                             device=features[0].device, dtype=features[0].dtype)
        for i, feature in enumerate(features):
            padded[i, :len(feature)] = feature
        lengths = torch.tensor([len(f) for f in features], device=padded.device)
        return {"prompt_embeds": padded, "prompt_lengths": lengths}

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        rows, x, s = self._with_negative(rows, x.to(self.device, dtype), s)
        embeds = self.cache.gather("prompt_embeds", rows, self.device, dtype)
        if is_fake(rows):  # `ngrpo plan` traces shapes only; its stand-in captions fill the padded length
            lengths = [embeds.shape[1]] * len(rows)
        else:  # read row by row from the cache (plain CPU tensors): no device sync, nothing new under `ngrpo plan`
            lengths = [int(self.cache.tensors["prompt_lengths"][i].tolist()) for i in rows.tolist()]
        captions = [embeds[i, :n] for i, n in enumerate(lengths)]
        frames = list(x.unsqueeze(2).unbind(0))  # (C, 1, H, W) each: one frame
        # 1 - s, computed as the pipeline does from its timesteps (1000 s): the same float32 value for the same sigma
        time = (1000.0 - s.float() * 1000.0) / 1000.0
        out = self.net(frames, time, captions, return_dict=False)[0]
        v = -torch.stack([o.float() for o in out]).squeeze(2)  # Z-Image predicts noise-to-data; ours is data-to-noise
        return self._guided(v)

    def _combine(self, text: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The pipeline's pos + g (pos - neg) with g = cfg_scale - 1 (equal to diffusers' usual form but for rounding)."""
        return text + (float(self.options["cfg_scale"]) - 1.0) * (text - uncond)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "ZImageAdapter":
        return cls.from_folder(Path(folder), device, options)
