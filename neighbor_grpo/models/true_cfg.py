"""What the adapters with true classifier-free guidance and a negative prompt share (SD3/SD3.5, Wan): CFG is on
when `model.cfg_scale` > 1, the negative prompt is encoded into the cache beside the prompts, and `velocity` runs
the adapter's `_velocity(x, timesteps, rows)` in chunks."""

from __future__ import annotations

import torch


class NegativePromptCFG:
    """A mixin before DiffusersAdapter; the adapter writes `_velocity` (both CFG halves in one batch)."""

    @property
    def uses_cfg(self) -> bool:
        return float(self.options["cfg_scale"]) > 1.0

    def encode_prompts(self, prompts):
        if self.uses_cfg:
            super().encode_prompts([self.options["negative_prompt"]])
        return super().encode_prompts(prompts)

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._chunked(lambda xs, ts, rows: self._velocity(xs, ts, rows).to(x.dtype),
                             x, self._timesteps(s, x.shape[0]), cond)
