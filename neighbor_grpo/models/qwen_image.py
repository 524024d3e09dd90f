"""Qwen-Image through diffusers: QwenImageTransformer2DModel (MM-DiT, 60 blocks), Qwen2.5-VL prompts, true CFG.

As `QwenImagePipeline` does it:
- prompts go through Qwen2.5-VL inside the pipeline's chat template; the last hidden state of the prompt's own
  tokens (the template's first 34 tokens dropped) is the text condition, with a padding mask. The cache keeps each
  prompt's embeddings padded to its encoding batch with its true length; `velocity` re-pads the rows it gathers to
  the longest of its batch and masks the rest (a masked key adds exactly zero, so the padding length does not
  change the velocity beyond float rounding);
- latents are kept unpacked, (batch, C, H, W) with C = 16; `velocity` packs them into 2x2 patch tokens with the
  pipeline's `_pack_latents`, passes `img_shapes` for the RoPE, and unpacks its (batch, C, 1, H, W) layout;
- the transformer takes the flow time sigma in [0, 1] as its timestep (the pipeline divides its 0..1000 by 1000);
- true classifier-free guidance (`model.cfg_scale` > 1, with `model.negative_prompt`; Qwen-Image's card uses 4.0
  and " "): v = v_neg + scale (v_pos - v_neg), then rescaled per token to the norm of v_pos, as the pipeline does;
- the VAE (AutoencoderKLQwenImage, a video VAE with one frame) normalises latents per channel with the config's
  `latents_mean`/`latents_std`;
- the sigma shift is FLUX's resolution-dependent exp(mu) (Qwen-Image's scheduler has `use_dynamic_shifting`).
  Its scheduler also stretches the grid so the last non-zero sigma is `shift_terminal` (0.02); our rollouts use
  the shifted grid without that stretch (the parity test integrates on the pipeline's own sigmas).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.models.diffusers_common import DiffusersAdapter


def padded_rows(rows: list[torch.Tensor], lengths: list[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached prompt embeddings cut to their true lengths and padded to the longest: (embeds, mask), the mask None
    when no row is padded (the pipeline passes None then, too)."""
    longest = max(lengths)
    embeds = torch.stack([torch.cat([row[:n], row.new_zeros(longest - n, row.shape[-1])]) for row, n in zip(rows, lengths)])
    mask = torch.stack([torch.arange(longest) < n for n in lengths]).to(device=device, dtype=torch.long)
    return embeds.to(device=device, dtype=dtype), (None if all(n == longest for n in lengths) else mask)


def guided(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG on packed tokens: the guided velocity, rescaled per token to the conditional one's norm."""
    combined = negative + scale * (positive - negative)
    return combined * (positive.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


@functools.cache
def image_only_processor_class(name: str) -> type:
    """transformers' `name` (Qwen2VLProcessor for the Edit models, Qwen3VLProcessor for 2.1) without its video
    processor, whose loading needs torchvision, which the project never installs. ProcessorMixin reads a processor's
    sub-processors from its __init__'s signature, so the subclass's signature names the image processor and the
    tokenizer only."""
    import transformers

    base = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{name}", (base,), {"__init__": __init__, "__module__": __name__})


@register_model_adapter("qwen_image")
class QwenImageAdapter(NegativePromptCFG, DiffusersAdapter):
    NAME = "qwen_image"
    PIPELINE = "QwenImagePipeline"
    PACKED_CHANNELS = 4  # 2x2 latent pixels packed into each token's input
    NEGATIVE_FIRST = False  # the pipeline's one call on [conditional; negative]

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)

    def default_shift(self) -> float:
        """exp(mu) for this resolution's image tokens ((H/2)(W/2) latents), as the pipeline computes mu."""
        _, h, w = self.latent_shape()
        return self.scheduler_shift((h // 2) * (w // 2))

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        length = self.options["max_sequence_length"] or 1024
        embeds, mask = self.pipeline.encode_prompt(prompt=[str(p) for p in prompts], device=self.device,
                                                   max_sequence_length=length)
        lengths = torch.full((len(prompts),), embeds.shape[1]) if mask is None else mask.sum(dim=1)
        return {"prompt_embeds": embeds, "prompt_lengths": lengths}

    def text_condition(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_fake(rows):  # `ngrpo plan` traces shapes only (CFG makes rows inside the call): full-length captions
            return self.cache.gather("prompt_embeds", rows, self.device, self.dtype), None
        indices = rows.tolist()
        cached = [self.cache.tensors["prompt_embeds"][i] for i in indices]
        # tolist, not int(): the planner calls this under a fake mode, where int() of a real tensor has no value
        lengths = [int(self.cache.tensors["prompt_lengths"][i].tolist()) for i in indices]
        return padded_rows(cached, lengths, self.device, self.dtype)

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pipeline, dtype = self.pipeline, self.dtype
        B, C, H, W = x.shape
        tokens = pipeline._pack_latents(x.to(self.device, dtype), B, C, H, W)
        rows, tokens, s = self._with_negative(rows, tokens, s)
        embeds, mask = self.text_condition(rows)
        # positional hidden states: the trainer's call counter reads the batch size from the first input
        out = self.net(tokens, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, timestep=s.to(dtype),
                       img_shapes=[[(1, H // 2, W // 2)]] * tokens.shape[0], return_dict=False)[0]
        factor = pipeline.vae_scale_factor
        return pipeline._unpack_latents(self._guided(out), H * factor, W * factor, factor)[:, :, 0]

    def _combine(self, text: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:  # on the packed tokens
        return guided(text, uncond, float(self.options["cfg_scale"]))

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, C, H, W) -> images in [0, 1], float32: the pipeline's per-channel un-normalisation, then the
        video VAE on one frame ((b, C, 1, H, W) in and out)."""
        vae = self.pipeline.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        frames = vae.decode((z * std.to(z) + mean.to(z))[:, :, None], return_dict=False)[0][:, :, 0]
        return (frames.float() + 1.0) / 2.0

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "QwenImageAdapter":
        return cls.from_folder(Path(folder), device, options)

