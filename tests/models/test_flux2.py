"""FLUX.2 [dev] and [klein] through diffusers, on tiny random Flux2Pipeline / Flux2KleinPipeline folders saved to
disk and loaded like real checkpoints: prompt embeddings equal the pipeline's `encode_prompt`; our Euler rollout at
the pipeline's sigmas gives the pipeline's latents and images (guidance embedding for [dev], true CFG for [klein]);
LoRA files and merged pipelines diffusers loads without key warnings; gradient checkpointing; the FSDP units;
Neighbor GRPO one iteration on each."""

import csv
import json
import logging
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import Flux2Adapter, Flux2KleinAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.models.lora import apply_lora
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_flux2_zimage

pytestmark = pytest.mark.usefixtures("single_thread")

# the [dev] prompt carries FLUX.2's system message (about 30 tokens here) before the user's text
SIZE = {"height": 16, "width": 16, "max_sequence_length": 48}
PROMPTS = ["a red cat", "a blue dog"]
REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"dev": tiny_flux2_zimage.build_flux2(root / "dev"),
            "klein": tiny_flux2_zimage.build_flux2_klein(root / "klein"),
            "klein-distilled": tiny_flux2_zimage.build_flux2_klein(root / "distilled", distilled=True)}


def pipeline_for(folder):
    import diffusers

    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def no_loading_warnings():
    """Fails if diffusers or peft warn while loading (unexpected or missing LoRA keys are reported that way)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not messages, messages


def randomized_lora(adapter, seed=0):
    """A LoRA whose B matrices are not zero, so it changes the model (a fresh LoRA is a no-op)."""
    adapter.net = apply_lora(adapter.net, 4, 8.0, adapter.default_lora_targets())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.net.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return adapter


def our_latents(adapter, noise, prompts, steps):
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise,
                         sigma_grid(steps, adapter.default_shift(steps)), "euler").states[-1]


def pipeline_latents(adapter, pipe, noise, steps, **call):
    """The pipeline's own sampling from our initial noise, in our latent layout (normalised 2x2 patches)."""
    run = dict(prompt=PROMPTS, height=16, width=16, num_inference_steps=steps, max_sequence_length=48,
               latents=noise, **call)
    out = pipe(**run, output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(steps, adapter.default_shift(steps)), atol=1e-6, rtol=0)
    images = pipe(**run, output_type="pt").images
    return out, images


def compare(adapter, ours, theirs):
    """[dev] returns packed tokens (B, h*w, C); [klein] the VAE's latents (normalisation and patches undone)."""
    if theirs.dim() == 3:
        return (pipe_tokens(ours) - theirs).abs().max().item()
    return (adapter.vae_latents(ours) - theirs).abs().max().item()


def pipe_tokens(latents):
    return latents.flatten(2).transpose(1, 2)


CASES = {"dev": dict(guidance_scale=3.5), "klein": dict(guidance_scale=4.0), "klein-distilled": dict(guidance_scale=4.0)}


@pytest.mark.parametrize("name", list(CASES))
def test_prompt_embeddings_and_pipeline_parity(folders, name):
    options = {**SIZE, "guidance": 3.5, "cfg_scale": 4.0}
    adapter = load_adapter(folders[name], options=options)
    assert type(adapter) is (Flux2Adapter if name == "dev" else Flux2KleinAdapter)
    assert adapter.latent_shape() == (16, 4, 4)  # 4 VAE channels x 2x2 patches; 16 px / VAE factor 2 / patch 2
    assert adapter.uses_cfg == (name == "klein")
    pipe = pipeline_for(folders[name])
    rows = adapter.encode_prompts(PROMPTS)
    theirs, _ = pipe.encode_prompt(prompt=PROMPTS, device=torch.device("cpu"), max_sequence_length=48)
    ours = adapter.cache.gather("prompt_embeds", rows, torch.device("cpu"), torch.float32)
    assert ours.shape == theirs.shape and ours.shape[-1] == 3 * 16  # three hidden-state layers side by side
    assert (ours - theirs).abs().max() == 0
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the prompt survives the chat template and truncation

    steps = 3
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    latents, images = pipeline_latents(adapter, pipe, noise, steps, **CASES[name])
    ours = our_latents(adapter, noise, PROMPTS, steps)
    gap = compare(adapter, ours, latents)
    print(f"FLUX.2 {name} parity: latents max |ours - pipeline| = {gap:.2e}")
    assert gap <= 1e-5
    assert (adapter.decode(ours).clamp(0, 1) - images).abs().max() <= 1e-5
    if name == "klein":  # CFG matters: without it the pipeline samples something else
        plain, _ = pipeline_latents(adapter, pipe, noise, steps, guidance_scale=1.0)
        assert (plain - latents).abs().max() > 1e-3


def test_shift_follows_steps_and_the_trainer_passes_them(folders):
    from neighbor_grpo.models import model_default_shift
    from neighbor_grpo.training.parts import model_shift

    adapter = load_adapter(folders["dev"], options=SIZE)
    assert adapter.default_shift(4) != adapter.default_shift(28)  # FLUX.2's mu depends on the step count
    assert model_default_shift(adapter, 7) == adapter.default_shift(7)
    config = tiny_run_config(folders["dev"], "neighbor_grpo.rollout_steps=5")
    assert model_shift(config, adapter) == pytest.approx(adapter.default_shift(5))


