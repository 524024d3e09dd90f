"""Qwen-Image-Edit and Qwen-Image-Edit-Plus through diffusers, on tiny random QwenImageEditPipeline /
QwenImageEditPlusPipeline folders saved to disk and loaded like real checkpoints (the processor built without
torchvision): the prompt embeddings the pipeline uses (instruction and source image through Qwen2.5-VL) equal ours,
our Euler rollout equals the pipeline's from the same noise with true CFG (source latents as extra tokens,
img_shapes), Neighbor GRPO trains a LoRA on a JSONL editing prompt set with a reward that receives the source images,
the LoRA export loads with load_lora_weights without key warnings and samples like our model, and a full export
loads with from_pretrained.

The pipelines bring every source image to about 1 megapixel (Plus: its VL copy to about 384 x 384), which a tiny
CPU test cannot afford; the module's fixture shrinks those areas in the pipeline modules (the adapter reads the
same module values), so the sources here are 96 x 32 (VL copy 32 x 32 for Plus) and the outputs 32 x 32."""

import json

import pytest
import torch

from neighbor_grpo.config.prompts import EditPrompt
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import QwenImageEditAdapter, QwenImageEditPlusAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.models.qwen_image_edit import load_processor
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_qwen
from test_flux import randomized_lora, tiny_run_config

pytestmark = pytest.mark.usefixtures("single_thread", "small_source_areas")

SIZE = {"height": 32, "width": 32, "cfg_scale": 4.0, "negative_prompt": " "}
VARIANTS = {"edit": ("QwenImageEditPipeline", QwenImageEditAdapter),
            "plus": ("QwenImageEditPlusPipeline", QwenImageEditPlusAdapter)}


