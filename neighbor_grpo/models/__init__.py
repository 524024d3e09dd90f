"""Model adapters: one contract (encode prompts, velocity, decode) and a registry users can plug into.

An adapter wraps a velocity network `net` (the module that is trained) and knows how to turn prompts into
conditioning, latents into images, and how to save/load itself to a checkpoint folder holding
`model.json` (which adapter, its architecture) next to its weights. Diffusers pipeline folders (FLUX.1, SD3/SD3.5,
Qwen-Image, Qwen-Image 2.1 (`qwen_image21`, text-to-image), the editing models FLUX.1 Kontext and Qwen-Image-Edit(-Plus) (`qwen_image_edit`), FLUX.2 [dev] and
[klein], Z-Image, and Wan video) load directly: `load_adapter` dispatches on model_index.json's `_class_name`
(`DIFFUSERS_PIPELINES`).
"""

from __future__ import annotations

from neighbor_grpo.models.lora import net_swapped  # noqa: F401  (re-exported: the adapters' one seam)
from neighbor_grpo.runs.exports import verify_manifest
from neighbor_grpo.config.plugins import resolve_plugin
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


def model_default_shift(adapter, steps: int | None = None) -> float:
    """The sigma shift of the model's own sampling grid (FLUX: exp(mu) for its resolution; SD3: its scheduler's);
    1 for adapters that define none, like the built-in model. `steps` reaches adapters whose shift depends on the
    number of steps (FLUX.2's empirical mu)."""
    default = getattr(adapter, "default_shift", None)
    if not callable(default):
        return 1.0
    if steps is not None and "steps" in inspect.signature(default).parameters:
        return float(default(steps=steps))
    return float(default())


def sample_latent_shape(adapter, prompts: Sequence[str]) -> tuple[int, ...]:
    """The shape of one sample's latents for `prompts`. Adapters whose samples depend on the prompts take them: Wan
    TI2V samples one latent frame fewer for image-to-video prompts (the image is the given first frame)."""
    if "prompts" in inspect.signature(adapter.latent_shape).parameters:
        return tuple(adapter.latent_shape(list(prompts)))
    return tuple(adapter.latent_shape())


