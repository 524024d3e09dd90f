"""Z-Image through diffusers, on a tiny random ZImagePipeline saved to disk and loaded like a real checkpoint: caption
features equal the pipeline's `encode_prompt` (chat template, second-to-last Qwen3 layer, padding removed); our Euler
rollout at the pipeline's sigmas gives its latents and images, with and without CFG; LoRA and full exports diffusers
loads; gradient checkpointing and FSDP units; and every algorithm of the harness runs one iteration on it."""

import csv
import json

import numpy as np
import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import ZImageAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_flux2_zimage
from test_flux2 import no_loading_warnings, randomized_lora

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"height": 16, "width": 16, "max_sequence_length": 24, "cfg_scale": 1.0}  # Turbo: no CFG
PROMPTS = ["a red cat", "a blue dog on the green"]  # different lengths: captions are ragged
REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_flux2_zimage.build_z_image(tmp_path_factory.mktemp("tiny") / "z_image")


def pipeline_for(path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_latents(adapter, noise, steps, prompts=PROMPTS, sigmas=None):
    """Our Euler rollout on our grid, or on `sigmas` (the pipeline's own, float32 as its scheduler made them)."""
    cond = adapter.encode_prompts(prompts)
    grid = sigma_grid(steps, adapter.default_shift()) if sigmas is None else sigmas
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, grid, "euler").states[-1]


def pipeline_latents(adapter, pipe, noise, steps, guidance_scale):
    # a new prompt list for each call: ZImagePipeline writes the chat-templated prompts back into the one it gets
    run = dict(height=16, width=16, num_inference_steps=steps, max_sequence_length=24, guidance_scale=guidance_scale)
    latents = pipe(prompt=list(PROMPTS), latents=noise.clone(), **run, output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(steps, adapter.default_shift()), atol=1e-6, rtol=0)
    return latents, pipe(prompt=list(PROMPTS), latents=noise.clone(), **run, output_type="pt").images


def test_caption_features_equal_encode_prompt(folder):
    adapter = load_adapter(folder, options=SIZE)
    assert isinstance(adapter, ZImageAdapter) and adapter.latent_shape() == (4, 8, 8)
    rows = adapter.encode_prompts(PROMPTS)
    pipe = pipeline_for(folder)
    theirs, _ = pipe.encode_prompt(list(PROMPTS), device=torch.device("cpu"), do_classifier_free_guidance=False,
                                   max_sequence_length=24)
    lengths = adapter.cache.gather("prompt_lengths", rows, torch.device("cpu"), torch.long).tolist()
    embeds = adapter.cache.gather("prompt_embeds", rows, torch.device("cpu"), torch.float32)
    assert lengths == [len(t) for t in theirs] and lengths[0] < lengths[1]
    for ours, their, n in zip(embeds, theirs, lengths):
        assert (ours[:n] - their).abs().max() == 0 and not ours[n:].any()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_pipeline_parity(folder, cfg_scale):
    """Z-Image's guidance_scale g is our cfg_scale g + 1 (g = 0: no CFG, as Z-Image-Turbo samples)."""
    adapter = load_adapter(folder, options={**SIZE, "cfg_scale": cfg_scale})
    assert adapter.default_shift() == 3.0
    steps = 3
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    pipe = pipeline_for(folder)
    latents, images = pipeline_latents(adapter, pipe, noise, steps, guidance_scale=cfg_scale - 1.0)
    ours = our_latents(adapter, noise, steps, sigmas=pipe.scheduler.sigmas)
    gap = (ours - latents).abs().max().item()
    print(f"Z-Image parity (cfg_scale {cfg_scale}): latents max |ours - pipeline| = {gap:.2e} at the pipeline's sigmas, "
          f"{(our_latents(adapter, noise, steps) - latents).abs().max().item():.2e} on our own grid")
    assert gap <= 1e-5
    assert (adapter.decode(ours).clamp(0, 1) - images).abs().max() <= 1e-5


def test_lora_and_full_exports_load_in_diffusers(folder, tmp_path):
    adapter = load_adapter(folder, options=SIZE)
    assert adapter.default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
    adapter = randomized_lora(adapter)
    adapter.save(tmp_path / "lora")
    steps = 2
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    ours = our_latents(adapter, noise, steps)
    pipe = pipeline_for(folder)
    base, _ = pipeline_latents(adapter, pipe, noise, steps, 0.0)
    with no_loading_warnings():
        pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    with_lora, _ = pipeline_latents(adapter, pipe, noise, steps, 0.0)
    gap = (ours - with_lora).abs().max().item()
    print(f"Z-Image LoRA export: latents max |ours - pipeline + load_lora_weights| = {gap:.2e}")
    assert gap <= 1e-5 and (with_lora - base).abs().max() > 1e-3
    assert (our_latents(load_adapter(tmp_path / "lora"), noise, steps) - with_lora).abs().max() <= 1e-5
    adapter.options["export_pipeline"] = True
    adapter.save(tmp_path / "merged")
    merged, _ = pipeline_latents(adapter, pipeline_for(tmp_path / "merged"), noise, steps, 0.0)
    assert (merged - ours).abs().max() <= 1e-5