@pytest.fixture(scope="module")
def small_source_areas():
    """Source areas 1/256 of the pipelines' (tiny_qwen.small_source_areas), at the sources' 2:1 aspect ratio
    96 x 32 after rounding to multiples of 32."""
    with tiny_qwen.small_source_areas():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"edit": tiny_qwen.build_qwen_image_edit(root / "edit"),
            "plus": tiny_qwen.build_qwen_image_edit(root / "plus", plus=True)}


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """Two 40 x 20 source images (2:1) and a JSONL prompt set editing them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("edits")
    generator = torch.Generator().manual_seed(3)
    rows = []
    for name, text in (("one", "make it red"), ("two", "a blue cat on the green grass")):
        pixels = (torch.rand(20, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}.png")
        rows.append({"prompt": text, "image": f"{name}.png"})
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def prompts_of(edits):
    return [EditPrompt("make it red", edits / "one.png"), EditPrompt("a blue cat on the green grass", edits / "two.png")]


def pipeline(variant, folder):
    import diffusers

    pipe = getattr(diffusers, VARIANTS[variant][0]).from_pretrained(folder, processor=load_processor(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, prompts, noise, steps, cfg_scale=4.0, embeddings=None):
    """The pipeline's latents, one prompt per call (the Plus pipeline takes one); `embeddings` collects what its
    encode_prompt returned to the denoising loop."""
    from PIL import Image

    encode = pipe.encode_prompt
    if embeddings is not None:
        pipe.encode_prompt = lambda **kwargs: embeddings.append(encode(**kwargs)) or embeddings[-1]
    try:
        B, C, H, W = noise.shape
        out = []
        for prompt, latents in zip(prompts, noise):
            packed = pipe(image=Image.open(prompt.image).convert("RGB"), prompt=str(prompt), negative_prompt=" ",
                          true_cfg_scale=cfg_scale, height=32, width=32, num_inference_steps=steps,
                          output_type="latent", latents=pipe._pack_latents(latents[None], 1, C, H, W)).images
            out.append(pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)[:, :, 0])
        return torch.cat(out)
    finally:
        pipe.encode_prompt = encode


def our_latents(adapter, prompts, noise, sigmas):
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigmas, "euler").states[-1]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prompt_embeddings_and_rollout_equal_the_pipelines(variant, folders, edits):
    adapter = load_adapter(folders[variant], options=SIZE)
    assert type(adapter) is VARIANTS[variant][1] and adapter.latent_shape() == (4, 8, 8)
    assert adapter.pipeline.processor.image_processor.size == tiny_qwen.PROCESSOR_SIZE  # the checkpoint's files
    assert adapter.net.config.zero_cond_t == (variant == "plus")  # Plus runs 2511's source-token modulation
    prompts = prompts_of(edits)
    pipe = pipeline(variant, folders[variant])
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    used = []
    theirs = pipeline_latents(pipe, prompts, noise, 3, embeddings=used)
    # embeddings: (prompt, negative prompt) per call, each encoded with the source image
    rows = adapter.encode_prompts(prompts)
    negatives = torch.tensor([adapter.negative_rows[r] for r in rows.tolist()])
    for i, row in enumerate([*zip(rows, negatives)]):
        for ours_row, (their_embeds, their_mask) in zip(row, used[2 * i:2 * i + 2]):
            embeds, mask = adapter.text_condition(ours_row[None])
            assert their_mask is None and mask is None and embeds.shape == their_embeds.shape
            gap = (embeds - their_embeds).abs().max()
            print(f"{variant}: prompt embedding gap {gap:.2e}")
            assert gap <= 1e-6, gap  # measured 0
    assert used[0][0].shape[1] != used[2][0].shape[1]  # different lengths: our batch pads and masks
    assert adapter.cache.tensors["image_latents"][0].shape == (4, 8, 24)  # the 96 x 32 source, 4x smaller
    # the rollout, from the same noise on the pipeline's sigmas: source latents as tokens, true CFG
    ours = our_latents(adapter, prompts, noise, pipe.scheduler.sigmas.float())
    gap = (ours - theirs).abs().max()
    print(f"{variant}: CFG 4.0 rollout gap {gap:.2e}")
    assert gap <= 1e-5, gap
    plain = load_adapter(folders[variant], options={**SIZE, "cfg_scale": 1.0})
    no_cfg = pipeline_latents(pipe, prompts, noise, 3, cfg_scale=1.0)
    gap = (our_latents(plain, prompts, noise, pipe.scheduler.sigmas.float()) - no_cfg).abs().max()
    print(f"{variant}: no-CFG rollout gap {gap:.2e}")
    assert gap <= 1e-5, gap
    assert (no_cfg - theirs).abs().max() > 1e-3  # CFG matters
    # the source image matters, through the VL encoder and the extra tokens
    swapped = [EditPrompt(str(p), edits / "one.png") for p in prompts]
    assert (our_latents(adapter, swapped, noise, pipe.scheduler.sigmas.float())[1] - ours[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="every prompt needs a source image"):
        adapter.encode_prompts(["a plain prompt"])


def test_sources_of_two_aspect_ratios_in_one_batch_are_one_clear_error(folders, edits, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 40), "red").save(tmp_path / "tall.png")  # 1:2 where the others are 2:1
    adapter = load_adapter(folders["edit"], options={**SIZE, "cfg_scale": 1.0})
    with pytest.raises(ValueError, match=r"different aspect ratios .* \[\(8, 24\), \(24, 8\)\]"):
        adapter.encode_prompts([prompts_of(edits)[0], EditPrompt("make it blue", tmp_path / "tall.png")])
    rows = torch.cat([adapter.encode_prompts(prompts_of(edits)[:1]),
                      adapter.encode_prompts([EditPrompt("make it blue", tmp_path / "tall.png")])])
    with pytest.raises(ValueError, match="one batch holds source images of different aspect ratios"):
        adapter.velocity(torch.zeros(2, *adapter.latent_shape()), torch.tensor(0.5), rows)


def lora_load_warnings(variant, base, lora_folder) -> list[str]:
    return tiny_diffusers.lora_key_warnings(pipeline(variant, base), lora_folder, LORA_FILE)


def test_neighbor_grpo_on_editing_prompts_passes_source_images_to_rewards(folders, edits, tmp_path):
    seen = []

    def keeps_the_source(images, prompts, source_images):
        seen.append((images.shape, source_images.shape, [p.image for p in prompts]))
        return -(images - source_images).abs().mean(dim=(1, 2, 3))

    keeps_the_source.needs = ("source_images",)
    config = tiny_run_config(folders["edit"], "optim.finetune=lora", "iterations=1", "model.height=32",
                             "model.width=32", "model.cfg_scale=4.0", "model.negative_prompt=' '",
                             f"prompts.file={edits / 'edits.jsonl'}", f"prompts.eval_file={edits / 'edits.jsonl'}")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter,
                   rewards=WeightedRewards({"keep": keeps_the_source}))
    assert seen and all(images == sources for images, sources, _ in seen)
    assert {path for *_, paths in seen for path in paths} == {str(edits / "one.png"), str(edits / "two.png")}
    assert any(p.abs().max() > 0 for n, p in adapter.net.named_parameters() if "lora_B" in n)  # it trained
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "lora"
    assert lora_load_warnings("edit", folders["edit"], aligned) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_round_trip_and_full_export(variant, folders, edits, tmp_path):
    """A LoRA export sampled by the pipeline (load_lora_weights) equals our rollout; a full export is a pipeline
    folder that from_pretrained loads, naming the processor as the published folders do."""
    adapter = randomized_lora(load_adapter(folders[variant], options=SIZE))
    adapter.save(tmp_path / "lora")
    assert lora_load_warnings(variant, folders[variant], tmp_path / "lora") == []
    pipe = pipeline(variant, folders[variant])
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    prompts = prompts_of(edits)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    theirs = pipeline_latents(pipe, prompts, noise, 2)
    gap = (our_latents(adapter, prompts, noise, pipe.scheduler.sigmas.float()) - theirs).abs().max()
    print(f"{variant}: LoRA round trip gap {gap:.2e}")
    assert gap <= 1e-5, gap
    full = load_adapter(folders[variant], options={**SIZE, "export_pipeline": True})
    with torch.no_grad():
        next(full.net.parameters()).add_(0.1)  # stands in for optimizer steps of a full fine-tune
    full.save(tmp_path / "full")
    index = json.loads((tmp_path / "full" / "model_index.json").read_text())
    assert index["_class_name"] == VARIANTS[variant][0] and index["processor"] == ["transformers", "Qwen2VLProcessor"]
    exported = pipeline(variant, tmp_path / "full")
    for name, param in exported.transformer.named_parameters():
        assert torch.equal(param, dict(full.net.named_parameters())[name])
    assert json.loads((tmp_path / "full" / "model.json").read_text())["kind"] == "pipeline"
    again = load_adapter(tmp_path / "full", options=SIZE)
    assert isinstance(again, VARIANTS[variant][1])


def test_neighbor_grpo_full_finetune_of_edit_plus_exports_a_transformer(folders, edits, tmp_path):
    """Edit-Plus (2511's zero_cond_t) as a full fine-tune with gradient checkpointing: one iteration changes the
    weights, and the exported transformer/ loads with from_pretrained holding them."""
    from diffusers import QwenImageTransformer2DModel

    from test_qwen_image import trained

    config = tiny_run_config(folders["plus"], "optim.finetune=full", "iterations=1", "model.height=32",
                             "model.width=32", "model.cfg_scale=1.0", "speed.gradient_checkpointing=true",
                             f"prompts.file={edits / 'edits.jsonl'}", f"prompts.eval_file={edits / 'edits.jsonl'}")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter,
                   rewards=WeightedRewards({"red": lambda images, prompts: images[:, 0].mean(dim=(1, 2))}))
    assert trained(adapter) and adapter.net.is_gradient_checkpointing
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "transformer"
    exported = QwenImageTransformer2DModel.from_pretrained(aligned / "transformer")
    assert exported.config.zero_cond_t
    for name, param in exported.named_parameters():
        assert torch.equal(param, dict(adapter.net.named_parameters())[name])
