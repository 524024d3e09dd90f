"""Model adapters: one contract (encode prompts, velocity, decode) and a registry users can plug into.

An adapter wraps a velocity network `net` (the module that is trained) and knows how to turn prompts into
conditioning, latents into images, and how to save/load itself to a checkpoint folder holding
`model.json` (which adapter, its architecture) next to `model.safetensors`.
"""

from __future__ import annotations

from neighbor_grpo.plugins import resolve_plugin
import inspect
import json
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

MODEL_ADAPTERS: dict[str, type] = {}


@runtime_checkable
class FlowAdapter(Protocol):
    net: nn.Module

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self) -> tuple[int, ...]: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def save(self, folder: str | Path) -> None: ...


def register_model_adapter(name: str) -> Callable[[type], type]:
    """Class decorator: make an adapter loadable by `name` (the value stored in a checkpoint's model.json)."""

    def add(cls: type) -> type:
        MODEL_ADAPTERS[name] = cls
        return cls

    return add


def resolve_adapter_class(name: str) -> type:
    """A registered entry by name, or a user's object by dotted path."""
    return resolve_plugin(name, MODEL_ADAPTERS, "model adapter", "package.module:Class")


def load_adapter(folder: str | Path, device: str | torch.device = "cpu", options=None) -> FlowAdapter:
    """Load any checkpoint folder written by an adapter's `save` (it names its adapter in model.json).
    `options` (the config's `model` section) is passed to adapters whose `load` accepts it."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {str(folder)!r}: no such folder")
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(folder)!r}: expected a model folder holding model.json and "
                                "model.safetensors (as written by `ngrpo pretrain` or a run's base/ or aligned/)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path}: not valid JSON ({error})") from error
    if "adapter" not in meta:
        raise ValueError(f"{meta_path}: missing the field 'adapter' (which model adapter wrote this folder)")
    cls = resolve_adapter_class(meta["adapter"])
    if options is not None and "options" in inspect.signature(cls.load).parameters:
        return cls.load(folder, device=device, options=options)
    return cls.load(folder, device=device)


from neighbor_grpo.models.digits import DigitsAdapter, DigitsFlowNet, DigitsNetConfig  # noqa: E402,F401
