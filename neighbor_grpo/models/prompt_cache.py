"""Prompt embeddings computed once and handed out as row indices (diffusers adapters)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake


class PromptCache:
    """Prompt embeddings computed once: each prompt gets a row; `encode_prompts` hands out row indices (a LongTensor
    the algorithms index and repeat along dim 0 like any conditioning) and `velocity` gathers the rows. Rows are
    kept as a list (appending never copies the cache, which reaches gigabytes with FLUX's T5 embeddings)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, int] = {}
        self.tensors: dict[str, list[torch.Tensor]] = {}

    def lookup(self, prompts: Sequence[str], encode) -> torch.Tensor:
        """Row indices of `prompts`; new ones go through `encode(list) -> {name: (n, ...) tensor}` in one batch."""
        new = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if new:
            encoded = {k: v.detach().to(self.device) for k, v in encode(new).items()}
            for name, value in encoded.items():
                self.tensors.setdefault(name, []).extend(value.unbind(0))
            for prompt in new:
                self.rows[prompt] = len(self.rows)
        return torch.tensor([self.rows[p] for p in prompts], dtype=torch.long)

    def gather(self, name: str, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache = self.tensors[name]
        if is_fake(rows):  # the planner traces a call whose rows are made inside it (SD3's CFG): no values to read
            stacked = torch.stack(cache)
            return stacked.index_select(0, rows.to(stacked.device, torch.long)).to(device=device, dtype=dtype)
        # real rows: only the rows asked for are stacked (stacking the whole cache would copy gigabytes per call)
        return torch.stack([cache[i] for i in rows.tolist()]).to(device=device, dtype=dtype)
