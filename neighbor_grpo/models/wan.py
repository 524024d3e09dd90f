"""Wan 2.1 / 2.2 text-to-video through diffusers (WanPipeline): WanTransformer3DModel, UMT5 prompts, classifier-free
guidance, video latents (batch, C, T, H, W).

Latents are the pipeline's own, (batch, z_dim, (frames - 1) / 4 + 1, height / 8, width / 8) float32, handed to the
solvers and algorithms unchanged (they treat everything after (prompt, candidate) as the latent). `decode` returns
videos (batch, T, 3, H, W) in [0, 1], not clamped: image rewards score them frame by frame, rewards that declare
`needs = ("video",)` get them whole (rewards/__init__.py).

Wan 2.2 A14B has two experts, `transformer` for the high-noise timesteps t >= boundary_ratio * 1000 and
`transformer_2` below, exactly as WanPipeline switches them. They are trained together as one module
(`WanExperts`), so a LoRA run gives each expert its own LoRA, and exports write one diffusers LoRA file per expert.
Wan2.2-TI2V-5B (48-channel VAE, `expand_timesteps`) samples text-to-video from text-only prompts and image-to-video
from editing prompt rows (`EditPrompt`, a JSONL row's `image`), as diffusers' WanImageToVideoPipeline does with
`expand_timesteps`: the image, preprocessed and encoded by the VAE (the mode, normalised), IS the first latent frame,
and its tokens get timestep 0. That frame is given, not sampled, so it is not part of our latents: the solvers and
algorithms see the T - 1 generated frames only (`latent_shape(prompts)`), `velocity` puts the image's frame in front
of them for the transformer and returns the velocity of the generated frames, and `decode(latents, cond)` puts it
back before the causal VAE decodes. The frame therefore stays fixed at every step of every solver, SDE included, and
policy distances and log-probs never count it (docs/models.md says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from neighbor_grpo.config.prompts import source_image_paths
from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.true_cfg import NegativePromptCFG
from neighbor_grpo.models.diffusers_common import (DiffusersAdapter, _parameters_fingerprint, dtype_keyword,
                                                   resolve_dtype)
from neighbor_grpo.models.model_card import LORA_FILE

SECOND_EXPERT_LORA = "pytorch_lora_weights_transformer_2.safetensors"
"""The low-noise expert's LoRA file beside LORA_FILE (load it with `load_lora_weights(..., load_into_transformer_2=True)`)."""
DEFAULT_FRAMES = 81  # WanPipeline's default num_frames


class WanExperts(nn.Module):
    """Wan 2.2's two experts as one trained module: `high` (the pipeline's `transformer`) runs at timesteps
    t >= `boundary`, `low` (`transformer_2`) below it. Routed per sample, so one batch may hold both; sharded by
    FSDP over several processes, every process runs each expert that any of them needs (`_runs_anywhere`)."""

    may_leave_parameters_unused = True
    """A pass whose rows are all on one side of the boundary gives the other expert no gradient (DDP must know)."""

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, float(boundary)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        # TI2V: one timestep per token, equal but for an image condition's tokens (0): the noisy tokens' one decides
        per_sample = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
        if is_fake(per_sample):  # `ngrpo plan` traces shapes only: one expert per call, both of the same shapes
            return self.high(hidden_states, timestep, encoder_hidden_states, return_dict=False)
        high = per_sample >= self.boundary
        runs = [bool(high.any()), not bool(high.all())]  # which experts this call needs: high, low
        if self._sharded_over_processes():
            runs = self._runs_anywhere(runs, hidden_states.device)
        if runs.count(True) <= 1:  # the usual case: one expert for every row (here and on every process)
            expert = self.low if runs == [False, True] else self.high
            return expert(hidden_states, timestep, encoder_hidden_states, return_dict=False)
        out, unused = torch.empty_like(hidden_states), 0.0
        for expert, rows, wanted in ((self.high, high, runs[0]), (self.low, ~high, runs[1])):
            if not wanted:
                continue
            if not bool(rows.any()):  # another process needs this expert: run it on one row, weight 0
                idle = expert(hidden_states[:1], timestep[:1], encoder_hidden_states[:1], return_dict=False)[0]
                unused = unused + 0.0 * idle.sum()  # in the graph, so its backward's collectives run here too
                continue
            out[rows] = expert(hidden_states[rows], timestep[rows], encoder_hidden_states[rows], return_dict=False)[0]
        return (out + unused,)

    def _sharded_over_processes(self) -> bool:
        """FSDP over several processes: each expert's blocks gather their weights from every process in forward
        and reduce their gradients in backward, so all processes must run the same experts in the same order."""
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and any(isinstance(module, FSDPModule) for module in self.high.modules()))

    @staticmethod
    def _runs_anywhere(runs: list[bool], device: torch.device) -> list[bool]:
        """The experts any process needs in this call (per-sample times, e.g. DiffusionNFT's, route the processes'
        batches differently; a rollout step's shared time routes them alike)."""
        import torch.distributed as dist

        flags = torch.tensor(runs, dtype=torch.float32, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(flag) for flag in flags.tolist()]

    def enable_gradient_checkpointing(self) -> None:
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    def save_pretrained(self, folder) -> None:
        """A full fine-tune's export: `high` to `folder` (the export's transformer/), `low` beside it to
        transformer_2/, the layout of a diffusers Wan 2.2 folder (WanAdapter reloads both)."""
        self.high.save_pretrained(str(folder))
        self.low.save_pretrained(str(Path(folder).parent / "transformer_2"))


