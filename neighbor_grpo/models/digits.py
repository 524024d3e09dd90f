"""The built-in model: a small class-conditional flow-matching velocity network for 8x8 digit latents.

Small enough to pretrain and align on two CPU cores in minutes; the architecture is a residual MLP over
pixels with FiLM conditioning on flow time and the digit class (in the spirit of nanoGPT: small, bottom-up).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from neighbor_grpo.builtin.data import prompt_to_label
from neighbor_grpo.runs.io import atomic_write_text, load_safetensors, save_safetensors
from neighbor_grpo.models import register_model_adapter


@dataclass
class DigitsNetConfig:
    latent_size: int = 8
    """Side of the square one-channel latents (the native 8x8 digits)."""
    image_size: int = 16
    """Side of the decoded images (latents are upsampled bilinearly, a fixed 'decoder' as in latent diffusion)."""
    hidden: int = 256
    """Width of the residual MLP."""
    depth: int = 4
    """Number of residual blocks."""
    cond_dim: int = 128
    """Width of the time + class embedding."""
    num_classes: int = 10


def timestep_embedding(s: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """Sinusoidal features of flow time s in [0, 1] (periods from 1 to 1/1000 of the unit interval)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=s.device, dtype=torch.float32))
    angles = s.float()[:, None] * freqs[None, :] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FiLMBlock(nn.Module):
    """LayerNorm, modulated by the conditioning (scale, shift), then a two-layer MLP, added back."""

    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(cond_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond).chunk(2, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(z)))


class DigitsFlowNet(nn.Module):
    """v_theta(x, s, label): predicts the flow-matching velocity eps - x0 for (batch, 1, H, W) latents."""

    def __init__(self, config: DigitsNetConfig | None = None):
        config = config or DigitsNetConfig()
        super().__init__()
        self.config = config
        pixels = config.latent_size**2
        self.inp = nn.Linear(pixels, config.hidden)
        self.time_embed = nn.Sequential(nn.Linear(64, config.cond_dim), nn.SiLU(), nn.Linear(config.cond_dim, config.cond_dim))
        self.class_embed = nn.Embedding(config.num_classes, config.cond_dim)
        self.blocks = nn.ModuleList(FiLMBlock(config.hidden, config.cond_dim) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(config.hidden)
        self.out = nn.Linear(config.hidden, pixels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = s.reshape(-1).expand(x.shape[0]) if s.numel() == 1 else s.reshape(-1)
        cond = nn.functional.silu(self.time_embed(timestep_embedding(s)) + self.class_embed(labels))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.out_norm(h)).view_as(x)


@register_model_adapter("digits")
class DigitsAdapter:
    """Adapter for the built-in digits model: prompts '0'..'9', latents are images scaled to [-1, 1].
    Other built-in digits architectures (digits_unet) reuse it by naming their own net and config classes."""

    adapter_name = "digits"
    net_class = DigitsFlowNet
    config_class = DigitsNetConfig

    def __init__(self, net: nn.Module):
        self.net = net

    @classmethod
    def create(cls, config: DigitsNetConfig | None = None, seed: int = 0) -> "DigitsAdapter":
        torch.manual_seed(seed)
        return cls(cls.net_class(config))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def latent_shape(self) -> tuple[int, ...]:
        size = self.net_config.latent_size
        return (1, size, size)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([prompt_to_label(p) for p in prompts], dtype=torch.long, device=self.device)

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x, torch.as_tensor(s, dtype=x.dtype, device=x.device), cond)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """8x8 images in [0, 1] -> latents in [-1, 1]."""
        return images * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images with nominal range [0, 1], NOT clamped (the hacking monitors need the raw values)."""
        size = self.net_config.image_size
        images = (latents + 1.0) / 2.0
        if images.shape[-1] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    def reference_images(self) -> torch.Tensor:
        """Held-out real digits as decoded images (the realism monitor compares samples with these)."""
        from neighbor_grpo.builtin.data import load_digits_images, train_test_split

        if getattr(self, "_reference", None) is None:
            images, labels = load_digits_images(self.net_config.latent_size)
            _, test_idx = train_test_split(len(labels))
            self._reference = self.decode(self.encode_images(images[test_idx]))
        return self._reference

    @property
    def net_config(self):
        net = self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net
        return net.config

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """The current weights as a standalone model; a LoRA is merged in and also saved alone (lora.safetensors)."""
        from neighbor_grpo.models.lora import is_lora, lora_state_dict, merged_copy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        net = merged_copy(self.net) if is_lora(self.net) else self.net
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_safetensors(state, folder / "model.safetensors")
        if is_lora(self.net):
            save_safetensors(lora_state_dict(self.net), folder / "lora.safetensors")
        meta = {"adapter": self.adapter_name, "config": asdict(self.net_config), **(extra or {})}
        atomic_write_text(folder / "model.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "DigitsAdapter":
        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        try:
            config = cls.config_class(**meta.get("config", {}))
        except TypeError as error:
            raise ValueError(f"{folder / 'model.json'}: 'config' does not describe a {cls.adapter_name} model "
                             f"({error})") from error
        net = cls.net_class(config)
        state = load_safetensors(folder / "model.safetensors")
        missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
        if missing or unexpected:
            raise ValueError(f"{folder / 'model.safetensors'}: weights do not fit the {cls.adapter_name} model in "
                             f"model.json (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        try:
            net.load_state_dict(state)
        except RuntimeError as error:
            first = [line.strip() for line in str(error).splitlines() if "size mismatch" in line][:3]
            raise ValueError(f"{folder / 'model.safetensors'}: incompatible with the model in model.json "
                             f"(e.g. {'; '.join(first) or error})") from error
        return cls(net.to(device))
