"""What the diffusers adapters share: loading a diffusers folder, the prompt-embedding cache, chunked velocity calls
and VAE decoding (each adapter writes one `_velocity` call and may override `_decode_chunk`), memory options, and
export (a diffusers-format LoRA, a transformer, or a complete pipeline folder).

Loading helpers (dtype, settings, diffusers itself) live in `diffusers_loading`.

The trained module `net` is the transformer only; text encoders and the VAE are frozen and never reach the
optimizer. Latents handed to the solvers are plain unpacked (batch, C, H, W) float tensors in the latent dtype
the algorithms use (float32 from the noise helpers); the adapters cast to the model dtype inside `velocity`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.models.model_card import LORA_FILE, model_card
from neighbor_grpo.models.prompt_cache import PromptCache
from neighbor_grpo.models.folder_checks import check_pipeline_folder, read_model_index  # noqa: F401 (re-exported)
from neighbor_grpo.models.diffusers_loading import (DTYPES, dtype_keyword, import_diffusers,  # noqa: F401 (re-exported)
                                                    model_options, quiet_loading, resolve_dtype)

# Attention projections of FLUX's and SD3's joint (MM-DiT) blocks; peft matches them as name suffixes.
ATTENTION_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@torch.no_grad()
def _parameters_fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Each parameter's sum and sum of squares in float64, on the CPU: any training step changes it. (In-place
    version counters do not: the fused AdamW kernel updates the weights without bumping them.)"""
    params = list(module.parameters())
    if not params or any(p.is_meta for p in params):  # none, or `ngrpo plan`'s shapes-only model (never saved)
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).cpu()