def test_full_finetune_export_loads_in_diffusers(folder, tmp_path):
    from diffusers import ZImageTransformer2DModel

    adapter = load_adapter(folder, options=SIZE)
    with torch.no_grad():
        next(adapter.net.parameters()).add_(0.1)  # stands in for a full fine-tune's optimizer steps
    adapter.save(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "model.json").read_text())["kind"] == "transformer"
    loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "full" / "transformer")
    for key, value in adapter.net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    assert (our_latents(load_adapter(tmp_path / "full"), noise, 2) - our_latents(adapter, noise, 2)).abs().max() == 0


def test_gradient_checkpointing_and_fsdp_units(folder):
    adapter = load_adapter(folder, options=SIZE)
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)

    def gradients():
        adapter.net.zero_grad(set_to_none=True)
        adapter.velocity(x, torch.tensor(0.5), rows).square().mean().backward()
        return [p.grad.clone() for p in adapter.net.parameters() if p.grad is not None]

    plain = gradients()
    adapter.enable_gradient_checkpointing()
    assert adapter.net.is_gradient_checkpointing
    for a, b in zip(plain, gradients(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    from neighbor_grpo.parallel.wrapping import shard_units

    units = shard_units(adapter.net)
    assert {type(u).__name__ for u in units} == set(adapter.net._no_split_modules) == {"ZImageTransformerBlock"}
    assert len(units) == sum(len(m) for m in adapter.net.modules() if isinstance(m, torch.nn.ModuleList)
                             and all(type(b).__name__ in {"ZImageTransformerBlock"} for b in m))


# one iteration of each method at its smallest sizes (group of 4, 3 steps)
ALGORITHM_SETTINGS = {
    "neighbor_grpo": ["neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=3"],
    "flow_grpo": ["flow_grpo.group_size=4", "flow_grpo.rollout_steps=3", "flow_grpo.num_minibatches=1"],
    "dance_grpo": ["dance_grpo.group_size=4", "dance_grpo.rollout_steps=3", "dance_grpo.num_minibatches=1"],
    "mix_grpo": ["mix_grpo.group_size=4", "mix_grpo.rollout_steps=3", "mix_grpo.window_size=1",
                 "mix_grpo.num_minibatches=1"],
    "diffusion_nft": ["diffusion_nft.group_size=4", "diffusion_nft.rollout_steps=3", "diffusion_nft.num_minibatches=1"],
    "awm": ["awm.group_size=4", "awm.rollout_steps=3", "awm.num_times=2"],
    "dgpo": ["dgpo.group_size=4", "dgpo.rollout_steps=3", "dgpo.trunc_steps=2", "dgpo.num_times=2",
             "dgpo.num_minibatches=1"],
}


def test_every_algorithm_is_covered():
    assert set(ALGORITHM_SETTINGS) == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_SETTINGS))
def test_one_iteration_of_each_algorithm(folder, algorithm, tmp_path):
    config = load_config(None, [f"model.path={folder}", "model.height=16", "model.width=16",
                                "model.max_sequence_length=24", "model.cfg_scale=1.0", "iterations=1", "prompts_per_iteration=2",
                                "eval.every=0", "eval.samples_per_prompt=2", "eval.steps=2", "optim.lr=1e-3",
                                "optim.lora_rank=4", "optim.finetune=lora", "prompts.train=[a red cat, a blue dog]",
                                "prompts.eval=[a cat]", f"algorithm={algorithm}", *ALGORITHM_SETTINGS[algorithm]])
    adapter = load_adapter(config.model.path, options=config.model)
    before = {k: v.clone() for k, v in adapter.net.state_dict().items()}
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 1 and np.isfinite(losses).all()
    lora = {k: v for k, v in adapter.net.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().max() > 0 for v in lora.values())  # the LoRA was updated from zero
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in adapter.net.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in before.items())  # the base weights were not
    assert json.loads((result.run_dir / "aligned" / "model.json").read_text())["kind"] == "lora"
