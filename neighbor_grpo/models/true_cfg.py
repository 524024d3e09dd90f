"""What the adapters with true classifier-free guidance and a negative prompt share (SD3/SD3.5, Wan, Qwen-Image,
Z-Image, FLUX.2 [klein]): CFG is on when `model.cfg_scale` > 1, the negative prompt is encoded into the cache beside
the prompts, and one transformer call runs both halves: `_with_negative` doubles the batch in the pipeline's order,
`_guided` splits the output and combines the halves."""

from __future__ import annotations

import torch


class NegativePromptCFG:
    """A mixin before DiffusersAdapter. The pipelines differ in the order of the halves (`NEGATIVE_FIRST`) and in
    how they combine them (`_combine`, which an adapter overrides)."""

    NEGATIVE_FIRST = True
    """diffusers' SD3 and Wan put the unconditional half first; Qwen-Image, Z-Image and FLUX.2 put the prompts first."""

    @property
    def uses_cfg(self) -> bool:
        return float(self.options["cfg_scale"]) > 1.0

    def encode_prompts(self, prompts):
        if self.uses_cfg:  # the negative prompt is one more cached row
            super().encode_prompts([self.options["negative_prompt"]])
        return super().encode_prompts(prompts)

    def _with_negative(self, rows: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(rows, *inputs) for one call on both halves: the negative prompt's row beside each row, each input
        repeated; unchanged without CFG."""
        if not self.uses_cfg:
            return (rows, *inputs)
        negative = torch.full_like(rows, self.cache.rows[self.options["negative_prompt"]])
        rows = torch.cat([negative, rows] if self.NEGATIVE_FIRST else [rows, negative])
        return (rows, *(torch.cat([t, t]) for t in inputs))

    def _guided(self, out: torch.Tensor) -> torch.Tensor:
        """The output of a call on `_with_negative`'s batch -> the guided velocity (the output itself without CFG)."""
        if not self.uses_cfg:
            return out
        if self.NEGATIVE_FIRST:
            uncond, text = out.chunk(2)
        else:
            text, uncond = out.chunk(2)
        return self._combine(text, uncond)

    def _combine(self, text: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """diffusers' v_neg + cfg_scale (v_pos - v_neg)."""
        return uncond + float(self.options["cfg_scale"]) * (text - uncond)
