"""One-GPU speed settings (the config's `speed` section): fp32 master weights, mixed precision, TF32, gradient
checkpointing, torch.compile and the optimizer. Each is a small function the trainer calls once while it builds its parts."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def keeps_master_weights(model_dtype: str, device_type: str, finetune: str, loaded: torch.dtype) -> bool:
    """Whether a run holds its trained network in float32 (fp32 master weights, so fp32 gradients and AdamW moments)
    while it computes in bf16: the default for a full fine-tune whose `model.dtype: auto` loaded the net in half
    precision (on CUDA). Pure bf16 weights round away every AdamW update smaller than 2^-9 of the weight (at lr 1e-6
    a weight above ~0.0005 never moves), so they must be asked for: an explicit `model.dtype: bfloat16`. LoRA is
    unaffected (peft keeps its adapters in float32); the frozen copies, text encoders and VAE stay as loaded."""
    half = loaded in (torch.bfloat16, torch.float16)
    return finetune == "full" and model_dtype == "auto" and device_type == "cuda" and half


def compute_precision(mixed_precision: str, master_weights: bool) -> str:
    """The autocast of the velocity passes: `speed.mixed_precision`, or bf16 for fp32 master weights left at 'no'
    (they compute as the loaded bf16 model did)."""
    return "bf16" if master_weights and mixed_precision == "no" else mixed_precision


def autocast_velocity(velocity: Callable, mixed_precision: str, device: torch.device) -> Callable:
    """v(x, s, cond) run under autocast (bf16/fp16 matmuls, fp32 weights), returned in x's dtype, so rollout
    states, stored velocities and distances stay fp32."""
    if mixed_precision == "no":
        return velocity
    dtype = PRECISIONS[mixed_precision]

    def run(x, s, cond):
        with torch.autocast(device.type, dtype=dtype):
            out = velocity(x, s, cond)
        return out.to(x.dtype)

    return run


def allow_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on CUDA (a process-wide setting; no effect on CPU)."""
    if enabled and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def enable_gradient_checkpointing(adapter) -> None:
    """Through the adapter's own method, if it has one (large adapters know their blocks); else warn."""
    enable = getattr(adapter, "enable_gradient_checkpointing", None)
    if callable(enable):
        enable()
    else:
        warnings.warn(f"speed.gradient_checkpointing: the {type(adapter).__name__} adapter has no "
                      "enable_gradient_checkpointing(); training without it")


def compile_in_place(net: torch.nn.Module) -> None:
    """torch.compile the net's forward in place (Module.compile), so parameter names, hooks, saving and the
    optimizer see the same module as without it."""
    net.compile()


def fused_adamw_applies(params: list) -> bool:
    """torch's fused AdamW updates every parameter in one kernel: 3x faster than the per-parameter loop on the
    built-in model's CPU step (0.9 ms against 2.9 ms), also the fastest on CUDA. It takes plain floating-point
    tensors on CPU or CUDA; sharded (DTensor) parameters keep the default implementation."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch
        DTensor = ()
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                and not isinstance(p, DTensor) for p in params)


def make_optimizer(params: list, lr: float, betas: tuple[float, float], weight_decay: float,
                   name: str) -> torch.optim.Optimizer:
    """AdamW from torch (its fused kernel where the parameters allow it), or bitsandbytes' 8-bit AdamW (its moments
    in 8 bits: a quarter of the memory)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                 fused=True if fused_adamw_applies(params) else None)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("speed.optimizer='adamw8bit' needs the bitsandbytes package, which is not installed "
                              "(pip install bitsandbytes; it runs on CUDA); or set speed.optimizer=adamw") from error
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"speed.optimizer: expected 'adamw' or 'adamw8bit', got {name!r}")


def make_grad_scaler(mixed_precision: str, device: torch.device):
    """fp16 needs loss scaling (its small range underflows gradients); bf16 and fp32 do not."""
    if mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
