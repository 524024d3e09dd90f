"""Which model a plan is for, from `model.path`: a shipped architecture (`arch:flux-dev`, `arch:flux-schnell`,
`arch:sd35-medium`, `arch:sd35-large`, `arch:flux2-dev`, `arch:flux2-klein-4b`, `arch:flux2-klein-9b`,
`arch:z-image`, `arch:qwen-image`, `arch:qwen-image-edit`, `arch:qwen-image-edit-2509`, `arch:qwen-image-edit-2511`,
`arch:flux-kontext-dev`, `arch:wan21-t2v-1.3b`, `arch:wan22-ti2v-5b`, `arch:wan22-t2v-a14b`), a local diffusers
folder of any of their pipelines (its config.json files are read, never its weights), or the built-in model
(`builtin:digits`, traced for real: it is small). The traced models (meta-built, LoRA and checkpointing applied, made
fake) are built once per setting and reused within one plan."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neighbor_grpo.plan.architectures import (COMPONENTS, FAMILY, MODELS, QWEN_VL_IMAGE_PROCESSOR, WAN_PIPELINE,
                                               build_on_meta, parameter_count)

ARCH_PREFIX = "arch:"


@dataclass
class ModelSpec:
    name: str                 # "flux-dev", a folder, "builtin:digits"
    kind: str                 # "diffusers" or "builtin"
    flux: bool = False
    spec: dict = field(default_factory=dict)  # models.architectures.DIFFUSERS_ARCHS-style: transformer, vae, text
    text_encoders: dict = field(default_factory=dict)  # name -> parameter count
    family: str = ""          # flux2, flux2-klein, z-image, qwen-image, qwen-image-edit(-plus), flux-kontext, wan
    #                           (plan.architectures.FAMILY); "" for FLUX.1 / SD3

    @property
    def video(self) -> bool:
        return self.family == "wan"

    @property
    def edits(self) -> bool:
        """An editing model: every prompt carries a source image (the planner's stand-in features hold its latents)."""
        return self.family in EDITING

    @property
    def arch(self) -> str:
        """The name build_diffusers_adapter takes (FLUX when it contains 'flux')."""
        return self.family or ("flux" if self.flux else "sd3")


def text_shape(flux: bool, transformer: dict, max_sequence_length: int | None, clip_tokens: int = 77) -> tuple:
    """(tokens, width, pooled) of the cached prompt embeddings, as the adapters make them: FLUX the T5 tokens
    (512 unless model.max_sequence_length), SD3 the CLIP tokens + the T5 tokens (256); the width the transformer's
    joint_attention_dim, the pooled width its pooled_projection_dim."""
    tokens = (max_sequence_length or 512) if flux else clip_tokens + (max_sequence_length or 256)
    return (tokens, int(transformer["joint_attention_dim"]), int(transformer["pooled_projection_dim"]))


def vae_config(flux: bool) -> dict:
    from neighbor_grpo.models.architectures import DIFFUSERS_ARCHS

    return DIFFUSERS_ARCHS["flux-dev" if flux else "sd35-medium"]["vae"]


def shipped_model(name: str, options: dict) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model.path: unknown architecture {name!r}; choose from "
                         f"{', '.join(ARCH_PREFIX + m for m in MODELS)}")
    transformer, *encoders = MODELS[name]
    if name in FAMILY:  # every model with its own adapter family (FLUX.2, Z-Image, Qwen-Image, Kontext, Wan)
        return family_model(name, FAMILY[name], transformer, encoders, options)
    flux = name.startswith("flux")
    config = dict(COMPONENTS[transformer].config)
    spec = {"transformer": config, "vae": vae_config(flux),
            "text": text_shape(flux, config, options.get("max_sequence_length"))}
    return ModelSpec(name, "diffusers", flux, spec, {e: parameter_count(build_on_meta(e)) for e in encoders})


def family_module(family: str):
    """The models module that builds a family's random pipeline and knows its prompt features and VAE."""
    from neighbor_grpo.models import flux2_zimage_archs, qwen_kontext_wan_archs

    return flux2_zimage_archs if family in flux2_zimage_archs.FAMILIES else qwen_kontext_wan_archs


def family_spec(family: str, transformer: dict, options: dict, vae: dict | None = None, **extra) -> dict:
    module = family_module(family)
    text = module.text_shape(family, transformer, options.get("max_sequence_length"))
    if family in QWEN_EDIT:  # the source image's tokens in Qwen2.5-VL's prompt are part of the text condition
        height = options.get("height") or options.get("width") or 1024
        width = options.get("width") or height
        text = (module.edit_text_tokens(family, text[0], height, width, extra["image_processor"]), *text[1:])
    return {"transformer": transformer, "vae": module.vae_config(family, transformer) if vae is None else vae,
            "text": text, **extra}


