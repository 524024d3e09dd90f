"""Qwen-Image through diffusers, on a tiny random QwenImagePipeline saved to disk and loaded like a real checkpoint:
prompt embeddings equal to the pipeline's encode_prompt, step-for-step parity with QwenImagePipeline (true CFG with
its norm rescaling, packing, VAE normalisation), Neighbor GRPO with a LoRA whose export the pipeline loads with
load_lora_weights, a full fine-tune whose export it loads with from_pretrained, gradient checkpointing, and the
blocks FSDP shards."""

import json

import pytest
import torch

from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import QwenImageAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_qwen
from test_flux import randomized_lora, tiny_run_config

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"height": 32, "width": 32, "max_sequence_length": 256, "cfg_scale": 4.0, "negative_prompt": " "}
PROMPTS = ["a red cat", "a blue dog on the green"]  # different lengths: the shorter one is padded and masked
REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_qwen.build_qwen_image(tmp_path_factory.mktemp("tiny") / "qwen")


def pipeline(folder):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_load_warnings(base, lora_folder) -> list[str]:
    """Key warnings while the pipeline `model_index.json` names loads a LoRA (tiny_diffusers.lora_key_warnings)."""
    from diffusers import DiffusionPipeline

    return tiny_diffusers.lora_key_warnings(DiffusionPipeline.from_pretrained(base), lora_folder, LORA_FILE)


def pipeline_latents(pipe, noise, steps, cfg_scale=4.0):
    B, C, H, W = noise.shape
    packed = pipe(prompt=PROMPTS, negative_prompt=[" "] * B, true_cfg_scale=cfg_scale, height=32, width=32,
                  num_inference_steps=steps, max_sequence_length=256, output_type="latent",
                  latents=pipe._pack_latents(noise, B, C, H, W)).images
    return pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)[:, :, 0]


def our_latents(adapter, noise, sigmas):
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigmas, "euler").states[-1]


def test_prompt_embeddings_equal_the_pipelines(qwen_folder):
    adapter = load_adapter(qwen_folder, options=SIZE)
    assert isinstance(adapter, QwenImageAdapter) and adapter.latent_shape() == (4, 8, 8)
    rows = adapter.encode_prompts(PROMPTS)
    embeds, mask = adapter.text_condition(rows)
    theirs, their_mask = adapter.pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=256)
    assert their_mask is not None and not their_mask.all()  # the test covers padding
    assert torch.equal(mask, their_mask)
    assert (embeds - theirs).abs().max() <= 1e-6  # measured 0
    # encoded one at a time, then gathered together: the same padded batch
    single = load_adapter(qwen_folder, options=SIZE)
    for prompt in PROMPTS:
        single.encode_prompts([prompt])
    again, again_mask = single.text_condition(single.encode_prompts(PROMPTS))
    assert torch.equal(again_mask, their_mask) and (again - theirs).abs().max() <= 1e-5
    # only the transformer trains
    assert adapter.net is adapter.pipeline.transformer
    assert not any(p.requires_grad for p in adapter.pipeline.text_encoder.parameters())


def test_euler_rollout_equals_the_pipeline(qwen_folder):
    """From the same packed noise and prompts, our Euler solver on the pipeline's sigmas gives its latents (true CFG
    with the negative prompt) and, decoded, its images; without CFG too."""
    adapter = load_adapter(qwen_folder, options=SIZE)
    pipe = pipeline(qwen_folder)
    steps = 3
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    theirs = pipeline_latents(pipe, noise, steps)
    sigmas = pipe.scheduler.sigmas.float()
    # the pipeline's grid: exp(mu) shift, then stretched to shift_terminal (which our sigma_grid leaves out)
    assert sigmas[-2] == pytest.approx(0.02, abs=1e-6)
    ours = our_latents(adapter, noise, sigmas)
    gap = (ours - theirs).abs().max()
    assert gap <= 1e-5, gap  # measured 7.7e-7 on CPU fp32
    images = pipe(prompt=PROMPTS, negative_prompt=[" "] * 2, true_cfg_scale=4.0, height=32, width=32,
                  num_inference_steps=steps, max_sequence_length=256, output_type="pt",
                  latents=pipe._pack_latents(noise, 2, 4, 8, 8)).images
    assert (adapter.decode(ours).clamp(0, 1) - images).abs().max() <= 1e-5
    plain = load_adapter(qwen_folder, options={**SIZE, "cfg_scale": 1.0})
    no_cfg = pipeline_latents(pipe, noise, steps, cfg_scale=1.0)
    assert (our_latents(plain, noise, pipe.scheduler.sigmas.float()) - no_cfg).abs().max() <= 1e-5
    assert (no_cfg - theirs).abs().max() > 1e-3  # CFG matters