def decode_samples(adapter, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Samples' latents to images or videos; `cond` holds each sample's conditioning (as `velocity` takes it), which
    adapters with a given, unsampled part of the latents need (Wan TI2V: the image's first frame)."""
    if "cond" in inspect.signature(adapter.decode).parameters:
        return adapter.decode(latents, cond)
    return adapter.decode(latents)


def register_model_adapter(name: str) -> Callable[[type], type]:
    """Class decorator: make an adapter loadable by `name` (the value stored in a checkpoint's model.json)."""

    def add(cls: type) -> type:
        MODEL_ADAPTERS[name] = cls
        return cls

    return add


LAZY_ADAPTERS = {"words": "neighbor_grpo.models.words:WordsAdapter"}
"""Adapters imported on first use (builtin:words imports diffusers, which the digits models do not need)."""


def resolve_adapter_class(name: str) -> type:
    """A registered entry by name, or a user's object by dotted path."""
    return resolve_plugin(LAZY_ADAPTERS.get(name, name), MODEL_ADAPTERS, "model adapter", "package.module:Class")


DIFFUSERS_PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "WanPipeline": "wan",
                       "WordsPipeline": "words"}
DIFFUSERS_PIPELINES["QwenImagePipeline"] = "qwen_image"
DIFFUSERS_PIPELINES["FluxKontextPipeline"] = "flux_kontext"
DIFFUSERS_PIPELINES.update(QwenImageEditPipeline="qwen_image_edit", QwenImageEditPlusPipeline="qwen_image_edit_plus")
DIFFUSERS_PIPELINES.update(Flux2Pipeline="flux2", Flux2KleinPipeline="flux2-klein", ZImagePipeline="z-image")
DIFFUSERS_PIPELINES["QwenImage21Pipeline"] = "qwen_image21"
"""diffusers pipeline class (model_index.json's _class_name) -> the adapter that loads such a folder."""


def load_adapter(folder: str | Path, device: str | torch.device = "cpu", options=None) -> FlowAdapter:
    """Load a checkpoint folder written by an adapter's `save` (it names its adapter in model.json), or a diffusers
    pipeline folder (model_index.json naming FluxPipeline or StableDiffusion3Pipeline; nothing is downloaded).
    `options` (the config's `model` section) is passed to adapters whose `load` accepts it."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {str(folder)!r}: no such folder")
    verify_manifest(folder)  # exports carry checksums: a changed file is an error naming it
    if not meta_path.is_file():
        if (folder / "model_index.json").is_file():
            return _finite(_load_diffusers_folder(folder, device, options), folder)
        raise FileNotFoundError(f"checkpoint {str(folder)!r}: expected a model folder holding model.json and "
                                "model.safetensors (as written by `ngrpo pretrain` or a run's base/ or aligned/), "
                                "or a diffusers FluxPipeline/StableDiffusion3Pipeline folder holding model_index.json")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path}: not valid JSON ({error})") from error
    if "adapter" not in meta:
        raise ValueError(f"{meta_path}: missing the field 'adapter' (which model adapter wrote this folder)")
    cls = resolve_adapter_class(meta["adapter"])
    if options is not None and "options" in inspect.signature(cls.load).parameters:
        return _finite(cls.load(folder, device=device, options=options), folder)
    return _finite(cls.load(folder, device=device), folder)


def _finite(adapter: FlowAdapter, folder: Path) -> FlowAdapter:
    """The adapter, if its weights are all finite: NaN/inf weights would only give NaN samples."""
    from neighbor_grpo.training.guards import all_finite

    if not all_finite(adapter.net.parameters()):
        raise ValueError(f"checkpoint {str(folder)!r}: its weights hold NaN/inf; not a usable model (export a finite "
                         "one, e.g. continue the run from its last good checkpoint)")
    return adapter


def _load_diffusers_folder(folder: Path, device, options) -> FlowAdapter:
    from neighbor_grpo.models.diffusers_common import read_model_index

    pipeline = read_model_index(folder)
    if pipeline not in DIFFUSERS_PIPELINES:
        raise ValueError(f"{folder / 'model_index.json'}: _class_name is {pipeline!r}; expected one of "
                         f"{sorted(DIFFUSERS_PIPELINES)} (the diffusers pipelines with a model adapter)")
    return resolve_adapter_class(DIFFUSERS_PIPELINES[pipeline]).load(folder, device=device, options=options)


from neighbor_grpo.models.digits import DigitsAdapter, DigitsFlowNet, DigitsNetConfig  # noqa: E402,F401
from neighbor_grpo.models.digits_unet import DigitsUNet, DigitsUNetAdapter, DigitsUNetConfig  # noqa: E402,F401
from neighbor_grpo.models.flux import FluxAdapter  # noqa: E402,F401  (registers 'flux')
from neighbor_grpo.models.sd3 import SD3Adapter  # noqa: E402,F401  (registers 'sd3')
from neighbor_grpo.models.qwen_image import QwenImageAdapter  # noqa: E402,F401  (registers 'qwen_image')
from neighbor_grpo.models.flux_kontext import FluxKontextAdapter  # noqa: E402,F401  (registers 'flux_kontext')
from neighbor_grpo.models.qwen_image_edit import (  # noqa: E402,F401  ('qwen_image_edit', 'qwen_image_edit_plus')
    QwenImageEditAdapter, QwenImageEditPlusAdapter)
from neighbor_grpo.models.wan import WanAdapter  # noqa: E402,F401  (registers 'wan')
from neighbor_grpo.models.flux2 import Flux2Adapter, Flux2KleinAdapter  # noqa: E402,F401  ('flux2', 'flux2-klein')
from neighbor_grpo.models.z_image import ZImageAdapter  # noqa: E402,F401  (registers 'z-image')
from neighbor_grpo.models.qwen_image21 import QwenImage21Adapter  # noqa: E402,F401  (registers 'qwen_image21')