def family_model(name: str, family: str, transformer: str, encoders: list[str], options: dict) -> ModelSpec:
    extra = {"pipeline": WAN_PIPELINE[name]} if family == "wan" else {}
    if family in QWEN_EDIT:
        extra["image_processor"] = QWEN_VL_IMAGE_PROCESSOR
    spec = family_spec(family, dict(COMPONENTS[transformer].config), options, **extra)
    return ModelSpec(name, "diffusers", False, spec, {e: parameter_count(build_on_meta(e)) for e in encoders}, family)


# model_index.json's pipeline class -> the adapter family the planner builds it as ("" FLUX.1 / SD3)
PIPELINE_FAMILIES = {"FluxPipeline": "", "StableDiffusion3Pipeline": "", "FluxKontextPipeline": "flux-kontext",
                     "QwenImagePipeline": "qwen-image", "QwenImageEditPipeline": "qwen-image-edit",
                     "QwenImageEditPlusPipeline": "qwen-image-edit-plus", "Flux2Pipeline": "flux2",
                     "Flux2KleinPipeline": "flux2-klein", "ZImagePipeline": "z-image", "WanPipeline": "wan"}
QWEN_EDIT = ("qwen-image-edit", "qwen-image-edit-plus")
EDITING = ("flux-kontext", *QWEN_EDIT)  # the families whose prompts carry a source image


def read_config(path: Path) -> dict:
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: expected the component's config.json ({error})") from None


def read_image_processor(folder: Path) -> dict:
    """The VL image processor's settings from a Qwen-Image-Edit folder's processor/ (preprocessor_config.json as
    published, or the processor_config.json transformers 5 writes), read by transformers itself."""
    from transformers import Qwen2VLImageProcessorPil

    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True).to_dict()
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder}: expected the VL image processor's settings (preprocessor_config.json), which a "
                         f"Qwen-Image-Edit folder holds there ({str(error).splitlines()[0]})") from None


def folder_model(folder: Path, options: dict) -> ModelSpec:
    """A local diffusers folder: its transformer/ (and Wan 2.2's transformer_2/) and vae/ config.json (no weights
    are read), its text encoders' config.json, and model_index.json's pipeline settings."""
    from neighbor_grpo.models.folder_checks import check_pipeline_folder, read_model_index

    pipeline = read_model_index(folder)
    if pipeline not in PIPELINE_FAMILIES:
        raise ValueError(f"{folder / 'model_index.json'}: _class_name is {pipeline!r}; the planner knows "
                         f"{', '.join(PIPELINE_FAMILIES)}")
    family = PIPELINE_FAMILIES[pipeline]
    flux = pipeline == "FluxPipeline"
    check_pipeline_folder(folder, pipeline, loading=False)  # plausible sizes before anything is built from them
    transformer, vae = read_config(folder / "transformer" / "config.json"), read_config(folder / "vae" / "config.json")
    if family:
        extra = {}
        if family == "wan":
            index = read_config(folder / "model_index.json")
            extra["pipeline"] = {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}
            if (folder / "transformer_2" / "config.json").is_file():
                extra["transformer_2"] = read_config(folder / "transformer_2" / "config.json")
        if family in QWEN_EDIT:  # the VL processor's image settings size the source image's tokens
            extra["image_processor"] = read_image_processor(folder / "processor")
        spec = family_spec(family, transformer, options, vae, **extra)
    else:
        tokenizer = folder / "tokenizer" / "tokenizer_config.json"
        clip_tokens = json.loads(tokenizer.read_text()).get("model_max_length", 77) if tokenizer.is_file() else 77
        spec = {"transformer": transformer, "vae": vae,
                "text": text_shape(flux, transformer, options.get("max_sequence_length"), min(int(clip_tokens), 77))}
    encoders = {}
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if (folder / sub / "config.json").is_file():
            encoders[sub] = encoder_parameters(folder / sub)
    return ModelSpec(str(folder), "diffusers", flux, spec, encoders, family)


def encoder_parameters(folder: Path) -> int:
    """A text encoder's parameter count, built on meta from its config.json."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
    with torch.device("meta"):
        model = model_class(config) if model_class is not transformers.AutoModel else transformers.AutoModel.from_config(config)
    return parameter_count(model)


def resolve_model(path: str, options: dict) -> ModelSpec:
    if path.startswith(ARCH_PREFIX):
        return shipped_model(path.removeprefix(ARCH_PREFIX), options)
    if path.startswith("builtin:"):
        return ModelSpec(path, "builtin")
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        return folder_model(folder, options)
    raise ValueError(f"model.path: {path!r} is not a model the planner can read; use {ARCH_PREFIX}NAME "
                     f"({', '.join(MODELS)}), a local diffusers folder (model_index.json), or builtin:digits")