def test_gradient_checkpointing_and_fsdp_units(qwen_folder):
    from neighbor_grpo.models.architectures import repeated_blocks

    adapter = load_adapter(qwen_folder, options=SIZE)
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)

    def gradients():
        adapter.net.zero_grad(set_to_none=True)
        adapter.velocity(x, torch.tensor(0.5), rows).square().mean().backward()
        # the last block's text-stream outputs feed nothing, so their weights get no gradient
        return {n: p.grad.clone() for n, p in adapter.net.named_parameters() if p.grad is not None}

    plain = gradients()
    adapter.enable_gradient_checkpointing()
    assert adapter.net.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "transformer_blocks.0.attn.to_q.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    # FSDP shards each block of the transformer's ModuleLists: exactly the classes diffusers keeps whole
    units = {type(block).__name__ for block in repeated_blocks(adapter.net)}
    assert units == set(adapter.net._no_split_modules) == {"QwenImageTransformerBlock"}


def test_neighbor_grpo_lora_export_loads_in_the_pipeline(qwen_folder, tmp_path):
    config = tiny_run_config(qwen_folder, "optim.finetune=lora", "iterations=1", "model.height=32", "model.width=32",
                             "model.max_sequence_length=256", "model.cfg_scale=4.0", "model.negative_prompt=' '")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    assert set(adapter.net.peft_config["default"].target_modules) == {
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "lora"
    assert lora_load_warnings(qwen_folder, aligned) == []
    # the check can fail: a key for a block the transformer lacks is reported (the file's metadata kept)
    bad = tiny_diffusers.lora_with_a_foreign_block(aligned, tmp_path / "bad", LORA_FILE)
    assert any("unexpected keys" in m for m in lora_load_warnings(qwen_folder, bad))
    x = torch.randn(2, *adapter.latent_shape())
    reloaded = load_adapter(aligned)
    with torch.no_grad():
        trained = adapter.velocity(x, torch.tensor(0.6), adapter.encode_prompts(PROMPTS))
        again = reloaded.velocity(x, torch.tensor(0.6), reloaded.encode_prompts(PROMPTS))
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


def test_lora_round_trip_and_full_export(qwen_folder, tmp_path):
    """A LoRA export sampled by the pipeline (load_lora_weights) equals our rollout; a full-weights export loads with
    from_pretrained and holds the changed transformer."""
    adapter = randomized_lora(load_adapter(qwen_folder, options=SIZE))
    adapter.save(tmp_path / "lora")
    pipe = pipeline(qwen_folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    theirs = pipeline_latents(pipe, noise, 2)
    ours = our_latents(adapter, noise, pipe.scheduler.sigmas.float())
    assert (ours - theirs).abs().max() <= 1e-5
    full = load_adapter(qwen_folder, options={**SIZE, "export_pipeline": True})
    with torch.no_grad():
        next(full.net.parameters()).add_(0.1)  # stands in for optimizer steps of a full fine-tune
    full.save(tmp_path / "full")
    exported = pipeline(tmp_path / "full")
    for name, param in exported.transformer.named_parameters():
        assert torch.equal(param, dict(full.net.named_parameters())[name])
    assert json.loads((tmp_path / "full" / "model.json").read_text())["kind"] == "pipeline"


def tiny_qwen_run(folder, *overrides):
    return tiny_run_config(folder, "iterations=1", "model.height=32", "model.width=32", "model.max_sequence_length=256",
                           "model.cfg_scale=1.0", *overrides)


def trained(adapter) -> bool:
    """Whether an optimizer step changed the trained weights (a LoRA's B matrices start at zero)."""
    from neighbor_grpo.models.diffusers_common import _parameters_fingerprint
    from neighbor_grpo.models.lora import is_lora

    if is_lora(adapter.net):
        return any(p.abs().max() > 0 for n, p in adapter.net.named_parameters() if "lora_B" in n)
    return not torch.equal(_parameters_fingerprint(adapter._transformer()), adapter._pristine)


def test_neighbor_grpo_full_finetune_exports_a_transformer(qwen_folder, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    config = tiny_qwen_run(qwen_folder, "optim.finetune=full", "speed.gradient_checkpointing=true")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    assert trained(adapter) and adapter.net.is_gradient_checkpointing
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "transformer"
    exported = QwenImageTransformer2DModel.from_pretrained(aligned / "transformer")
    for name, param in exported.named_parameters():
        assert torch.equal(param, dict(adapter.net.named_parameters())[name])


BASELINES = {"flow_grpo": [], "dance_grpo": [], "mix_grpo": ["mix_grpo.window_size=1"], "diffusion_nft": [],
             "awm": ["awm.num_times=2"], "dgpo": ["dgpo.trunc_steps=1", "dgpo.num_times=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(BASELINES))
def test_every_baseline_trains_one_iteration(qwen_folder, tmp_path, algorithm):
    """Each baseline of the harness on Qwen-Image, one iteration (Flow-GRPO as a full fine-tune, the others LoRA)."""
    import csv

    finetune = "full" if algorithm == "flow_grpo" else "lora"
    config = tiny_qwen_run(qwen_folder, f"algorithm={algorithm}", f"{algorithm}.group_size=4",
                           f"{algorithm}.rollout_steps=3", f"{algorithm}.num_minibatches=1", f"optim.finetune={finetune}",
                           *BASELINES[algorithm])
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert trained(adapter)
