"""Qwen-Image 2.1 through diffusers' QwenImage21Pipeline: a single-stream block-causal transformer over one joint
text/image sequence, Qwen3-VL prompts, a 16x VAE with unpatched latents. Text-to-image only: the pipeline's
image-conditioned generation (condition images in the VL prompt and as latent tokens) is not supported here.

As `QwenImage21Pipeline` does it (text-to-image):
- prompts go through Qwen3-VL inside the pipeline's raw t2i template string (not `apply_chat_template`); the hidden
  states of the last decoder layer before the final norm, the system turn dropped, are the text condition
  (`encode_prompt` itself: the adapter caches what it returns, each prompt with its true length);
- the transformer reads the text, then the image, as one sequence, and the image block's RoPE frame position is the
  number of text positions before it, padding included: in the pipeline a prompt's image depends on how much its
  batch pads it. `velocity` never pads: it calls the transformer once per prompt length in its batch, so a row's
  velocity is the pipeline's for that prompt alone, whatever it is batched with;
- latents are (batch, C, H/16, W/16) with C = 64 (the VAE's z_dim); the transformer takes them unpatched (one token
  per latent pixel, a spatial flatten), `img_mask` marks the target image's slots (one per 2x2 tokens) after the
  text, and the velocity is the output's last H W tokens;
- the timestep is the flow time sigma in [0, 1] (the pipeline divides its 0..1000 by 1000);
- no KV cache: the pipeline caches the text's keys and values across steps (valid because `causal_condition`
  modulates text tokens at t = 0, so they do not depend on the step); in training they depend on the weights being
  trained and every call is a fresh forward, which gives the same velocity up to float rounding (the parity test
  compares against the pipeline with its cache on);
- true CFG (`model.cfg_scale` > 1 with `model.negative_prompt`): plain v_neg + scale (v_pos - v_neg), no rescaling.
  Qwen-Image 2.1 is meant to be sampled without guidance (the pipeline's default true_cfg_scale is 1): set
  `model.cfg_scale: 1`;
- the VAE normalises latents per channel with `latents_mean`/`latents_std` (Qwen-Image's `_decode_chunk`);
- sigmas: the pipeline samples on the config's `sample_sigmas` (its length is the number of steps), shifted by the
  scheduler with exp(mu) for H W / 256 tokens. Our solvers take a uniform grid and a shift: `default_shift` is that
  same exp(mu); `pipeline_sigmas()` gives the pipeline's own grid (the parity test integrates on it).

The processor: transformers' Qwen3VLProcessor requires a video processor, whose class needs torchvision (not a
dependency here), so, as for Qwen-Image-Edit, the adapter builds the processor from the checkpoint's processor/
files (tokenizer, PIL image processor, chat template) without one and hands it to `from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np

import torch
from torch._subclasses.fake_tensor import is_fake

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.diffusers_common import DiffusersAdapter
from neighbor_grpo.models.qwen_image import QwenImageAdapter, image_only_processor_class
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.runs.io import atomic_write_text

STANDARD_PROCESSOR = ["transformers", "Qwen3VLProcessor"]  # what a saved QwenImage21Pipeline's model_index.json names
SLOT_TOKENS = 4  # each of the transformer's image slots stands for 2x2 latent tokens


def processor_without_video(tokenizer, chat_template: str, image_processor=None):
    """The pipeline's processor from its parts (Qwen3-VL's image processor: 16 px patches merged 2x2)."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = image_processor or Qwen2VLImageProcessorPil(patch_size=16, merge_size=2)
    return image_only_processor_class("Qwen3VLProcessor")(image_processor, tokenizer, chat_template=chat_template)


def load_processor(base: Path):
    """The checkpoint's processor/ (tokenizer, image processor, chat template) as an image-only Qwen3VLProcessor."""
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessorPil

    folder = Path(base) / "processor"
    template = folder / "chat_template.jinja"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing; a Qwen-Image 2.1 folder holds the text encoder's processor there")
    if template.is_file():
        chat_template = template.read_text()
    elif (folder / "chat_template.json").is_file():
        chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    else:
        raise FileNotFoundError(f"{folder}: expected chat_template.jinja (or chat_template.json), the processor's "
                                "chat template, which the pipeline needs to count the system tokens it drops")
    return processor_without_video(Qwen2TokenizerFast.from_pretrained(folder, local_files_only=True), chat_template,
                                   Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True))


def declare_standard_processor(folder: Path) -> None:
    """A saved pipeline names the processor as transformers' Qwen3VLProcessor, not the image-only subclass, so
    diffusers loads it anywhere torchvision is installed; the files are the same."""
    processor_config = folder / "processor" / "processor_config.json"
    for path, key, value in ((folder / "model_index.json", "processor", STANDARD_PROCESSOR),
                             (processor_config, "processor_class", STANDARD_PROCESSOR[1])):
        if path.is_file():
            config = json.loads(path.read_text())
            config[key] = value
            atomic_write_text(path, json.dumps(config, indent=2))


