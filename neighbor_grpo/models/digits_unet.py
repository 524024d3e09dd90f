"""The compute-bound built-in model: a small conv U-Net on the same 8x8 digit latents, prompts and decoder as the
digits MLP (models/digits.py), about 17 MFLOP per sample forward against the MLP's 1.7.

Why it exists: on the MLP, fixed per-step costs (solver arithmetic, reward, optimizer step) are ~40% of an
iteration, so savings in model evaluations show up diluted in wall-clock. Convolutions share their weights over
pixels, so FLOPs grow with width x pixels while the parameter count (and the optimizer step) stays small: model
passes become >= 90% of a Neighbor GRPO iteration, as they are on FLUX.1 or SD3.5.

Layout (C = `channels`): 8x8xC -> [res blocks] -> stride-2 conv -> 4x4x2C -> [res blocks] -> middle block ->
[res blocks over the concatenated 4x4 skip] -> upsample -> 8x8xC -> [res blocks over the 8x8 skip] -> 1 channel.
Every residual block is FiLM-conditioned on flow time and the digit class, like the MLP's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.digits import DigitsAdapter, timestep_embedding


@dataclass
class DigitsUNetConfig:
    latent_size: int = 8
    """Side of the square one-channel latents (the native 8x8 digits, as the MLP's)."""
    image_size: int = 16
    """Side of the decoded images (bilinear upsampling, the same fixed 'decoder' as the MLP's)."""
    channels: int = 32
    """Width at 8x8; the 4x4 level has twice as many. 32 gives ~17 MFLOP per sample forward."""
    blocks_per_level: int = 1
    """Residual blocks per level on the way down and on the way up."""
    cond_dim: int = 128
    """Width of the time + class embedding."""
    num_classes: int = 10


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups (fewer for the tiny test widths, which must divide)."""
    groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """norm-SiLU-conv, then norm modulated by the conditioning (scale, shift)-SiLU-conv, added to the (projected)
    input. The modulation and the last conv start at zero, so a fresh block is the identity (or its projection)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        for layer in (self.modulation, self.conv2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        scale, shift = self.modulation(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(nn.functional.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


def res_blocks(c_in: int, c_out: int, count: int, cond_dim: int) -> nn.ModuleList:
    """`count` residual blocks, the first going from c_in to c_out channels."""
    return nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out, cond_dim) for i in range(count))


class DigitsUNet(nn.Module):
    """v_theta(x, s, label): predicts the flow-matching velocity eps - x0 for (batch, 1, H, W) latents."""

    def __init__(self, config: DigitsUNetConfig | None = None):
        config = config or DigitsUNetConfig()
        super().__init__()
        self.config = config
        c, n, d = config.channels, config.blocks_per_level, config.cond_dim
        self.time_embed = nn.Sequential(nn.Linear(64, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(config.num_classes, d)
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.down_high_blocks = res_blocks(c, c, n, d)             # 8x8, C
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down_low_blocks = res_blocks(2 * c, 2 * c, n, d)      # 4x4, 2C
        self.middle_blocks = res_blocks(2 * c, 2 * c, 1, d)
        self.up_low_blocks = res_blocks(4 * c, 2 * c, n, d)        # 4x4, input: middle + 4x4 skip
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * c, c, 3, padding=1))
        self.up_high_blocks = res_blocks(2 * c, c, n, d)           # 8x8, input: upsampled + 8x8 skip
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def conditioning(self, s: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """One vector per sample from flow time (a scalar s is every sample's) and the digit class, as the MLP's."""
        s = s.reshape(-1).expand(batch) if s.numel() == 1 else s.reshape(-1)
        return nn.functional.silu(self.time_embed(timestep_embedding(s)) + self.class_embed(labels))

    def forward(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.conditioning(s, labels, x.shape[0])
        h = self.inp(x)
        for block in self.down_high_blocks:
            h = block(h, cond)
        skip_high = h
        h = self.downsample(h)
        for block in self.down_low_blocks:
            h = block(h, cond)
        skip_low = h
        for block in self.middle_blocks:
            h = block(h, cond)
        h = torch.cat([h, skip_low], dim=1)
        for block in self.up_low_blocks:
            h = block(h, cond)
        h = torch.cat([self.upsample(h), skip_high], dim=1)
        for block in self.up_high_blocks:
            h = block(h, cond)
        return self.out(h)


@register_model_adapter("digits-unet")
class DigitsUNetAdapter(DigitsAdapter):
    """The digits adapter (prompts '0'..'9', latents in [-1, 1], bilinear decoder, safetensors + model.json) around
    the U-Net; its checkpoints name the adapter 'digits-unet'."""

    adapter_name = "digits-unet"
    net_class = DigitsUNet
    config_class = DigitsUNetConfig


def forward_flops_per_sample(config: DigitsUNetConfig | None = None, batch: int = 4) -> float:
    """FLOPs of one forward per sample, counted by torch's FlopCounterMode (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = DigitsUNet(config)
    size = net.config.latent_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(batch, 1, size, size), torch.tensor(0.5), torch.zeros(batch, dtype=torch.long))
    return counter.get_total_flops() / batch
