"""`builtin:words` as a diffusers pipeline: a small SD3 transformer (diffusers' `SD3Transformer2DModel`) drawing
16x64 one-channel word images in pixel space, conditioned by a learned character encoder instead of CLIP/T5.

It is a real diffusers pipeline folder (model_index.json, `save_pretrained`/`from_pretrained`, diffusers-format
LoRA files through `SD3LoraLoaderMixin`), so the run loads it through the shared diffusers adapter base and LoRA
targets, checkpointing, FSDP wrapping and export are the code real SD3 models use. `WordsPipeline.__call__` renders
with diffusers' own FlowMatchEulerDiscreteScheduler: the reference a LoRA export is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.models.modeling_utils import ModelMixin

from neighbor_grpo.builtin.words import ALPHABET, MAX_LETTERS, prompt_to_word

PAD = 0  # token 0 pads; letters are 1..26


class CharacterEncoder(ModelMixin, ConfigMixin):
    """Letters -> (batch, max_letters, dim) token states for the transformer's joint attention, and a pooled
    (batch, pooled_dim) summary for its AdaLN conditioning. A letter embedding plus a learned position embedding and
    one residual convolution over neighbouring letters: the word's spelling is all it encodes. (No torch
    TransformerEncoderLayer: its eval-mode fast path zeroes padded positions, so rollouts would differ from training.)"""

    @register_to_config
    def __init__(self, dim: int = 128, pooled_dim: int = 128, max_letters: int = MAX_LETTERS):
        super().__init__()
        self.letters = nn.Embedding(len(ALPHABET) + 1, dim, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(max_letters, dim) * 0.02)
        self.neighbours = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.pooled = nn.Linear(dim, pooled_dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (batch, max_letters) letter ids, PAD after the word."""
        ids = torch.full((len(prompts), self.config.max_letters), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            word = prompt_to_word(prompt)
            ids[row, :len(word)] = torch.tensor([ALPHABET.index(c) + 1 for c in word])
        return ids.to(self.device)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.letters(ids) + self.positions
        states = self.norm(states + nn.functional.gelu(self.neighbours(states.transpose(1, 2)).transpose(1, 2)))
        mask = (ids != PAD).unsqueeze(-1).to(states.dtype)
        pooled = self.pooled((states * mask).sum(1) / mask.sum(1).clamp(min=1))
        return states, pooled


@dataclass
class WordsModelConfig:
    """The measured recipe of issue #24: 2.3 M parameters, patch 4 on 16x64 (64 image tokens)."""

    height: int = 16
    width: int = 64
    patch_size: int = 4
    dim: int = 128
    """Transformer width (heads x head_dim)."""
    heads: int = 4
    num_layers: int = 4


def create_words_pipeline(config: WordsModelConfig = WordsModelConfig(), seed: int = 0) -> "WordsPipeline":
    """A freshly initialised pipeline (random weights keyed by `seed`)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=config.height, patch_size=config.patch_size, in_channels=1, out_channels=1,
        num_layers=config.num_layers, attention_head_dim=config.dim // config.heads, num_attention_heads=config.heads,
        joint_attention_dim=config.dim, caption_projection_dim=config.dim, pooled_projection_dim=config.dim,
        pos_embed_max_size=max(config.height, config.width) // config.patch_size)
    encoder = CharacterEncoder(dim=config.dim, pooled_dim=config.dim)
    # shift 1: the grid is the plain uniform one the solvers use for this model (pixel space, 64 tokens)
    return WordsPipeline(transformer, encoder, FlowMatchEulerDiscreteScheduler(shift=1.0))


class WordsPipeline(DiffusionPipeline, SD3LoraLoaderMixin):
    """transformer (SD3Transformer2DModel, 1 channel in and out), char_encoder (CharacterEncoder), scheduler.
    Latents are the images themselves, (batch, 1, 16, 64) in [-1, 1]; there is no VAE."""

    model_cpu_offload_seq = "char_encoder->transformer"
    _lora_loadable_modules = ["transformer"]
    text_encoder = text_encoder_2 = None  # SD3LoraLoaderMixin looks for CLIP encoders; this pipeline has none

    def __init__(self, transformer: SD3Transformer2DModel, char_encoder: CharacterEncoder,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, char_encoder=char_encoder, scheduler=scheduler)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """SD3's loader, transformer only: SD3LoraLoaderMixin would also look for CLIP LoRA keys and warn that this
        pipeline (which has no CLIP encoders) has none."""
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'")
        self.load_lora_into_transformer(state_dict, transformer=self.transformer, adapter_name=adapter_name,
                                        metadata=metadata, _pipeline=self)

    def latent_shape(self) -> tuple[int, int, int]:
        sample = self.transformer.config.sample_size  # the height; width is 4x (16x64 words)
        return (self.transformer.config.in_channels, sample, 4 * sample)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.char_encoder(self.char_encoder.tokenize(list(prompts)))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 32, latents: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, sigmas: list[float] | None = None) -> torch.Tensor:
        """Images (batch, 1, 16, 64) in [0, 1] (not clamped), by Euler steps of diffusers' flow-matching scheduler
        from `latents` (default: standard normal noise drawn from `generator`). `sigmas`: the grid without its final
        0, as diffusers' SD3 pipeline takes it (default: the scheduler's own, which ends at 1/1000, not 0)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        dtype = self.transformer.dtype
        embeds, pooled = (t.to(dtype) for t in self.encode_prompt(prompts))
        if latents is None:
            latents = torch.randn((len(prompts), *self.latent_shape()), generator=generator)
        x = latents.to(self.device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device, sigmas=sigmas)
        for t in self.scheduler.timesteps:
            v = self.transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                 timestep=t.expand(len(x)), return_dict=False)[0]
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return (x.float() + 1.0) / 2.0