@register_model_adapter("wan")
class WanAdapter(NegativePromptCFG, DiffusersAdapter):
    NAME = "wan"
    PIPELINE = "WanPipeline"

    def __init__(self, pipeline, folder: Path, options: dict, device: torch.device, loras: list[str],
                 transformer_folder: str | None = None):
        second = getattr(pipeline, "transformer_2", None)
        if transformer_folder and second is not None:  # a full fine-tune of both experts was exported
            pipeline.transformer_2 = second = type(second).from_pretrained(
                str(Path(transformer_folder).parent / "transformer_2"),
                **dtype_keyword(resolve_dtype(options["dtype"], torch.device(device))), local_files_only=True)
        super().__init__(pipeline, folder, options, device, loras, transformer_folder)
        if second is not None and pipeline.config.boundary_ratio is not None:
            second.requires_grad_(True).to(device)
            boundary = pipeline.config.boundary_ratio * pipeline.scheduler.config.num_train_timesteps
            self.net = WanExperts(pipeline.transformer, second, boundary)
            self._pristine = _parameters_fingerprint(self.net)
        self.num_frames()  # a bad frame count fails at load time, naming the field

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    @property
    def experts(self) -> list[str]:
        """The pipeline components that are trained: transformer, and transformer_2 for Wan 2.2 A14B."""
        return ["transformer", "transformer_2"] if isinstance(self._transformer(), WanExperts) else ["transformer"]

    # ---- video geometry --------------------------------------------------------------------------------------------
    def resolution(self) -> tuple[int, int]:
        """(height, width) in pixels, multiples of the VAE factor x the patch (16); default the pipeline's 480 x 832."""
        multiple = self.pipeline.vae_scale_factor_spatial * self.pipeline.transformer.config.patch_size[1]
        height, width = self.options["height"] or 480, self.options["width"] or 832
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(f"model.{name}: expected a multiple of {multiple} for this checkpoint "
                                 f"(VAE factor x patch), got {value}")
        return height, width

    def num_frames(self) -> int:
        frames, step = self.options.get("num_frames") or DEFAULT_FRAMES, self.pipeline.vae_scale_factor_temporal
        if (frames - 1) % step:
            raise ValueError(f"model.num_frames: expected {step}k + 1 frames for this VAE (e.g. 5, 9, 17, 81), "
                             f"got {frames}")
        return frames

    def latent_shape(self, prompts: Sequence[str] | None = None) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the sampled latents; for `prompts` with source images (TI2V image-to-video) one frame
        fewer, the image's first latent frame being given."""
        height, width = self.resolution()
        factor = self.pipeline.vae_scale_factor_spatial
        frames = (self.num_frames() - 1) // self.pipeline.vae_scale_factor_temporal + 1
        given = self.condition_frames(prompts) if prompts is not None else 0
        if frames - given < 1:
            raise ValueError(f"model.num_frames: image-to-video generates the frames after the image; expected at least "
                             f"{self.pipeline.vae_scale_factor_temporal + 1} frames, got {self.num_frames()}")
        return (self.pipeline.vae.config.z_dim, frames - given, height // factor, width // factor)

    def condition_frames(self, prompts: Sequence[str]) -> int:
        """Latent frames given by the prompts: 1 for image-to-video prompts (each with a source image), else 0."""
        if source_image_paths(prompts) is None:
            return 0
        if not self.pipeline.config.expand_timesteps:
            raise ValueError("prompts: source images (image-to-video) need Wan2.2-TI2V-5B's layout, whose first latent "
                             "frame is the image (model_index.json's expand_timesteps: true); this Wan checkpoint is "
                             "text-to-video only (Wan 2.1's I2V models, with a CLIP image encoder, are not supported)")
        return 1

    def default_shift(self) -> float:
        """The scheduler's shift: `shift` of FlowMatchEulerDiscreteScheduler, `flow_shift` of the UniPC scheduler
        Wan checkpoints ship (same sigma formula; Wan's 480p uses 3.0, 720p 5.0)."""
        config = self.pipeline.scheduler.config
        return float(config["flow_shift"]) if config.get("flow_shift") is not None else float(config.get("shift", 1.0))

    # ---- prompts and velocity --------------------------------------------------------------------------------------
    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # the pipeline's own UMT5 call (cleaning, padding to max_sequence_length, zeroed padding rows); the negative
        # prompt is encoded by the same call, so caching it as an ordinary row gives the pipeline's negative embeddings
        length = self.options["max_sequence_length"] or 512
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=length, device=self.device)
        # every row holds its given first frame: the image's latent (1 frame), or none (0 frames) for text-to-video
        paths = source_image_paths(prompts) if self.condition_frames(prompts) else None
        channels, _, height, width = self.latent_shape()
        first = (self.image_latents(paths) if paths is not None
                 else torch.zeros(len(prompts), channels, 0, height, width, device=self.device))
        return {"prompt_embeds": embeds, "first_frame": first}

    @torch.no_grad()
    def image_latents(self, paths: list[str]) -> torch.Tensor:
        """(n, C, 1, h, w): each source image as WanImageToVideoPipeline makes its condition with expand_timesteps:
        its video processor resizes to (height, width) and normalises to [-1, 1], the VAE encodes one frame, the
        distribution's mode, then `(z - latents_mean) * (1 / latents_std)`, in float32."""
        from PIL import Image
        from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

        vae, (height, width) = self.pipeline.vae, self.resolution()
        vae_device = next(vae.parameters()).device  # on the CPU under model.offload_vae
        frames = []
        for path in paths:
            with Image.open(path) as image:
                pixels = self.pipeline.video_processor.preprocess(image.convert("RGB"), height=height, width=width)
            z = retrieve_latents(vae.encode(pixels.unsqueeze(2).to(vae_device, vae.dtype)), sample_mode="argmax")
            frames.append(z.to(self.device, torch.float32))
        z = torch.cat(frames)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return (z - mean) * inverse_std

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        # the rows' given first frame (image-to-video) goes in front of the sampled ones; CFG's halves share it
        first = self.cache.gather("first_frame", rows, self.device, dtype)
        given = first.shape[2]
        x = torch.cat([first, x.to(self.device, dtype)], dim=2)
        rows, x, s = self._with_negative(rows, x, s)
        embeds = self.cache.gather("prompt_embeds", rows, self.device, dtype)
        # Wan takes timesteps in [0, 1000] (scheduler.timesteps = sigmas * 1000), in float32 as the pipeline does
        timestep = s * self.pipeline.scheduler.config.num_train_timesteps
        if self.pipeline.config.expand_timesteps:  # Wan2.2-TI2V: one timestep per latent token (patches)
            _, patch_h, patch_w = self.pipeline.transformer.config.patch_size
            per_frame = (x.shape[3] // patch_h) * (x.shape[4] // patch_w)
            timestep = timestep[:, None].repeat(1, x.shape[2] * per_frame)
            timestep[:, :given * per_frame] = 0.0  # the image's tokens are clean (diffusers' first_frame_mask)
        # positional hidden states: the trainer's call counter reads the batch size from the first input
        out = self.net(x, timestep, embeds, return_dict=False)[0][:, :, given:]
        return self._guided(out)

    def decode(self, latents: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (batch, C, T, H, W) -> videos (batch, T, 3, H, W) in [0, 1], NOT clamped, float32 (the base's
        chunks and offload). `cond` (the samples' prompt rows) puts an image-to-video sample's given first frame back
        in front: Wan's VAE is causal in time, so the sampled frames decode after it."""
        if cond is not None:
            first = self.cache.gather("first_frame", cond, latents.device, latents.dtype)
            latents = torch.cat([first, latents], dim=2)
        return super().decode(latents)

    def _decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, C, T, H, W) -> videos (b, T, 3, H, W) in [0, 1], float32; `decode` runs them in chunks of
        `decode_batch_size` videos (the VAE's memory grows with frames; `vae_tiling` tiles each frame spatially)."""
        vae = self.pipeline.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = z * std.to(z) + mean.to(z)  # the pipeline's `latents / (1 / std) + mean`
        video = vae.decode(z, return_dict=False)[0].float()  # (b, 3, T, H, W) in [-1, 1]
        return ((video + 1.0) / 2.0).permute(0, 2, 1, 3, 4)

    # ---- LoRA files and exports of the two experts -----------------------------------------------------------------
    def load_lora(self, path: str | Path) -> None:
        """Merge a diffusers LoRA into `transformer`; with Wan 2.2, a `..._transformer_2` file beside it (as our
        exports write) goes into `transformer_2`."""
        super().load_lora(path)
        path = Path(path)
        file = path / LORA_FILE if path.is_dir() else path
        second = file.with_name(file.stem + "_transformer_2" + file.suffix)
        if "transformer_2" in self.experts and second.is_file():
            self.pipeline.load_lora_weights(str(second.parent), weight_name=second.name, adapter_name="merged_2",
                                            load_into_transformer_2=True)
            self.pipeline.fuse_lora(components=["transformer_2"])
            self.pipeline.unload_lora_weights()
        self._pristine = _parameters_fingerprint(self._transformer())

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """DiffusersAdapter.save; for Wan 2.2 the model card also loads the low-noise expert's LoRA or transformer."""
        from neighbor_grpo.models.lora import is_lora

        second = {}
        if "transformer_2" in self.experts and not self.options["export_pipeline"]:
            changed = not torch.equal(_parameters_fingerprint(self._transformer()), self._pristine)
            if is_lora(self.net):
                second = {"loras_transformer_2": [SECOND_EXPERT_LORA]}
            elif changed:
                second = {"transformer_2": "transformer_2"}
        super().save(folder, {**second, **(extra or {})})

    def _save_lora(self, folder: Path) -> None:
        experts = self._transformer()
        if not isinstance(experts, WanExperts):
            return super()._save_lora(folder)
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(experts)
        config = self.net.peft_config["default"].to_dict()
        metadata = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        for prefix, name in (("high.", LORA_FILE), ("low.", SECOND_EXPERT_LORA)):
            part = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}
            type(self.pipeline).save_lora_weights(str(folder), transformer_lora_layers=part, weight_name=name,
                                                  transformer_lora_adapter_metadata=metadata)

    def _save_pipeline(self, folder: Path) -> None:
        if not isinstance(self._transformer(), WanExperts):
            return super()._save_pipeline(folder)
        from neighbor_grpo.models.lora import is_lora, merged_copy

        experts = merged_copy(self.net) if is_lora(self.net) else self._transformer()
        if hasattr(experts, "get_base_model"):
            experts = experts.get_base_model()
        components = dict(self.pipeline.components, transformer=experts.high, transformer_2=experts.low)
        type(self.pipeline)(**components, **self.pipeline_settings()).save_pretrained(str(folder))

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "WanAdapter":
        return cls.from_folder(Path(folder), device, options)
