"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509, 2511) through diffusers' QwenImageEditPipeline and
QwenImageEditPlusPipeline: Qwen-Image's 20 B MMDiT, prompts and true CFG, plus the source image twice.

Every prompt is an editing prompt (`EditPrompt`: a JSONL prompt set whose rows give an `image`). As the pipelines
do it:
- the source image is brought to about 1024 x 1024 pixels at its own aspect ratio (sides multiples of 32; the
  pipeline's `calculate_dimensions`), whatever the output size (`model.height` x `model.width`);
- Qwen2.5-VL reads the instruction together with the image: the Edit template has one image slot; the Plus
  template names it "Picture 1:", and Plus shows the VL encoder a smaller copy (about 384 x 384). The negative
  prompt of true CFG is encoded with the same image, so it is one more cached row per source image;
- the VAE encodes the source (the distribution's mode, normalised per channel like the latents); its 2x2 tokens are
  appended after the noisy tokens, `img_shapes` gives the transformer both grids (the RoPE places the source as a
  second frame; 2511's `zero_cond_t` modulates those tokens at timestep 0), and the velocity is the prediction at
  the noisy tokens only;
- true CFG and the per-token norm rescaling, the timestep (sigma in [0, 1]), the VAE normalisation and exp(mu) shift
  are Qwen-Image's (`qwen_image`).
Source images of one batch must give the same latent size (one aspect ratio): the pipelines edit one image per call.
The Plus pipeline takes several source images per prompt; an `EditPrompt` carries one.

The text encoder's processor: in transformers 5, `Qwen2VLProcessor` requires a video processor, whose class needs
torchvision (not a dependency here: it pins its own torch), so neither loading the checkpoint's processor/ folder nor
passing `video_processor=None` works without it. The pipelines only show images, so the adapter builds the
smallest subclass that declares no video processor, from the checkpoint's own processor/ files with transformers'
PIL image processor (`Qwen2VLImageProcessorPil`, the one transformers itself falls back to without torchvision), and
hands it to `from_pretrained`. With torchvision installed, diffusers would pick the torchvision image processor,
whose resizing may differ from PIL's in the last bits; the tests compare against the pipeline given this processor.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

from neighbor_grpo.config.prompts import EditPrompt
from neighbor_grpo.models import register_model_adapter
from neighbor_grpo.models.diffusers_common import DiffusersAdapter
from neighbor_grpo.models.flux_kontext import require_sources
from neighbor_grpo.models.qwen_image import QwenImageAdapter, guided, image_only_processor_class
from neighbor_grpo.runs.io import atomic_write_text

STANDARD_PROCESSOR = ["transformers", "Qwen2VLProcessor"]  # what the published model_index.json files name


def load_processor(base: Path):
    """The checkpoint's processor/ (image processor and tokenizer files), as an image-only Qwen2VLProcessor."""
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

    folder = Path(base) / "processor"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing; a Qwen-Image-Edit folder holds the text encoder's processor there")
    processor = image_only_processor_class("Qwen2VLProcessor")
    return processor(Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True),
                     Qwen2Tokenizer.from_pretrained(folder, local_files_only=True))


def declare_standard_processor(folder: Path) -> None:
    """A saved pipeline names the processor as the published folders do (transformers' Qwen2VLProcessor), not
    the image-only subclass, so diffusers loads it anywhere; the files are the same."""
    for path, key, value in ((folder / "model_index.json", "processor", STANDARD_PROCESSOR),
                             (folder / "processor" / "processor_config.json", "processor_class", STANDARD_PROCESSOR[1])):
        if path.is_file():
            config = json.loads(path.read_text())
            config[key] = value
            atomic_write_text(path, json.dumps(config, indent=2))


def vl_image_tokens(image_processor, width: int, height: int) -> int:
    """Tokens one source image of width x height pixels takes in the VL encoder's prompt (its `<|image_pad|>` run,
    which the prompt embeddings keep): the image processor's patch grid after its own resize (Qwen2.5-VL: sides
    multiples of 28 within its min/max pixels), merged merge_size x merge_size."""
    from PIL import Image

    grid = image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // int(image_processor.merge_size) ** 2


def open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"source image {path!r}: not a readable image ({error})") from None


@register_model_adapter("qwen_image_edit")
class QwenImageEditAdapter(QwenImageAdapter):
    NAME = "qwen_image_edit"
    PIPELINE = "QwenImageEditPipeline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.negative_rows: dict[int, int] = {}  # a prompt's row -> the row of the negative prompt on its image

    @classmethod
    def loaded_components(cls, base: Path) -> dict:
        return {"processor": load_processor(base)}

    @classmethod
    def pipeline_module(cls):
        """The diffusers module of the adapter's pipeline (its sizes are read from it at call time)."""
        import diffusers

        return importlib.import_module(getattr(diffusers, cls.PIPELINE).__module__)

    @classmethod
    def source_sizes(cls, ratio: float) -> tuple[tuple[int, int], tuple[int, int]]:
        """(width, height) of the copy of a source image (aspect ratio `ratio`, width / height) that the VL encoder
        sees and of the copy the VAE encodes: for Edit both about 1024 x 1024 (the pipeline's
        `calculate_dimensions`). The planner sizes its stand-in sources with this too."""
        width, height, _ = cls.pipeline_module().calculate_dimensions(1024 * 1024, ratio)
        return (width, height), (width, height)

    def source_inputs(self, image):
        """(what the VL encoder sees, the VAE's pixels (1, 3, h, w) in [-1, 1]), as QwenImageEditPipeline prepares
        them: both the source resized to about 1024 x 1024 at its aspect ratio."""
        _, (width, height) = self.source_sizes(image.width / image.height)
        resized = self.pipeline.image_processor.resize(image, height, width)
        return resized, self.pipeline.image_processor.preprocess(resized, height, width)

    def encode_new_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One prompt at a time, as the pipelines encode it (the Plus pipeline takes one prompt per call): the
        embeddings padded to the longest of this batch with their true lengths, and the source's VAE latents."""
        embeds, latents = [], []
        for prompt, path in zip(prompts, require_sources(prompts, self.NAME)):
            condition, pixels = self.source_inputs(open_rgb(path))
            embeds.append(self.pipeline.encode_prompt(prompt=[str(prompt)], image=condition, device=self.device)[0][0])
            latents.append(self.vae_latents(pixels))
        sizes = {tuple(z.shape[-2:]) for z in latents}
        if len(sizes) > 1:
            raise ValueError(f"{self.NAME}: source images of different aspect ratios give latents of sizes "
                             f"{sorted(sizes)} in one batch; use source images of one aspect ratio per prompt set")
        lengths = [e.shape[0] for e in embeds]
        padded = torch.stack([torch.cat([e, e.new_zeros(max(lengths) - len(e), e.shape[-1])]) for e in embeds])
        return {"prompt_embeds": padded, "prompt_lengths": torch.tensor(lengths), "image_latents": torch.cat(latents)}

    @torch.no_grad()
    def vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents (1, C, h, w) of preprocessed pixels (the pipeline's `_encode_vae_image`)."""
        vae = self.pipeline.vae
        vae_device = next(vae.parameters()).device  # on the CPU under model.offload_vae
        frames = pixels[:, :, None].to(vae_device, vae.dtype)
        return self.pipeline._encode_vae_image(frames, generator=None)[:, :, 0].to(self.device)

    def encode_prompts(self, prompts):
        require_sources(list(prompts), self.NAME)
        rows = DiffusersAdapter.encode_prompts(self, prompts)
        if self.uses_cfg:  # the negative prompt on each prompt's own source image
            negatives = [EditPrompt(self.options["negative_prompt"], p.image) for p in prompts]
            self.negative_rows.update(zip(rows.tolist(), DiffusersAdapter.encode_prompts(self, negatives).tolist()))
        return rows

    def source_tokens(self, rows: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The rows' packed source latents and their latent (h, w)."""
        if is_fake(rows):  # `ngrpo plan` traces shapes only (model.forward_batch_size slices rows inside the call)
            source = self.cache.gather("image_latents", rows, self.device, self.dtype)
            B, C, h, w = source.shape
            return self.pipeline._pack_latents(source, B, C, h, w), (h, w)
        cached = [self.cache.tensors["image_latents"][i] for i in rows.tolist()]
        if len({z.shape for z in cached}) > 1:
            raise ValueError(f"{self.NAME}: one batch holds source images of different aspect ratios (latents "
                             f"{sorted({tuple(z.shape[-2:]) for z in cached})}); use one aspect ratio per prompt set")
        source = torch.stack(cached).to(self.device, self.dtype)
        B, C, h, w = source.shape
        return self.pipeline._pack_latents(source, B, C, h, w), (h, w)

    def _velocity(self, x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pipeline, dtype = self.pipeline, self.dtype
        B, C, H, W = x.shape
        tokens = pipeline._pack_latents(x.to(self.device, dtype), B, C, H, W)
        source, (h, w) = self.source_tokens(rows)
        if self.uses_cfg:  # one transformer call on [conditional; negative], both with the source image
            # (the planner's sliced rows are fake: its stand-in negative rows have the prompts' shapes, so it reuses them)
            negative = rows if is_fake(rows) else torch.tensor([self.negative_rows[r] for r in rows.tolist()],
                                                               dtype=torch.long)
            rows, tokens, source, s = (torch.cat([rows, negative]), torch.cat([tokens, tokens]),
                                       torch.cat([source, source]), torch.cat([s, s]))
        embeds, mask = self.text_condition(rows)
        out = self.net(torch.cat([tokens, source], dim=1), encoder_hidden_states=embeds,
                       encoder_hidden_states_mask=mask, timestep=s.to(dtype),
                       img_shapes=[[(1, H // 2, W // 2), (1, h // 2, w // 2)]] * tokens.shape[0],
                       return_dict=False)[0][:, :tokens.shape[1]]
        if self.uses_cfg:
            positive, negative = out.chunk(2)
            out = guided(positive, negative, float(self.options["cfg_scale"]))
        factor = pipeline.vae_scale_factor
        return pipeline._unpack_latents(out, H * factor, W * factor, factor)[:, :, 0]

    def _save_pipeline(self, folder: Path) -> None:
        super()._save_pipeline(folder)
        declare_standard_processor(folder)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", options=None) -> "QwenImageEditAdapter":
        return cls.from_folder(Path(folder), device, options)


@register_model_adapter("qwen_image_edit_plus")
class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Edit-Plus: the VL encoder sees a ~384 x 384 copy ("Picture 1:" in the template), the VAE a ~1024 x 1024 one."""

    NAME = "qwen_image_edit_plus"
    PIPELINE = "QwenImageEditPlusPipeline"

    @classmethod
    def source_sizes(cls, ratio: float) -> tuple[tuple[int, int], tuple[int, int]]:
        module = cls.pipeline_module()
        return (tuple(module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, ratio)),
                tuple(module.calculate_dimensions(module.VAE_IMAGE_SIZE, ratio)))

    def source_inputs(self, image):
        (condition_width, condition_height), (vae_width, vae_height) = self.source_sizes(image.width / image.height)
        condition = self.pipeline.image_processor.resize(image, condition_height, condition_width)
        # a list: the Plus template numbers its pictures ("Picture 1: ...") even for one
        return [condition], self.pipeline.image_processor.preprocess(image, vae_height, vae_width)