@pytest.mark.parametrize("name", ["dev", "klein"])
def test_lora_and_full_exports_load_in_diffusers(folders, name, tmp_path):
    """Our LoRA file loads into the model's pipeline with no key warnings and samples what our adapter samples; the
    merged export is a pipeline folder `from_pretrained` loads ([klein]: its distilled flag kept); both reload as
    adapters."""
    folder = folders[name]
    options = {**SIZE, "cfg_scale": 4.0, "guidance": 4.0}
    adapter = load_adapter(folder, options=options)
    assert adapter.default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj"]
    adapter = randomized_lora(adapter)
    adapter.save(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "model.json").read_text())["kind"] == "lora"
    steps = 2
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    ours = our_latents(adapter, noise, PROMPTS, steps)
    pipe = pipeline_for(folder)
    base, _ = pipeline_latents(adapter, pipe, noise, steps, guidance_scale=4.0)
    with no_loading_warnings():
        pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    with_lora, _ = pipeline_latents(adapter, pipe, noise, steps, guidance_scale=4.0)
    gap = compare(adapter, ours, with_lora)
    print(f"FLUX.2 {name} LoRA export: latents max |ours - pipeline + load_lora_weights| = {gap:.2e}")
    assert gap <= 1e-5 and (with_lora - base).abs().max() > 1e-3
    reloaded = load_adapter(tmp_path / "lora")
    assert compare(adapter, our_latents(reloaded, noise, PROMPTS, steps), with_lora) <= 1e-5

    adapter.options["export_pipeline"] = True
    adapter.save(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "model.json").read_text())["kind"] == "pipeline"
    merged = pipeline_for(tmp_path / "merged")
    merged_latents, _ = pipeline_latents(adapter, merged, noise, steps, guidance_scale=4.0)
    assert compare(adapter, ours, merged_latents) <= 1e-5
    if name == "dev":
        return
    assert merged.config.is_distilled is False
    distilled = load_adapter(folders["klein-distilled"], options=SIZE)
    distilled.options["export_pipeline"] = True
    with torch.no_grad():
        next(distilled.net.parameters()).add_(0.1)  # stands in for a full fine-tune's steps
    distilled.save(tmp_path / "distilled")
    assert pipeline_for(tmp_path / "distilled").config.is_distilled is True


def test_gradient_checkpointing_and_fsdp_units(folders):
    adapter = load_adapter(folders["dev"], options=SIZE)
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)

    def gradients():
        adapter.net.zero_grad(set_to_none=True)
        adapter.velocity(x, torch.tensor(0.5), rows).square().mean().backward()
        return [p.grad.clone() for p in adapter.net.parameters()]

    plain = gradients()
    adapter.enable_gradient_checkpointing()
    assert adapter.net.is_gradient_checkpointing
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # FSDP's units (parallel.wrapping.shard_in_place): FLUX.2's double- and single-stream blocks, the classes
    # diffusers names as never to be split (not the attention's to_out ModuleList)
    from neighbor_grpo.parallel.wrapping import shard_units

    units = shard_units(adapter.net)
    assert {type(u).__name__ for u in units} == set(adapter.net._no_split_modules) == {"Flux2TransformerBlock", "Flux2SingleTransformerBlock"}
    assert len(units) == sum(len(m) for m in adapter.net.modules() if isinstance(m, torch.nn.ModuleList)
                             and all(type(b).__name__ in {"Flux2TransformerBlock", "Flux2SingleTransformerBlock"} for b in m))


def tiny_run_config(folder, *overrides):
    return load_config(None, [f"model.path={folder}", "model.height=16", "model.width=16",
                              "model.max_sequence_length=48", "iterations=1", "prompts_per_iteration=2",
                              "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                              "neighbor_grpo.rollout_steps=3", "eval.samples_per_prompt=2", "eval.steps=2",
                              "eval.every=0", "optim.lr=1e-3", "optim.lora_rank=4",
                              "prompts.train=[a red cat, a blue dog, a green photo]", "prompts.eval=[a cat]",
                              *overrides])


@pytest.mark.parametrize("name,finetune", [("dev", "lora"), ("klein", "full")])
def test_neighbor_grpo_iteration(folders, name, finetune, tmp_path):
    config = tiny_run_config(folders[name], f"optim.finetune={finetune}", "model.cfg_scale=2.0",
                             "speed.gradient_checkpointing=true")
    adapter = load_adapter(config.model.path, options=config.model)
    targets = set(adapter.default_lora_targets())
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 1 and np.isfinite(losses).all()
    assert adapter._transformer().is_gradient_checkpointing
    aligned = result.run_dir / "aligned"
    if finetune == "lora":  # the peers' targets when the config leaves optim.lora_targets at its default
        assert set(adapter.net.peft_config["default"].target_modules) == targets and "to_qkv_mlp_proj" in targets
        pipe = pipeline_for(folders[name])
        with no_loading_warnings():
            pipe.load_lora_weights(aligned, weight_name=LORA_FILE)
    else:  # a full fine-tune exports transformer/, which diffusers' class loads
        from diffusers import Flux2Transformer2DModel

        assert json.loads((aligned / "model.json").read_text())["kind"] == "transformer"
        loaded = Flux2Transformer2DModel.from_pretrained(aligned / "transformer")
        for key, value in adapter._transformer().state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
