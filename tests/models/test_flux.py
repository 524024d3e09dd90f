"""FLUX.1 through diffusers, on a tiny random FluxPipeline saved to disk and loaded like a real checkpoint: training
(Neighbor GRPO with a LoRA, DanceGRPO with a full fine-tune), exports diffusers loads, step-for-step parity with
FluxPipeline, `ngrpo sample` with --lora, the example configs, and errors for bad folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.models.lora import apply_lora
from neighbor_grpo.models import FluxAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.training.trainer import train

import tiny_diffusers

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"height": 16, "width": 16, "max_sequence_length": 8}
PROMPTS = ["a red cat", "a blue dog"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return tiny_diffusers.build_flux(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="module")
def pipeline_class():
    from diffusers import FluxPipeline

    return FluxPipeline


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_run_config(folder, *overrides):
    return load_config(None, [f"model.path={folder}", "model.height=16", "model.width=16", "model.max_sequence_length=8",
                              "iterations=2", "prompts_per_iteration=2", "neighbor_grpo.group_size=4",
                              "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=3", "eval.samples_per_prompt=2",
                              "eval.steps=2", "eval.every=0", "optim.lr=1e-3", "optim.lora_rank=4",
                              "prompts.train=[a red cat, a blue dog, a green photo]", "prompts.eval=[a cat]",
                              *overrides])


REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


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
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigma_grid(steps, adapter.default_shift()),
                         "euler").states[-1]


def test_adapter_contract(flux_folder):
    adapter = load_adapter(flux_folder, options=SIZE)
    assert isinstance(adapter, FluxAdapter)
    assert adapter.latent_shape() == (1, 8, 8)  # unpacked (C, H, W); tiny VAE halves 16 px
    rows = adapter.encode_prompts(["a red cat", "a dog", "a red cat"])
    assert rows.dtype == torch.long and rows.tolist() == [0, 1, 0]
    assert adapter.encode_prompts(["a dog"]).tolist() == [1]  # cached, not re-encoded
    assert len(adapter.cache.tensors["prompt_embeds"]) == 2
    # what trains is the transformer only; text encoders and VAE are frozen
    assert adapter.net is adapter.pipeline.transformer
    assert all(p.requires_grad for p in adapter.net.parameters())
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert not any(p.requires_grad for p in getattr(adapter.pipeline, name).parameters())
    x = torch.randn(3, *adapter.latent_shape())
    v = adapter.velocity(x, torch.tensor(0.7), rows)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    # rows index conditioning like any tensor: repeat_interleave keeps the velocity of each prompt
    v_rep = adapter.velocity(x[[0, 0]], torch.tensor(0.7), rows[[0]].repeat_interleave(2))
    torch.testing.assert_close(v_rep, v[[0, 0]], atol=1e-5, rtol=1e-5)
    # the guidance value enters the velocity
    other = load_adapter(flux_folder, options={**SIZE, "guidance": 1.0})
    assert not torch.allclose(other.velocity(x, torch.tensor(0.7), other.encode_prompts(["a red cat", "a dog", "a red cat"])), v)
    images = adapter.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    # chunked decoding gives the same images as one batch
    adapter.options["decode_batch_size"] = 1
    torch.testing.assert_close(adapter.decode(x), images, atol=1e-6, rtol=0)
    assert adapter.default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out"]


def test_bfloat16_and_forward_chunks(flux_folder):
    reference = load_adapter(flux_folder, options=SIZE)
    half = load_adapter(flux_folder, options={**SIZE, "dtype": "bfloat16", "forward_batch_size": 2,
                                              "prompt_cache_on_cpu": True, "offload_text_encoders": True})
    half.cache_prompts(["a cat", "a dog", "a cat"])
    assert list(half.cache.rows) == ["a cat", "a dog"] and half.cache.device.type == "cpu"
    assert half.net.dtype == torch.bfloat16
    x = torch.randn(5, *reference.latent_shape())
    v32 = reference.velocity(x, torch.tensor(0.5), reference.encode_prompts(["a cat"] * 5))
    v16 = half.velocity(x, torch.tensor(0.5), half.encode_prompts(["a cat"] * 5))
    assert v16.dtype == torch.float32  # latents stay in the solvers' dtype
    assert (v16 - v32).abs().max() < 0.05 * v32.abs().max()


def test_vae_tiling_and_offload_decode_the_same_images(flux_folder):
    plain = load_adapter(flux_folder, options=SIZE)
    saving = load_adapter(flux_folder, options={**SIZE, "vae_tiling": True, "offload_vae": True})
    assert saving.pipeline.vae.use_tiling and not plain.pipeline.vae.use_tiling
    assert saving.pipeline.vae.device.type == "cpu"
    x = torch.randn(3, *plain.latent_shape())
    # tiles only start above the VAE's minimum tile size, so these small images decode identically
    torch.testing.assert_close(saving.decode(x), plain.decode(x), atol=1e-6, rtol=0)
    rows = saving.encode_prompts(["a cat", "a dog"])
    assert rows.device.type == "cpu" and rows.dtype == torch.long  # gathered with .tolist(): no device sync


def test_gradient_checkpointing_gives_the_same_gradients(flux_folder):
    adapter = load_adapter(flux_folder, options=SIZE)
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)

    def gradients():
        adapter.net.zero_grad(set_to_none=True)
        adapter.velocity(x, torch.tensor(0.5), rows).square().mean().backward()
        return [p.grad.clone() for p in adapter.net.parameters()]

    plain = gradients()
    adapter.enable_gradient_checkpointing()  # what speed.gradient_checkpointing calls
    assert adapter.net.is_gradient_checkpointing
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_pipeline_parity_with_exported_lora(flux_folder, pipeline_class, tmp_path):
    """diffusers' FluxPipeline with our exported LoRA (load_lora_weights) and our Euler solver on the same grid
    give the same latents and images from the same initial noise."""
    adapter = randomized_lora(load_adapter(flux_folder, options=SIZE))
    adapter.save(tmp_path / "lora")
    meta = json.loads((tmp_path / "lora" / "model.json").read_text())
    assert meta["adapter"] == "flux" and meta["kind"] == "lora" and meta["base"] == str(flux_folder.resolve())
    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("transformer.") for k in keys)

    steps, B = 3, 2
    noise = torch.randn(B, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    C, H, W = adapter.latent_shape()
    pipe = quiet(pipeline_class.from_pretrained(flux_folder))
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)  # diffusers < 0.40 will not guess it offline
    run = dict(prompt=PROMPTS, height=16, width=16, num_inference_steps=steps, max_sequence_length=8,
               guidance_scale=3.5, latents=pipe._pack_latents(noise, B, C, H, W))
    packed = pipe(**run, output_type="latent").images
    # the pipeline's grid (dynamic shift exp(mu)) is our sigma_grid with default_shift()
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(steps, adapter.default_shift()), atol=1e-6, rtol=0)
    theirs = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)
    ours = our_latents(adapter, noise, PROMPTS, steps)
    assert (ours - theirs).abs().max() < 1e-5  # measured 0 (same ops) on CPU fp32
    images = pipe(**run, output_type="pt").images
    assert (adapter.decode(ours).clamp(0, 1) - images).abs().max() < 1e-5
    # our export reloads (base + LoRA merged) to the same samples, and the LoRA matters
    reloaded = load_adapter(tmp_path / "lora")
    assert (our_latents(reloaded, noise, PROMPTS, steps) - theirs).abs().max() < 1e-5  # measured 2.4e-7
    pipe.unload_lora_weights()
    base = pipe._unpack_latents(pipe(**run, output_type="latent").images, 16, 16, pipe.vae_scale_factor)
    assert (base - theirs).abs().max() > 1e-2
    # the merged export is a complete pipeline folder that samples the same
    adapter.options["export_pipeline"] = True
    adapter.save(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "model.json").read_text())["kind"] == "pipeline"
    merged = quiet(pipeline_class.from_pretrained(tmp_path / "merged"))
    merged_latents = pipe._unpack_latents(merged(**run, output_type="latent").images, 16, 16, pipe.vae_scale_factor)
    assert (merged_latents - theirs).abs().max() < 1e-5


def test_neighbor_grpo_lora_run_exports_a_diffusers_lora(flux_folder, pipeline_class, tmp_path):
    config = tiny_run_config(flux_folder, "optim.finetune=lora")  # lora_targets left at the built-in model's default
    adapter = load_adapter(config.model.path, options=config.model)  # what load_model does with model.path
    attention = set(adapter.default_lora_targets())
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    # ... so the adapter's own attention projections got the LoRA
    assert set(adapter.net.peft_config["default"].target_modules) == attention and "to_q" in attention
    run = result.run_dir
    import csv

    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert abs(float(rows[1]["ratio_mean"]) - 1) < 1e-3  # rho = 1 before the first update (float tolerance)
    # only LoRA weights were trained: the exported file holds them, in diffusers' format
    assert (run / "aligned" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((run / "base" / "model.json").read_text())["kind"] == "reference"
    card = (run / "aligned" / "README.md").read_text()
    assert "Held-out results" in card and "## Config" in card and "neighbor_grpo" in card
    pipe = quiet(pipeline_class.from_pretrained(flux_folder))
    pipe.load_lora_weights(run / "aligned", weight_name=LORA_FILE)
    # the reloaded model (base + merged LoRA) has the trained adapter's velocities
    reloaded = load_adapter(run / "aligned")
    x = torch.randn(2, *reloaded.latent_shape())
    with torch.no_grad():
        trained = adapter.velocity(x, torch.tensor(0.6), adapter.encode_prompts(PROMPTS))
        again = reloaded.velocity(x, torch.tensor(0.6), reloaded.encode_prompts(PROMPTS))
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


def test_dance_grpo_full_finetune_exports_a_pipeline_folder(flux_folder, pipeline_class, tmp_path):
    config = tiny_run_config(flux_folder, "algorithm=dance_grpo", "iterations=1", "dance_grpo.group_size=4",
                             "dance_grpo.rollout_steps=3", "dance_grpo.num_minibatches=1", "optim.finetune=full",
                             "model.export_pipeline=true")
    result = train(config, tmp_path / "run", progress=False, rewards=REWARDS)
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "pipeline"
    assert json.loads((result.run_dir / "base" / "model.json").read_text())["kind"] == "reference"  # no copy
    pipe = pipeline_class.from_pretrained(aligned)
    base = pipeline_class.from_pretrained(flux_folder)
    changed = [n for n, p in pipe.transformer.named_parameters()
               if not torch.equal(p, dict(base.transformer.named_parameters())[n])]
    assert changed  # the fine-tuned transformer, not the base one
    reloaded = load_adapter(aligned)
    for name, param in reloaded.net.named_parameters():
        assert torch.equal(param, dict(pipe.transformer.named_parameters())[name])


def test_exports_stack_on_earlier_loras(flux_folder, tmp_path):
    """Training from an export (base + LoRA) and exporting again records both LoRAs; a full fine-tune of a merged
    model records none (they are inside its weights). Each reload gives the saved model's velocities."""
    first = randomized_lora(load_adapter(flux_folder, options=SIZE), seed=1)
    first.save(tmp_path / "first", extra={"iteration": 7, "heldout": {"reward": 0.25}})
    card = (tmp_path / "first" / "README.md").read_text()
    assert str(flux_folder.resolve()) in card and "load_lora_weights" in card and "0.2500" in card
    second = randomized_lora(load_adapter(tmp_path / "first"), seed=2)  # base with the first LoRA merged
    second.save(tmp_path / "second")
    loras = json.loads((tmp_path / "second" / "model.json").read_text())["loras"]
    assert len(loras) == 2 and loras[-1] == "pytorch_lora_weights.safetensors"
    x = torch.randn(2, *second.latent_shape())

    def velocity(adapter):
        with torch.no_grad():
            return adapter.velocity(x, torch.tensor(0.5), adapter.encode_prompts(PROMPTS))

    torch.testing.assert_close(velocity(load_adapter(tmp_path / "second")), velocity(second), atol=1e-5, rtol=1e-5)
    full = load_adapter(tmp_path / "first")
    with torch.no_grad():
        next(full.net.parameters()).add_(0.1)  # stands in for optimizer steps of a full fine-tune
    full.save(tmp_path / "full")
    meta = json.loads((tmp_path / "full" / "model.json").read_text())
    assert meta["kind"] == "transformer" and meta["loras"] == []
    torch.testing.assert_close(velocity(load_adapter(tmp_path / "full")), velocity(full), atol=1e-6, rtol=0)
    # an unchanged model loaded from that export refers to it (as a run's base/ does), and a LoRA stacks on it
    load_adapter(tmp_path / "full").save(tmp_path / "reference")
    torch.testing.assert_close(velocity(load_adapter(tmp_path / "reference")), velocity(full), atol=1e-6, rtol=0)
    on_full = randomized_lora(load_adapter(tmp_path / "full"), seed=4)
    on_full.save(tmp_path / "on_full")
    torch.testing.assert_close(velocity(load_adapter(tmp_path / "on_full")), velocity(on_full), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="being trained with a LoRA"):
        second.load_lora(tmp_path / "first")


