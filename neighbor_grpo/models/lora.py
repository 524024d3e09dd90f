"""LoRA through peft, EMA of trained weights, and the frozen reference velocity (separate small utilities)."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def net_swapped(adapter, net: nn.Module) -> Iterator[None]:
    """The adapter computes with `net` in place of `adapter.net` for the block (a frozen reference, a DDP wrapper,
    an unsharded export copy): adapters read `self.net` in `velocity` and `save`, so this is the one seam."""
    original, adapter.net = adapter.net, net
    try:
        yield
    finally:
        adapter.net = original


def apply_lora(net: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Wrap `net` with peft LoRA adapters on the named linear layers; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    # a target is a name suffix, as peft matches it: 'fc1', or dotted like diffusers' 'to_out.0'
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        present = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"optim.lora_targets: no linear layer named {missing} in the model; linear layers: {present}")
    return get_peft_model(net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))


def is_lora(net: nn.Module) -> bool:
    return hasattr(net, "disable_adapter") and hasattr(net, "merge_and_unload")


def merged_copy(net: nn.Module) -> nn.Module:
    """A plain module with the LoRA merged into the weights (the trained net itself is left as it is)."""
    clone = copy.deepcopy(net)
    return clone.merge_and_unload() if is_lora(clone) else clone


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}


@contextlib.contextmanager
def reference_mode(net: nn.Module, frozen_copy: nn.Module | None) -> Iterator[nn.Module]:
    """The reference (pre-training) network: LoRA disabled, or a frozen copy for full fine-tunes."""
    if is_lora(net):
        with net.disable_adapter():
            yield net
    else:
        yield frozen_copy


def make_net_velocity(adapter, net: nn.Module) -> Callable:
    """v(x, s, cond) of the adapter computed with another network `net` (an algorithm's own copy), no gradients."""

    def velocity(x, s, cond):
        with torch.no_grad(), net_swapped(adapter, net):
            return adapter.velocity(x, s, cond)

    return velocity


def make_reference_velocity(adapter, frozen_copy: nn.Module | None) -> Callable:
    """v_ref(x, s, cond): the adapter's velocity evaluated with the reference weights, no gradients."""

    def velocity(x, s, cond):
        with torch.no_grad(), reference_mode(adapter.net, frozen_copy) as net, net_swapped(adapter, net):
            return adapter.velocity(x, s, cond)

    return velocity


class EMA:
    """Exponential moving average of the trainable parameters (used for evaluation and export)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for name, param in net.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, net: nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into `net`."""
        params = dict(net.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in backup.items():
                    params[n].copy_(value)
