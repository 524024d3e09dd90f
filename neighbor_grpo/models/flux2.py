"""FLUX.2 through diffusers: [dev] (Flux2Pipeline: Mistral Small 3 text encoder, guidance embedding) and [klein]
(Flux2KleinPipeline: Qwen3 text encoder, true classifier-free guidance unless step-distilled).

Latents are the ones FLUX.2's transformer sees: the VAE latents patchified 2x2 and normalised by the VAE's batch-norm
statistics, (batch, 128, H/16, W/16) for the real models; the initial noise is drawn there, as the pipelines do.
`velocity` flattens them into tokens with (t, h, w, l) position ids; `decode` undoes the normalisation and the
patches before the VAE. Prompts are encoded by the pipeline's own `encode_prompt` (its chat template, and the
hidden states of text-encoder layers 10/20/30 for [dev], 9/18/27 for [klein], stacked along the width).

The sigma grid: FLUX.2 computes mu from an empirical fit of the image tokens AND the number of steps
(`compute_empirical_mu`), so `default_shift(steps)` takes the step count; the trainer passes the rollout's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.models.diffusers_common import DiffusersAdapter

# The peers' FLUX.2 LoRA targets (DiffSynth-Studio's FLUX.2 recipes): the double blocks' attention and feed-forward,
# the single blocks' fused QKV+MLP input projection. (The single blocks' `attn.to_out` is left out: as a name suffix
# it would also match the double blocks' to_out ModuleList.)
FLUX2_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "linear_in", "linear_out", "to_qkv_mlp_proj"]
DEFAULT_STEPS = 50  # the pipelines' num_inference_steps, for a shift asked without a step count


@register_model_adapter("flux2")
class Flux2Adapter(NegativePromptCFG, DiffusersAdapter):
    """FLUX.2 [dev]: `model.guidance` (default 3.5; the pipeline's default is 4) enters the guidance embedding."""

    NAME = "flux2"
    PIPELINE = "Flux2Pipeline"
    NEGATIVE_FIRST = False  # [klein]'s CFG: the prompts' half first

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    def default_resolution(self) -> int:
        return int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)

    def default_lora_targets(self) -> list[str]:
        names = [n for n, m in self._transformer().named_modules() if isinstance(m, torch.nn.Linear)]
        return [t for t in FLUX2_LORA_TARGETS if any(n.endswith("." + t) for n in names)]

    def latent_shape(self) -> tuple[int, int, int]:
        height, width = self.resolution()
        patch = self.pipeline.vae_scale_factor * 2
        return (self.pipeline.transformer.config.in_channels, height // patch, width // patch)

    def default_shift(self, steps: int | None = None) -> float:
        """exp(mu) of FLUX.2's empirical fit for this many image tokens and `steps` (the pipeline's default 50 when
        not given); the scheduler config's shift if it does not shift dynamically."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        _, h, w = self.latent_shape()
        return math.exp(compute_empirical_mu(image_seq_len=h * w, num_steps=int(steps or DEFAULT_STEPS)))

    @property
    def uses_cfg(self) -> bool:
        return False  # [dev] is guidance-distilled: its guidance is an embedding, not a second pass

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(prompt=list(prompts), device=self.device,
                                                max_sequence_length=self.options["max_sequence_length"] or 512)
        return {"prompt_embeds": embeds}

    def _guidance(self, batch: int) -> torch.Tensor | None:
        if not self.pipeline.transformer.config.guidance_embeds:
            return None
        return torch.full((batch,), float(self.options["guidance"]), device=self.device, dtype=torch.float32)

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pipeline, dtype = self.pipeline, self.dtype
        rows, x, s = self._with_negative(rows, x.to(self.device, dtype), s)
        B, C, H, W = x.shape
        embeds = self.cache.gather("prompt_embeds", rows, self.device, dtype)
        tokens = pipeline._pack_latents(x)  # (B, H*W, C), row-major like the pipeline's position ids
        image_ids = pipeline._prepare_latent_ids(x).to(self.device)
        text_ids = pipeline._prepare_text_ids(embeds).to(self.device)
        # FLUX.2 takes timesteps in [0, 1] and scales them (and the guidance) by 1000 itself
        out = self.net(tokens, encoder_hidden_states=embeds, timestep=s.to(dtype), img_ids=image_ids,
                       txt_ids=text_ids, guidance=self._guidance(B), return_dict=False)[0]
        return self._guided(out.permute(0, 2, 1).reshape(B, C, H, W))

    def vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patch latents -> what the VAE decodes: undo the batch-norm statistics, then the 2x2 patches."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        std = std.to(latents.device, latents.dtype)
        return self.pipeline._unpatchify_latents(latents * std + mean)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Patch latents (b, C, h, w) -> images in [0, 1], float32: `vae_latents`, then the VAE."""
        return (self.pipeline.vae.decode(self.vae_latents(z), return_dict=False)[0].float() + 1.0) / 2.0

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "Flux2Adapter":
        return cls.from_folder(Path(folder), device, options)


@register_model_adapter("flux2-klein")
class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2 [klein] 4B / 9B: no guidance embedding. The base models use true CFG (`model.cfg_scale` > 1, the
    pipeline's guidance_scale, default 4; `model.negative_prompt`, the pipeline's ""), which runs the transformer
    on twice the batch; the step-distilled ones (model_index `is_distilled`) ignore it, as the pipeline does."""

    NAME = "flux2-klein"
    PIPELINE = "Flux2KleinPipeline"

    @property
    def uses_cfg(self) -> bool:
        return float(self.options["cfg_scale"]) > 1.0 and not self.pipeline.config.get("is_distilled", False)

    def _save_pipeline(self, folder: Path) -> None:
        # the pipeline's own setting (step-distilled or not) is a constructor argument, not a component
        from neighbor_grpo.models.lora import is_lora, merged_copy

        transformer = merged_copy(self.net) if is_lora(self.net) else self._transformer()
        if hasattr(transformer, "get_base_model"):
            transformer = transformer.get_base_model()
        components = {**self.pipeline.components, "transformer": transformer}
        type(self.pipeline)(**components, is_distilled=self.pipeline.config.get("is_distilled", False)).save_pretrained(
            str(folder))