def test_sample_cli_with_base_folder_and_lora(flux_folder, tmp_path):
    from neighbor_grpo.cli import main
    from neighbor_grpo.training.monitors import generate

    adapter = randomized_lora(load_adapter(flux_folder, options=SIZE), seed=3)
    adapter.save(tmp_path / "lora")
    out = tmp_path / "samples.npz"
    code = main(["sample", "--checkpoint", str(flux_folder), "--lora", str(tmp_path / "lora"), "--resolution", "16",
                 "--max-sequence-length", "8", "--guidance", "3.5", "--prompt", "a red cat", "--num", "2", "--steps", "2",
                 "--out", str(out)])
    assert code == 0
    images = np.load(out)["images"]
    assert images.shape == (2, 3, 16, 16)
    expected_model = load_adapter(tmp_path / "lora")
    _, expected = generate(expected_model, ["a red cat"], 2, 0, "dpm++2m", 2, expected_model.default_shift())
    np.testing.assert_allclose(images, expected[0].clamp(0, 1).numpy(), atol=1e-5)
    assert main(["sample", "--checkpoint", str(flux_folder), "--lora", str(tmp_path / "nowhere"), "--resolution", "16",
                 "--prompt", "a", "--out", str(out)]) == 2


def test_bad_folders(flux_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder") as info:
        load_adapter(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json") as info:
        load_adapter(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline") as info:
        load_adapter(other)
    assert str(other / "model_index.json") in str(info.value) and "FluxPipeline" in str(info.value)
    (other / "model_index.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(other)
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.json").write_text(json.dumps({"adapter": "flux", "base": str(tmp_path / "gone"), "loras": []}))
    with pytest.raises(FileNotFoundError, match="model_index.json") as info:
        load_adapter(export)
    assert str(tmp_path / "gone") in str(info.value)
    with pytest.raises(ValueError, match="model.height"):
        load_adapter(flux_folder, options={"height": 17})
    with pytest.raises(ValueError, match="optim.lora_targets"):
        apply_lora(load_adapter(flux_folder, options=SIZE).net, 4, 4.0, ["fc1"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "ngrpo train" in path.read_text().split("\n\n")[0]
    config = load_config(path)
    assert config.model.path != "builtin:digits"
    assert config.optim.finetune == "lora" and config.optim.lora_targets != ["fc1", "fc2"]


def test_eval_cli_scores_a_lora_export_with_the_run_config(flux_folder, tmp_path):
    """`ngrpo eval --config`: the run's model options, held-out prompts and seeds; --lora on a base folder gives
    the same scores as the export folder itself."""
    import yaml

    from neighbor_grpo.cli import main

    adapter = randomized_lora(load_adapter(flux_folder, options=SIZE), seed=5)
    adapter.save(tmp_path / "lora")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(flux_folder), "height": 16, "width": 16, "max_sequence_length": 8, "guidance": 2.0},
        "prompts": {"eval": ["a red cat", "a blue dog"]}, "eval": {"samples_per_prompt": 2, "steps": 2, "seed": 11},
        "rewards": [{"name": "tiny_diffusers:make_cheap_reward", "weight": 2.0}]}))
    outputs = {}
    for name, extra in (("export", ["--checkpoint", str(tmp_path / "lora")]),
                        ("base_plus_lora", ["--checkpoint", str(flux_folder), "--lora", str(tmp_path / "lora")])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", *extra, "--config", str(config), "--out", str(out)]) == 0
        outputs[name] = json.loads(out.read_text())
    result = outputs["export"]
    assert result["prompts"] == ["a red cat", "a blue dog"] and result["seed"] == 11 and result["steps"] == 2
    assert result["shift"] == pytest.approx(adapter.default_shift())
    metrics = result["metrics"]
    assert metrics["reward"] == pytest.approx(2.0 * metrics["reward_tiny_diffusers:make_cheap_reward"], rel=1e-6)
    assert metrics["reward"] == pytest.approx(outputs["base_plus_lora"]["metrics"]["reward"], abs=1e-6)
    from PIL import Image

    with Image.open(tmp_path / "export.png") as grid:
        assert grid.mode == "RGB"
