"""A diffusers pipeline folder checked before anything is built or loaded: the pipeline it names, every component
the pipeline needs present, each component's config.json sizes integers in a range a real model has, and the
transformer's channels matching the VAE's. Without these a typo in a config.json is diffusers' or torch's own
text minutes into loading, and a `num_layers: 1e9` makes the planner build a billion layers."""

from __future__ import annotations

import json
from pathlib import Path

# Sizes no published model comes near (FLUX.1: 19 + 38 layers, 24 heads of 128; SD3.5 Large: 38 layers;
# T5-XXL: 24 layers, width 4096, vocabulary 32128). Beyond them a config is a typo, not a model.
SIZE_LIMITS = {
    "num_layers": 512, "num_single_layers": 512, "num_hidden_layers": 512, "layers_per_block": 64,
    "attention_head_dim": 1024, "num_attention_heads": 1024, "num_heads": 1024, "d_kv": 1024,
    "joint_attention_dim": 65536, "pooled_projection_dim": 65536, "caption_projection_dim": 65536,
    "hidden_size": 65536, "d_model": 65536, "d_ff": 262144, "intermediate_size": 262144, "projection_dim": 65536,
    "in_channels": 4096, "out_channels": 4096, "latent_channels": 1024, "norm_num_groups": 1024,
    "patch_size": 16, "sample_size": 8192, "pos_embed_max_size": 8192, "max_position_embeddings": 1 << 20,
    "vocab_size": 1 << 24,
}
LIST_LIMITS = {"block_out_channels": 65536, "axes_dims_rope": 4096}
# components each pipeline cannot run without (model_index.json may list more, e.g. SD3's optional T5)
REQUIRED = {
    "FluxPipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "StableDiffusion3Pipeline": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                                 "tokenizer_2"),
}
# the transformer's input channels per VAE latent channel: 2x2 latent pixels packed into one token, or the latent
# channels themselves (the transformer patches inside); pipelines not listed are not checked
LATENT_PACKING = {"FluxPipeline": 4, "FluxKontextPipeline": 4, "Flux2Pipeline": 4, "Flux2KleinPipeline": 4,
                  "StableDiffusion3Pipeline": 1, "ZImagePipeline": 1}
# what a component's folder holds at least: a model its config.json, a scheduler its scheduler_config.json
_CONFIG_FILE = {"scheduler": "scheduler_config.json", "processor": None}  # a processor: tokenizer and image files


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def read_model_index(folder: Path) -> str:
    """The pipeline class a diffusers folder names in model_index.json."""
    path = Path(folder) / "model_index.json"
    name = read_json(path).get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{path}: missing '_class_name' (the diffusers pipeline class, e.g. FluxPipeline)")
    return name


def _size_error(path: Path, key: str, value, limit: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{path}: {key}: expected an integer, got {value!r}"
    if not 1 <= value <= limit:
        return f"{path}: {key}: expected an integer in [1, {limit}] (the size of a real model), got {value}"
    return None


def check_sizes(path: Path) -> dict:
    """A component's config.json whose size fields are plausible integers; returns it."""
    config = read_json(path)
    for key, limit in SIZE_LIMITS.items():
        value = config.get(key)
        if isinstance(value, list) and 1 <= len(value) <= 16:  # per axis: FLUX.2's VAE patch [2, 2], Wan's [1, 2, 2]
            errors = [_size_error(path, key, item, limit) for item in value]
            error = next((e for e in errors if e), None)
        else:
            error = None if value is None else _size_error(path, key, value, limit)
        if error:
            raise ValueError(error)
    for key, limit in LIST_LIMITS.items():
        values = config.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or not 1 <= len(values) <= 16:
            raise ValueError(f"{path}: {key}: expected a list of 1 to 16 integers, got {values!r}")
        for value in values:
            if error := _size_error(path, key, value, limit):
                raise ValueError(error)
    return config


def check_pipeline_folder(folder: Path, pipeline: str, loading: bool) -> None:
    """Everything about a FLUX/SD3 folder that can be checked from its JSON files, in seconds. `loading` (the
    trainer, sample, eval) also requires every component the pipeline needs; the planner reads config.json only."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if loading:
        for name in REQUIRED.get(pipeline, ()):
            entry = index.get(name)
            if not (isinstance(entry, list) and entry and entry[0]):
                raise ValueError(f"{folder / 'model_index.json'}: no {name!r} component; a {pipeline} needs "
                                 f"{list(REQUIRED[pipeline])}")
        for name, entry in index.items():
            # a component is [library, class]; other lists are pipeline settings (Qwen-Image 2.1's sample_sigmas)
            if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2 and entry[0]
                                            and isinstance(entry[0], str)):
                continue
            sub = folder / name
            needed = _CONFIG_FILE.get(name, None if name.startswith("tokenizer") else "config.json")
            if not sub.is_dir() or (needed and not (sub / needed).is_file()) or not any(sub.iterdir()):
                what = f"{sub / needed}" if needed else f"{sub}/"
                raise FileNotFoundError(f"{what}: missing; model_index.json lists the component {name!r} (a "
                                        f"{entry[-1]}), so the pipeline cannot load without it")
    configs = {name: check_sizes(folder / name / "config.json")
               for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
               if (folder / name / "config.json").is_file()}
    if "transformer" in configs and "vae" in configs:
        check_channels(folder, pipeline, configs["transformer"], configs["vae"])


def check_channels(folder: Path, pipeline: str, transformer: dict, vae: dict) -> None:
    """The transformer takes the VAE's latents: FLUX.1/FLUX.2 pack 2x2 latent pixels into one token (4 x the latent
    channels), SD3 and Z-Image patch them inside the transformer (the latent channels themselves)."""
    latent = vae.get("latent_channels")
    channels = transformer.get("in_channels")
    if latent is None or channels is None or pipeline not in LATENT_PACKING:
        return
    expected = LATENT_PACKING[pipeline] * latent
    if channels != expected:
        packing = "4 x" if LATENT_PACKING[pipeline] == 4 else "the same as"
        raise ValueError(f"{folder / 'transformer' / 'config.json'}: in_channels is {channels}, but the VAE's "
                         f"latent_channels is {latent} ({folder / 'vae' / 'config.json'}); a {pipeline} needs "
                         f"{packing} the latent channels ({expected}): the two components are from different models")
