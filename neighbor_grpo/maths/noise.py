"""Random numbers keyed by (seed, iteration, prompt index, candidate index), and Eq. 7's noise neighbourhood.

Keyed generators make a run draw the same numbers on 1 or N processes and after a resume: no global stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROLE_BASE = 1_000_003  # candidate-index slot for the shared base noise e*, distinct from 0..G-1


def keyed_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator whose seed is a hash of the integer keys (numpy's SeedSequence mixes them well)."""
    # the key count goes in first so (a, b) and (a, b, 0) differ; keys wrap to 64 bits, never truncate to 32
    entropy = [len(keys)] + [int(k) % (1 << 64) for k in keys]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    seed = int.from_bytes(words.tobytes(), "little") & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device=device).manual_seed(seed)


def keyed_normal(shape: tuple[int, ...], *keys: int, device: str | torch.device = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from the generator keyed by `keys`."""
    return torch.randn(shape, generator=keyed_generator(*keys), dtype=torch.float32).to(device=device, dtype=dtype)


def perturb_noise(base: torch.Tensor, deltas: torch.Tensor, neighbor_sigma: float) -> torch.Tensor:
    """Eq. 7: e_i = sqrt(1 - sigma^2) e* + sigma d_i; N(0, I) marginally, pairwise correlation 1 - sigma^2."""
    if not 0.0 < neighbor_sigma <= 1.0:
        raise ValueError(f"neighbor_sigma must lie in (0, 1]; got {neighbor_sigma}")
    return math.sqrt(1.0 - neighbor_sigma**2) * base + neighbor_sigma * deltas


def neighbor_noises(shape: tuple[int, ...], group_size: int, neighbor_sigma: float, seed: int, iteration: int,
                    prompt_index: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """G neighbouring initial noises for one prompt, shape (G, *shape), keyed as the spec says."""
    base = keyed_normal(shape, seed, iteration, prompt_index, ROLE_BASE, device=device)
    deltas = torch.stack([keyed_normal(shape, seed, iteration, prompt_index, i, device=device) for i in range(group_size)])
    return perturb_noise(base.unsqueeze(0), deltas, neighbor_sigma)


def independent_noises(shape: tuple[int, ...], group_size: int, seed: int, iteration: int, prompt_index: int,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """G independent initial noises for one prompt (Flow-GRPO style), keyed like the neighbourhood."""
    return torch.stack([keyed_normal(shape, seed, iteration, prompt_index, i, device=device) for i in range(group_size)])