class DiffusersAdapter:
    """Shared machinery; each adapter adds prompt encoding, `_velocity` and the latent layout."""

    NAME = ""  # registered adapter name, written to model.json
    PIPELINE = ""  # diffusers pipeline class name in model_index.json
    PIPELINE_CLASS = None  # the pipeline class, when it is not diffusers' own (builtin:words)
    PACKED_CHANNELS = 1  # the transformer's input channels per latent channel (latent_shape)

    def __init__(self, pipeline, folder: Path, options: dict, device: torch.device, loras: list[str],
                 transformer_folder: str | None = None):
        self.pipeline = pipeline
        self.base_folder = Path(folder).resolve()
        self.transformer_folder = transformer_folder  # a fine-tuned transformer/ that replaced the base's, if any
        self.options = options
        self.loras = list(loras)  # LoRA files merged into the transformer since loading the base, in order
        self.dtype = resolve_dtype(options["dtype"], device)
        self._device = device
        pipeline.set_progress_bar_config(disable=True)
        for name in self.frozen_components():
            getattr(pipeline, name).requires_grad_(False).eval()
        transformer = pipeline.transformer
        transformer.requires_grad_(True)  # full fine-tune trains every weight; LoRA (peft) freezes them again
        self.net = transformer
        transformer.to(device)  # component by component: offloaded parts never visit the accelerator at load time
        vae = getattr(pipeline, "vae", None)  # None: a pixel-space pipeline (builtin:words)
        if vae is not None and not any(p.is_meta for p in vae.parameters()):  # `ngrpo plan`'s shapes-only VAE: no data
            vae.to(torch.device("cpu") if options["offload_vae"] else device)
        if vae is not None and options["vae_tiling"]:
            vae.enable_tiling()
        encoder_home = torch.device("cpu") if options["offload_text_encoders"] else device
        for name in self.text_encoder_names():
            getattr(pipeline, name).to(encoder_home)
        cache_device = torch.device("cpu") if options["prompt_cache_on_cpu"] else device
        self.cache = PromptCache(cache_device)
        self._pristine = _parameters_fingerprint(transformer)
        self.resolution()  # a bad height/width fails at load time, naming the field

    # ---- subclass hooks ------------------------------------------------------------------------------------------
    def text_encoder_names(self) -> list[str]:
        raise NotImplementedError

    def frozen_components(self) -> list[str]:
        return [*self.text_encoder_names(), "vae"]

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- the adapter contract ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the transformer blocks' activations in the backward pass (diffusers' own switch; the trainer
        calls it for `speed.gradient_checkpointing`). torch.compile is `speed.compile`, applied to `net` in place."""
        self._transformer().enable_gradient_checkpointing()

    def default_lora_targets(self) -> list[str]:
        """LoRA targets when the config leaves optim.lora_targets at the built-in model's default: the attention
        projections this transformer has (a one-block test model lacks SD3's to_add_out, for instance)."""
        names = [n for n, m in self._transformer().named_modules() if isinstance(m, torch.nn.Linear)]
        return [t for t in ATTENTION_LORA_TARGETS if any(n.endswith("." + t) for n in names)]

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Row indices into the embedding cache, a CPU LongTensor: `velocity` turns them into a list to gather the
        rows, which would be a device-to-host sync in every model call if they lived on the GPU."""
        return self.cache.lookup(list(prompts), self._encode_with_encoders_on_device)

    def cache_prompts(self, prompts: Sequence[str]) -> None:
        """Encode prompts up front in batches of 64 (e.g. the evaluation prompts, or a small training set), so offloaded
        text encoders (`model.offload_text_encoders`) need not come back to the accelerator for them later."""
        batch = 64
        prompts = list(dict.fromkeys(prompts))
        for start in range(0, len(prompts), batch):
            self.encode_prompts(prompts[start:start + batch])

    @torch.no_grad()
    def _encode_with_encoders_on_device(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        offload = self.options["offload_text_encoders"] and self.device.type != "cpu"
        if offload:
            for name in self.text_encoder_names():
                getattr(self.pipeline, name).to(self.device)
        try:
            return self.encode_new_prompts(prompts)
        finally:
            if offload:
                for name in self.text_encoder_names():
                    getattr(self.pipeline, name).to("cpu")

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """v(x, s, cond) in x's dtype: the adapter's transformer call `_velocity(x, timesteps, rows)` over chunks."""
        return self._chunked(lambda xs, ts, rows: self._velocity(xs, ts, rows).to(x.dtype),
                             x, self._timesteps(s, x.shape[0]), cond)

    def _timesteps(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        s = torch.as_tensor(s, device=self.device, dtype=torch.float32).reshape(-1)
        return s.expand(batch) if s.numel() == 1 else s

    def _chunked(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        """fn over slices of the batch (`model.forward_batch_size`, 0 = whole batch): caps activation memory."""
        size = self.options["forward_batch_size"] or tensors[0].shape[0]
        if tensors[0].shape[0] <= size:
            return fn(*tensors)
        return torch.cat([fn(*(t[i:i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (batch, ...) -> images (Wan: videos) in [0, 1], NOT clamped, float32, in chunks of
        `model.decode_batch_size`, each through the adapter's `_decode_chunk`."""
        vae = self.pipeline.vae
        chunk = max(1, int(self.options["decode_batch_size"]))
        offload = self.options["offload_vae"] and self.device.type != "cpu"
        images = []
        if offload:  # the VAE visits the accelerator only while it decodes
            vae.to(self.device)
        try:
            with torch.no_grad():
                for start in range(0, latents.shape[0], chunk):
                    z = latents[start:start + chunk].to(device=self.device, dtype=vae.dtype)
                    images.append(self._decode_chunk(z))
        finally:
            if offload:
                vae.to("cpu")
        return torch.cat(images)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Latents on the VAE's device, in its dtype -> images in [0, 1], float32 (FLUX.1's and SD3's scale and shift)."""
        vae = self.pipeline.vae
        z = z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() + 1.0) / 2.0

    def resolution(self) -> tuple[int, int]:
        """(height, width) in pixels: the options', else the checkpoint's default."""
        default = self.default_resolution()
        height = self.options["height"] or default
        width = self.options["width"] or default
        multiple = self.pipeline.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(f"model.{name}: expected a multiple of {multiple} for this checkpoint "
                                 f"(VAE factor x 2), got {value}")
        return height, width

    def default_resolution(self) -> int:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the VAE latents at this resolution; the transformer's input channels are
        the latent channels times PACKED_CHANNELS (4 where 2x2 latent pixels are packed into one token's input)."""
        height, width = self.resolution()
        factor = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels // self.PACKED_CHANNELS, height // factor, width // factor)

    def scheduler_shift(self, image_seq_len: int) -> float:
        """The checkpoint scheduler's shift. With dynamic shifting (FLUX.1) diffusers computes mu from the number of
        image tokens and shifts with exp(mu)/(exp(mu) + 1/s - 1), which is exactly our constant-shift formula with
        shift = exp(mu)."""
        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return float(config.get("shift", 1.0))
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{self.base_folder}/scheduler: time_shift_type {config['time_shift_type']!r} has no "
                             "constant-shift equivalent; set the algorithm's `shift` explicitly")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return math.exp(mu)

    # ---- LoRA files ------------------------------------------------------------------------------------------------
    def load_lora(self, path: str | Path) -> None:
        """Merge a diffusers-format LoRA (a folder holding pytorch_lora_weights.safetensors, or a .safetensors file)
        into the transformer, with diffusers' own loader (so any LoRA format diffusers reads works)."""
        from neighbor_grpo.models.lora import is_lora

        path = Path(path)
        if is_lora(self.net):
            raise ValueError("load_lora: the transformer is being trained with a LoRA; merge LoRA files before training")
        if path.is_dir():
            if not (path / LORA_FILE).is_file():
                raise FileNotFoundError(f"LoRA {str(path)!r}: expected {LORA_FILE} in this folder")
            folder, weight_name = path, LORA_FILE
        elif path.is_file():
            folder, weight_name = path.parent, path.name
        else:
            raise FileNotFoundError(f"LoRA {str(path)!r}: no such file or folder")
        self.pipeline.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="merged")
        self.pipeline.fuse_lora(components=["transformer"])
        self.pipeline.unload_lora_weights()
        self.loras.append(str((folder / weight_name).resolve()))
        self._pristine = _parameters_fingerprint(self.pipeline.transformer)

    # ---- export ----------------------------------------------------------------------------------------------------
    def _transformer(self) -> torch.nn.Module:
        net = self.net
        return net.get_base_model() if hasattr(net, "get_base_model") else net

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Export for diffusers. A LoRA run writes pytorch_lora_weights.safetensors (load it with
        `Pipeline.load_lora_weights(folder)`); a full fine-tune writes transformer/ (save_pretrained). With
        `model.export_pipeline` (and weights that changed) the folder is instead a complete diffusers pipeline
        (`Pipeline.from_pretrained(folder)`), a LoRA merged in. Always: model.json (adapter, base folder, LoRAs,
        options; `load_adapter(folder)` rebuilds the model) and a model card README.md. Built in a temporary
        sibling folder and moved into place."""
        from neighbor_grpo.models.lora import is_lora

        folder = Path(folder)
        tmp = folder.with_name(f".tmp-save-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = {"adapter": self.NAME, "base": str(self.base_folder), "loras": list(self.loras),
                    "transformer": self.transformer_folder,
                    "options": {k: v for k, v in self.options.items() if k != "path"}}
            lora = is_lora(self.net)
            changed = lora or not torch.equal(_parameters_fingerprint(self._transformer()), self._pristine)
            if changed and self.options["export_pipeline"]:
                self._save_pipeline(tmp)
                meta.update(base=".", transformer=None, loras=[], kind="pipeline")
            elif lora:
                self._save_lora(tmp)
                meta["loras"].append(LORA_FILE)
                meta["kind"] = "lora"
            elif changed:
                self._transformer().save_pretrained(tmp / "transformer")
                # earlier LoRAs are already merged into these weights: reloading must not apply them again
                meta.update(transformer="transformer", loras=[], kind="transformer")
            else:  # unchanged weights: what this model was loaded from (base, transformer, LoRAs) is the model
                meta["kind"] = "reference"
            meta.update(extra or {})
            atomic_write_text(tmp / "model.json", json.dumps(meta, indent=2, default=str))
            atomic_write_text(tmp / "README.md", model_card(meta, self.PIPELINE))
            if folder.exists():  # entry by entry: other files a user keeps there stay
                for item in tmp.iterdir():
                    target = folder / item.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
                tmp.rmdir()
            else:
                os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _save_lora(self, folder: Path) -> None:
        from peft import get_peft_model_state_dict

        net = self.net
        transformer = self._transformer()
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        config = net.peft_config["default"].to_dict()
        # JSON-safe metadata (sets -> lists) so diffusers restores rank and alpha exactly on load
        metadata = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        type(self.pipeline).save_lora_weights(str(folder), transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=metadata)

    def _save_pipeline(self, folder: Path) -> None:
        from neighbor_grpo.models.lora import is_lora, merged_copy

        transformer = merged_copy(self.net) if is_lora(self.net) else self._transformer()
        if hasattr(transformer, "get_base_model"):
            transformer = transformer.get_base_model()
        type(self.pipeline)(**{**self.pipeline.components, "transformer": transformer},
                            **self.pipeline_settings()).save_pretrained(str(folder))

    def pipeline_settings(self) -> dict:
        """The pipeline's own settings beside its components (Wan's boundary_ratio and expand_timesteps, Qwen-Image
        2.1's sample_sigmas): constructor arguments that model_index.json keeps and that a pipeline rebuilt from its
        components alone would lose."""
        import inspect

        parameters = inspect.signature(type(self.pipeline).__init__).parameters
        return {k: v for k, v in self.pipeline.config.items() if k in parameters and k not in self.pipeline.components}

    # ---- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def loaded_components(cls, base: Path) -> dict:
        """Components the adapter builds itself and hands to `from_pretrained` (Qwen-Image-Edit's processor,
        which diffusers cannot load without torchvision); none by default."""
        return {}

    @classmethod
    def from_folder(cls, folder: Path, device, options=None) -> "DiffusersAdapter":
        """A diffusers pipeline folder (model_index.json) or one of our exports (model.json naming this adapter)."""
        diffusers = import_diffusers()
        folder = Path(folder)
        device = torch.device(device)
        meta_path = folder / "model.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        settings = model_options(options, meta.get("options"))
        base = folder
        if meta:
            base = (folder / meta.get("base", ".")).resolve() if not Path(meta.get("base", ".")).is_absolute() \
                else Path(meta["base"])
        if not (base / "model_index.json").is_file():
            where = f"{meta_path} names base {str(base)!r}, which" if meta else str(folder)
            raise FileNotFoundError(f"{where}: expected a diffusers {cls.PIPELINE} folder holding model_index.json")
        found = read_model_index(base)
        if found != cls.PIPELINE:
            raise ValueError(f"{base / 'model_index.json'}: _class_name is {found!r}; the {cls.NAME} adapter expects "
                             f"{cls.PIPELINE!r}")
        check_pipeline_folder(base, found, loading=True)  # seconds, before minutes of loading weights
        dtype = resolve_dtype(settings["dtype"], device)
        transformer_folder = str((folder / meta["transformer"]).resolve()) if meta.get("transformer") else None
        if transformer_folder and not (Path(transformer_folder) / "config.json").is_file():
            raise FileNotFoundError(f"{meta_path}: transformer folder {transformer_folder!r} not found "
                                    "(expected config.json and weights written by save_pretrained)")
        with quiet_loading():
            pipeline_class = cls.PIPELINE_CLASS or getattr(diffusers, cls.PIPELINE)
            pipeline = pipeline_class.from_pretrained(str(base), **dtype_keyword(dtype), local_files_only=True,
                                                      **cls.loaded_components(base))
            if transformer_folder:
                pipeline.transformer = type(pipeline.transformer).from_pretrained(
                    transformer_folder, **dtype_keyword(dtype), local_files_only=True)
        adapter = cls(pipeline, base, settings, device, loras=[], transformer_folder=transformer_folder)
        for lora in meta.get("loras", []):
            lora_path = Path(lora) if Path(lora).is_absolute() else folder / lora
            if not lora_path.is_file():
                raise FileNotFoundError(f"{meta_path}: LoRA file {str(lora_path)!r} not found")
            with quiet_loading():
                adapter.load_lora(lora_path)
        return adapter
