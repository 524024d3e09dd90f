"""Training cost in forward-pass equivalents, defined once (trainer counters, `ngrpo compare`, throughput.py).

A forward-equivalent is one per-sample forward pass of the velocity net. A with-grad forward is followed by its
backward: a full fine-tune's backward computes gradients of the inputs and of the weights (about 2 forwards), a
LoRA backward only those of the inputs through the frozen weights (about 1 forward; the adapters are tiny). The
count is per sample the net sees, so with classifier-free guidance each half of the doubled batch counts.
"""

from __future__ import annotations

BACKWARD_FACTORS = {"full": 2.0, "lora": 1.0}


def backward_factor(finetune: str) -> float:
    """b: forward-equivalents of one backward pass, 2 for a full fine-tune and 1 for LoRA."""
    if finetune not in BACKWARD_FACTORS:
        raise ValueError(f"finetune: expected one of {sorted(BACKWARD_FACTORS)}, got {finetune!r}")
    return BACKWARD_FACTORS[finetune]


def forward_equivalents(no_grad: float, with_grad: float, finetune: str) -> float:
    """no-grad forwards + (1 + b) x with-grad forwards."""
    if no_grad < 0 or with_grad < 0:
        raise ValueError(f"forward counts must be >= 0, got no_grad={no_grad}, with_grad={with_grad}")
    return no_grad + (1.0 + backward_factor(finetune)) * with_grad


def cost_note(finetune: str) -> str:
    """The line every table prints under its forward-equivalent columns."""
    return (f"forward-equivalents = no-grad forwards + (1 + b) x with-grad forwards, b = {backward_factor(finetune):g} "
            f"({finetune} fine-tune), per sample the net sees")
