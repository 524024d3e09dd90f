"""SD3/SD3.5 through diffusers, on a tiny random StableDiffusion3Pipeline saved to disk and loaded like a real
checkpoint: classifier-free guidance (scale, negative prompt, cost), step-for-step parity with the pipeline and an
exported LoRA, Neighbor GRPO with a LoRA, Flow-GRPO with a full fine-tune and its transformer/ export."""

import csv
import json

import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.models.lora import apply_lora
from neighbor_grpo.models import SD3Adapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.training.trainer import train

import tiny_diffusers

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = {"height": 16, "width": 16, "max_sequence_length": 8, "cfg_scale": 3.0, "negative_prompt": "blue"}
PROMPTS = ["a red cat", "a dog"]
REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return tiny_diffusers.build_sd3(tmp_path_factory.mktemp("tiny") / "sd3")


def tiny_run_config(folder, *overrides):
    return load_config(None, [f"model.path={folder}", "model.height=16", "model.width=16", "model.max_sequence_length=8",
                              "model.cfg_scale=3.0", "model.negative_prompt=blue", "iterations=2",
                              "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                              "neighbor_grpo.rollout_steps=2", "eval.samples_per_prompt=2", "eval.steps=2", "eval.every=0",
                              "optim.lr=1e-3", "optim.lora_rank=4", "prompts.train=[a red cat, a blue dog, a green photo]",
                              "prompts.eval=[a cat]", *overrides])


def test_cfg_is_the_guided_combination(sd3_folder):
    guided = load_adapter(sd3_folder, options=CFG)
    assert isinstance(guided, SD3Adapter) and guided.latent_shape() == (4, 8, 8)
    assert guided.default_shift() == 3.0  # the scheduler config's shift
    plain = load_adapter(sd3_folder, options={**CFG, "cfg_scale": 1.0})  # <= 1 disables CFG, as in diffusers
    x, s = torch.randn(2, *guided.latent_shape()), torch.tensor(0.4)
    with torch.no_grad():
        v = guided.velocity(x, s, guided.encode_prompts(PROMPTS))
        conditional = plain.velocity(x, s, plain.encode_prompts(PROMPTS))
        unconditional = plain.velocity(x, s, plain.encode_prompts(["blue", "blue"]))
    torch.testing.assert_close(v, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    # CFG doubles the transformer's batch: what the trainer's call counter sees
    seen = []
    handle = guided.net.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        guided.velocity(x, s, guided.encode_prompts(PROMPTS))
    handle.remove()
    assert seen == [4]


def test_pipeline_parity_with_cfg_and_exported_lora(sd3_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    adapter = load_adapter(sd3_folder, options=CFG)
    adapter.net = apply_lora(adapter.net, 4, 8.0, adapter.default_lora_targets())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in adapter.net.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    adapter.save(tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)  # diffusers < 0.40 will not guess it offline
    steps = 3
    grid = sigma_grid(steps, adapter.default_shift())
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    # the unshifted linear grid (diffusers shifts it with the scheduler's shift and appends 0)
    run = dict(prompt=PROMPTS, negative_prompt="blue", guidance_scale=3.0, height=16, width=16, num_inference_steps=steps,
               sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist(), max_sequence_length=8, latents=noise)
    theirs = pipe(**run, output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas, grid, atol=1e-6, rtol=0)
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        ours = integrate(lambda x, s: adapter.velocity(x, s, cond), noise, grid, "euler").states[-1]
    assert (ours - theirs).abs().max() < 1e-5  # measured 1.2e-6 on CPU fp32
    images = pipe(**run, output_type="pt").images
    assert (adapter.decode(ours).clamp(0, 1) - images).abs().max() < 1e-5  # measured 6.6e-7
    reloaded = load_adapter(tmp_path / "lora")  # base + LoRA merged, CFG settings from model.json
    assert reloaded.options["cfg_scale"] == 3.0 and reloaded.options["negative_prompt"] == "blue"
    cond = reloaded.encode_prompts(PROMPTS)
    with torch.no_grad():
        again = integrate(lambda x, s: reloaded.velocity(x, s, cond), noise, grid, "euler").states[-1]
    assert (again - theirs).abs().max() < 1e-5


def test_neighbor_grpo_lora_run_with_cfg(sd3_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    config = tiny_run_config(sd3_folder, "optim.finetune=lora",
                             "optim.lora_targets=[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj]")
    result = train(config, tmp_path / "run", progress=False, rewards=REWARDS)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    trained = [r for r in rows if r.get("loss")]
    assert len(trained) == 2 and all(float(r["loss"]) == float(r["loss"]) for r in trained)
    # rollouts: P * G * N samples, each a CFG pair -> at least twice P * G * N transformer rows
    assert float(trained[0]["model_evals_rollout"]) >= 2 * (2 * 4 * 2)
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "lora"
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe.load_lora_weights(aligned, weight_name=LORA_FILE)
    assert load_adapter(aligned).options["negative_prompt"] == "blue"


def test_flow_grpo_full_finetune_exports_the_transformer(sd3_folder, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    config = tiny_run_config(sd3_folder, "algorithm=flow_grpo", "iterations=1", "flow_grpo.group_size=4",
                             "flow_grpo.rollout_steps=2", "flow_grpo.num_minibatches=1", "optim.finetune=full")
    adapter = load_adapter(sd3_folder, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    aligned = result.run_dir / "aligned"
    meta = json.loads((aligned / "model.json").read_text())
    assert meta["kind"] == "transformer" and (aligned / "transformer" / "config.json").is_file()
    transformer = SD3Transformer2DModel.from_pretrained(aligned / "transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, transformer=transformer)
    trained = dict(adapter.net.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in pipe.transformer.named_parameters())
    base = StableDiffusion3Pipeline.from_pretrained(sd3_folder).transformer
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters())
    reloaded = load_adapter(aligned)
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.net.named_parameters())
