"""FLUX.1-schnell, the few-step (timestep-distilled) FLUX.1: no guidance embedding, no dynamic shift, 1-4 steps.
Step-for-step parity with FluxPipeline on a tiny random schnell-layout pipeline, at 1, 2 and 4 steps."""

from pathlib import Path

import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.models import FluxAdapter, load_adapter

import tiny_diffusers
from test_flux import SIZE, our_latents, quiet, randomized_lora

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat", "a blue dog"]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "flux_schnell_few_step.yaml"


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    """FLUX.1-schnell's layout: guidance_embeds off, a static shift of 1 (its scheduler has no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0),
                        vae=tiny_diffusers.tiny_vae(1), text_encoder=CLIPTextModel(tiny_diffusers.clip_config()),
                        tokenizer=tiny_diffusers.clip_tokenizer(), text_encoder_2=tiny_diffusers.t5_encoder(),
                        tokenizer_2=tiny_diffusers.t5_tokenizer(), transformer=transformer)
    folder = tmp_path_factory.mktemp("tiny") / "schnell"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_schnell_parity_at_few_steps(schnell_folder, steps, tmp_path):
    from diffusers import FluxPipeline

    adapter = randomized_lora(load_adapter(schnell_folder, options=SIZE))
    assert isinstance(adapter, FluxAdapter) and adapter.default_shift() == 1.0
    adapter.save(tmp_path / "lora")
    pipe = quiet(FluxPipeline.from_pretrained(schnell_folder))
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(steps))
    C, H, W = adapter.latent_shape()
    packed = pipe(prompt=PROMPTS, height=16, width=16, num_inference_steps=steps, max_sequence_length=8,
                  guidance_scale=0.0, latents=pipe._pack_latents(noise, 2, C, H, W), output_type="latent").images
    torch.testing.assert_close(pipe.scheduler.sigmas, sigma_grid(steps, 1.0), atol=1e-6, rtol=0)
    theirs = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)
    ours = our_latents(adapter, noise, PROMPTS, steps)
    print(f"FLUX.1-schnell parity at {steps} step(s): {float((ours - theirs).abs().max()):.3g}")
    assert (ours - theirs).abs().max() < 1e-5  # measured 0 at 1, 2 and 4 steps on CPU fp32


def test_schnell_ignores_the_guidance_option(schnell_folder):
    """No guidance embedding: model.guidance (FLUX.1-dev's) must not change the velocity."""
    x = torch.randn(2, 1, 8, 8)
    velocities = []
    for guidance in (0.0, 3.5):
        adapter = load_adapter(schnell_folder, options={**SIZE, "guidance": guidance})
        with torch.no_grad():
            velocities.append(adapter.velocity(x, torch.tensor(0.5), adapter.encode_prompts(PROMPTS)))
    assert torch.equal(velocities[0], velocities[1])


def test_few_step_example_config():
    config = load_config(CONFIG)
    assert config.neighbor_grpo.rollout_steps <= 4 and config.neighbor_grpo.policy_space == "x0"
    assert config.neighbor_grpo.shift == 1.0 and config.eval.steps <= 4
