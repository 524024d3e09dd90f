"""How the diffusers adapters load: the model dtype, the adapter's settings (defaults, an export's record, the run's
config), diffusers itself (or an error naming the extra), from_pretrained's dtype keyword across diffusers versions,
and loading without progress bars."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA (what FLUX/SD3.5 are trained in) and float32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype: expected auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def model_options(options, saved: dict | None = None) -> dict:
    """The adapter's settings: ModelConfig defaults, then what an export's model.json recorded, then `options`
    (a full ModelConfig from a run's config wins entirely; a dict, e.g. CLI flags, overrides only its keys)."""
    from neighbor_grpo.config.train_config import ModelConfig

    values = dataclasses.asdict(ModelConfig())
    values.update({k: v for k, v in (saved or {}).items() if k in values})
    if dataclasses.is_dataclass(options):
        values.update(dataclasses.asdict(options))
    elif options:
        unknown = sorted(set(options) - set(values))
        if unknown:
            raise ValueError(f"model options {unknown} are unknown; valid: {sorted(values)}")
        values.update({k: v for k, v in options.items() if v is not None})
    return values


def import_diffusers():
    """diffusers, or an error naming the extra that installs it (the built-in model does not need it)."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError('FLUX.1 and SD3 models need diffusers and transformers: '
                          'pip install "neighbor-grpo[diffusers]"') from error
    return diffusers


def dtype_keyword(dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` from diffusers 0.40 on (where `torch_dtype` is deprecated),
    `torch_dtype` before; 0.39 is the newest diffusers that installs beside transformers 4.x."""
    import diffusers
    from packaging.version import Version

    return {"dtype": dtype} if Version(diffusers.__version__) >= Version("0.40.0.dev0") else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """diffusers/transformers loading bars would flood training logs (the trainer has its own progress bar)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_on, transformers_on = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar(), transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for was_on, logging in ((diffusers_on, diffusers_logging), (transformers_on, transformers_logging)):
            if was_on:
                logging.enable_progress_bar()
