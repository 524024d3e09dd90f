"""FLUX.1 Kontext (editing) through diffusers, on a tiny random FluxKontextPipeline saved to disk: the source image
enters as the pipeline's extra tokens, our Euler rollout equals the pipeline's from the same noise, prompt
embeddings equal its encode_prompt, Neighbor GRPO trains a LoRA on editing prompts with an edit-consistency reward
that receives the source images, and the LoRA export loads with load_lora_weights."""

import json

import pytest
import torch

from neighbor_grpo.config.prompts import EditPrompt
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import FluxKontextAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
from test_flux import randomized_lora, tiny_run_config
from test_qwen_image import lora_load_warnings

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"height": 16, "width": 16, "max_sequence_length": 8, "guidance": 2.5}


def build_flux_kontext(folder):
    """A FluxKontextPipeline with the tiny FLUX.1 components of tiny_diffusers (guidance embedding on, as Kontext
    [dev]), random weights, saved to `folder`."""
    from diffusers import FluxKontextPipeline

    tiny_diffusers.build_flux(folder)
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(folder)
    FluxKontextPipeline(**flux.components).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    return build_flux_kontext(tmp_path_factory.mktemp("tiny") / "kontext")


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """Two source images (16 px, the output size) and a JSONL prompt set that edits them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("edits")
    generator = torch.Generator().manual_seed(3)
    rows = []
    for name, text in (("one", "make it red"), ("two", "a blue cat")):
        pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}.png")
        rows.append({"prompt": text, "image": f"{name}.png"})
    (folder / "edits.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def prompts_of(edits):
    return [EditPrompt("make it red", edits / "one.png"), EditPrompt("a blue cat", edits / "two.png")]


def pipeline(folder):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, prompts, noise, steps):
    from PIL import Image

    B, C, H, W = noise.shape
    images = [Image.open(p.image).convert("RGB") for p in prompts]
    packed = pipe(image=images, prompt=[str(p) for p in prompts], height=16, width=16, max_area=16 * 16,
                  _auto_resize=False, num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=8,
                  output_type="latent", latents=pipe._pack_latents(noise, B, C, H, W)).images
    return pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)


def our_latents(adapter, prompts, noise, steps):
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigma_grid(steps, adapter.default_shift()),
                         "euler").states[-1]


def test_editing_rollout_equals_the_pipeline(kontext_folder, edits):
    adapter = load_adapter(kontext_folder, options=SIZE)
    assert isinstance(adapter, FluxKontextAdapter)
    prompts = prompts_of(edits)
    rows = adapter.encode_prompts(prompts)
    embeds, pooled, _ = adapter.pipeline.encode_prompt(prompt=[str(p) for p in prompts], prompt_2=None,
                                                       max_sequence_length=8)
    assert (adapter.cache.gather("prompt_embeds", rows, "cpu", torch.float32) - embeds).abs().max() <= 1e-6
    assert (adapter.cache.gather("pooled_prompt_embeds", rows, "cpu", torch.float32) - pooled).abs().max() <= 1e-6
    # the same instruction on another image is another row, with other image latents
    other = EditPrompt("make it red", edits / "two.png")
    assert adapter.encode_prompts([other]).tolist() == [2]
    steps = 3
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    pipe = pipeline(kontext_folder)
    theirs = pipeline_latents(pipe, prompts, noise, steps)
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(steps, adapter.default_shift()), atol=1e-6, rtol=0)
    ours = our_latents(adapter, prompts, noise, steps)
    gap = (ours - theirs).abs().max()
    assert gap <= 1e-5, gap  # measured 2.4e-7 on CPU fp32
    # the source image matters
    swapped = [EditPrompt(str(p), edits / "one.png") for p in prompts]
    assert (our_latents(adapter, swapped, noise, steps)[1] - ours[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="every prompt needs a source image"):
        adapter.encode_prompts(["a plain prompt"])


def test_neighbor_grpo_on_editing_prompts_passes_source_images_to_rewards(kontext_folder, edits, tmp_path):
    seen = []

    def keeps_the_source(images, prompts, source_images):
        seen.append((images.shape, source_images.shape, [p.image for p in prompts]))
        return -(images - source_images).abs().mean(dim=(1, 2, 3))

    keeps_the_source.needs = ("source_images",)
    config = tiny_run_config(kontext_folder, "optim.finetune=lora", "iterations=1", "model.guidance=2.5",
                             f"prompts.file={edits / 'edits.jsonl'}", f"prompts.eval_file={edits / 'edits.jsonl'}")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter,
                   rewards=WeightedRewards({"keep": keeps_the_source}))
    assert seen and all(images == sources for images, sources, _ in seen)
    assert {path for *_, paths in seen for path in paths} == {str(edits / "one.png"), str(edits / "two.png")}
    aligned = result.run_dir / "aligned"
    assert lora_load_warnings(kontext_folder, aligned) == []  # FluxKontextPipeline loads it without key warnings
    assert json.loads((aligned / "model.json").read_text())["kind"] == "lora"


def test_lora_export_round_trip(kontext_folder, edits, tmp_path):
    adapter = randomized_lora(load_adapter(kontext_folder, options=SIZE))
    adapter.save(tmp_path / "lora")
    pipe = pipeline(kontext_folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    prompts = prompts_of(edits)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    assert (our_latents(adapter, prompts, noise, 2) - pipeline_latents(pipe, prompts, noise, 2)).abs().max() <= 1e-5
    reloaded = load_adapter(tmp_path / "lora")
    assert (our_latents(reloaded, prompts, noise, 2) - our_latents(adapter, prompts, noise, 2)).abs().max() <= 1e-5


def test_neighbor_grpo_full_finetune_exports_a_transformer(kontext_folder, edits, tmp_path):
    from diffusers import FluxTransformer2DModel

    from test_qwen_image import trained

    config = tiny_run_config(kontext_folder, "optim.finetune=full", "iterations=1", "model.guidance=2.5",
                             "speed.gradient_checkpointing=true", f"prompts.file={edits / 'edits.jsonl'}",
                             f"prompts.eval_file={edits / 'edits.jsonl'}")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter,
                   rewards=WeightedRewards({"red": tiny_diffusers.cheap_reward}))
    assert trained(adapter)
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "transformer"
    exported = FluxTransformer2DModel.from_pretrained(aligned / "transformer")
    for name, param in exported.named_parameters():
        assert torch.equal(param, dict(adapter.net.named_parameters())[name])