@register_model_adapter("qwen_image21")
class QwenImage21Adapter(NegativePromptCFG, DiffusersAdapter):
    NAME = "qwen_image21"
    PIPELINE = "QwenImage21Pipeline"
    NEGATIVE_FIRST = False  # order of the halves in our one doubled batch (the pipeline makes two calls)

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    def default_resolution(self) -> int:
        return 1024  # the pipeline's `output_resolution`

    def default_shift(self) -> float:
        """exp(mu) for this resolution's H W latent tokens (unpatched), as the pipeline computes mu."""
        _, h, w = self.latent_shape()
        return self.scheduler_shift(h * w)

    def pipeline_sigmas(self) -> torch.Tensor:
        """The pipeline's own grid at this resolution: `sample_sigmas` (else 40 uniform steps, its default), shifted
        by its scheduler, with the terminal 0."""
        sigmas = self.pipeline.config.sample_sigmas
        sigmas = np.linspace(1.0, 1 / 40, 40) if sigmas is None else sigmas
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        # mu is what the pipeline passes; a scheduler without dynamic shifting ignores it
        scheduler.set_timesteps(sigmas=sigmas, mu=math.log(self.default_shift()))
        return scheduler.sigmas.float()

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _ = self.pipeline.encode_prompt(prompt=[str(p) for p in prompts], device=self.device)
        lengths = torch.full((len(prompts),), embeds.shape[1]) if mask is None else mask.sum(dim=1)
        return {"prompt_embeds": embeds, "prompt_lengths": lengths}

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.to(self.device, self.dtype).flatten(2).transpose(1, 2)  # the pipeline's _pack_latents: unpatched
        rows, tokens, s = self._with_negative(rows, tokens, s)
        if is_fake(rows):  # `ngrpo plan` traces shapes only: one call at the cached length
            out = self._call(tokens, s, self.cache.gather("prompt_embeds", rows, self.device, self.dtype), H, W)
        else:
            lengths = torch.stack([self.cache.tensors["prompt_lengths"][i] for i in rows.tolist()]).cpu()
            parts, order = [], []
            for length in lengths.unique().tolist():  # no padding: see the module docstring
                picked = (lengths == length).nonzero().flatten()  # CPU indices
                embeds = self.cache.gather("prompt_embeds", rows[picked], self.device, self.dtype)[:, :length]
                parts.append(self._call(tokens[picked.to(tokens.device)], s[picked.to(s.device)], embeds, H, W))
                order.append(picked)
            out = torch.cat(parts)[torch.cat(order).argsort().to(tokens.device)]
        return self._guided(out).transpose(1, 2).reshape(B, C, H, W)

    def _call(self, tokens: torch.Tensor, s: torch.Tensor, embeds: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """One transformer call on unpadded prompts of one length: the velocity at the target image's tokens."""
        batch, text = tokens.shape[0], embeds.shape[1]
        # img_mask: no image slot among the text positions, then the target image's slots
        slots = torch.ones(batch, text + H * W // SLOT_TOKENS, dtype=torch.bool, device=self.device)
        slots[:, :text] = False
        # positional hidden states: the trainer's call counter reads the batch size from the first input
        out = self.net(tokens, encoder_hidden_states=embeds, timestep=s.to(self.dtype),
                       img_shapes=[[(1, H, W)]] * batch, img_mask=slots, return_dict=False)[0]
        return out[:, -H * W:]

    _decode_chunk = QwenImageAdapter._decode_chunk  # the same per-channel normalisation and one-frame video VAE

    def _save_pipeline(self, folder: Path) -> None:
        """The base's pipeline folder (its `sample_sigmas` kept: DiffusersAdapter.pipeline_settings), with
        model_index.json naming transformers' processor class, not our image-only one, which diffusers cannot import."""
        super()._save_pipeline(folder)
        declare_standard_processor(folder)

    @classmethod
    def loaded_components(cls, base: Path) -> dict:
        return {"processor": load_processor(base)}

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "QwenImage21Adapter":
        import diffusers

        if not hasattr(diffusers, cls.PIPELINE):  # the floor in pyproject is older: one line, not an AttributeError
            raise ImportError(f"{folder}: a Qwen-Image 2.1 folder needs a diffusers release with {cls.PIPELINE} "
                              f"(0.42.1 has it; installed: {diffusers.__version__}): pip install -U diffusers")
        return cls.from_folder(Path(folder), device, options)
