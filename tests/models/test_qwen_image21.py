"""Qwen-Image 2.1 (text-to-image) through diffusers, on a tiny random QwenImage21Pipeline saved to disk and loaded
like a real checkpoint (the Qwen3-VL processor built without torchvision): prompt embeddings equal to the
pipeline's encode_prompt, our Euler rollout on the pipeline's `sample_sigmas` grid equal to the pipeline's latents
(its KV cache on; with and without true CFG), Neighbor GRPO with a LoRA whose export the pipeline loads with
load_lora_weights without key warnings and samples like our model."""

import json

import pytest
import torch

from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.models.qwen_image21 import QwenImage21Adapter, load_processor
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_qwen21
from test_flux import randomized_lora, tiny_run_config

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"height": 64, "width": 64, "cfg_scale": 1.0}
PROMPTS = ["a red cat", "a blue dog on the green"]  # different lengths: the pipeline pads the shorter one
REWARDS = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_qwen21.build_qwen_image21(tmp_path_factory.mktemp("tiny") / "qwen21")


def pipeline(folder):
    from diffusers import QwenImage21Pipeline

    pipe = QwenImage21Pipeline.from_pretrained(folder, processor=load_processor(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, noise, cfg_scale=1.0):
    """The pipeline's latents from `noise`, one prompt per call (in a batch it pads the shorter prompt, which moves
    the image's RoPE frame position; see the adapter's docstring), on its default grid (`sample_sigmas`)."""
    B, C, H, W = noise.shape
    out = []
    for prompt, latents in zip(PROMPTS, noise):
        packed = pipe(prompt=prompt, negative_prompt=" " if cfg_scale > 1 else None, true_cfg_scale=cfg_scale,
                      height=H * 16, width=W * 16, output_type="latent",
                      latents=pipe._pack_latents(latents[None], 1, C, H, W)).images
        out.append(pipe._unpack_latents(packed, H * 16, W * 16, pipe.vae_scale_factor)[:, :, 0])
    return torch.cat(out)


def our_latents(adapter, noise, sigmas):
    cond = adapter.encode_prompts(PROMPTS)  # both prompts in one batch: lengths differ, so two transformer calls
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, sigmas, "euler").states[-1]


def test_prompt_embeddings_equal_the_pipelines(folder):
    adapter = load_adapter(folder, options=SIZE)
    assert isinstance(adapter, QwenImage21Adapter) and adapter.latent_shape() == (4, 4, 4)
    rows = adapter.encode_prompts(PROMPTS)
    theirs, their_mask, image_slots = adapter.pipeline.encode_prompt(PROMPTS, device="cpu")
    assert their_mask is not None and not their_mask.all() and not image_slots.any()  # padded; no image slots
    for row, embeds, mask in zip(rows.tolist(), theirs, their_mask):
        length = int(adapter.cache.tensors["prompt_lengths"][row])
        assert length == int(mask.sum())
        gap = (adapter.cache.tensors["prompt_embeds"][row][:length] - embeds[:length]).abs().max()
        print(f"qwen_image21: prompt embedding gap {gap:.2e}")
        assert gap <= 1e-6, gap  # measured 0
    assert adapter.net is adapter.pipeline.transformer
    assert not any(p.requires_grad for p in adapter.pipeline.text_encoder.parameters())


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_euler_rollout_equals_the_pipeline(folder, cfg_scale):
    """From the same noise, our Euler solver on the pipeline's sigmas gives its latents (and, decoded, its images)."""
    adapter = load_adapter(folder, options={**SIZE, "cfg_scale": cfg_scale, "negative_prompt": " "})
    pipe = pipeline(folder)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    theirs = pipeline_latents(pipe, noise, cfg_scale)
    sigmas = pipe.scheduler.sigmas.float()
    assert len(sigmas) == len(tiny_qwen21.SAMPLE_SIGMAS) + 1  # the config's grid and the terminal 0
    torch.testing.assert_close(adapter.pipeline_sigmas(), sigmas, atol=0, rtol=0)
    ours = our_latents(adapter, noise, sigmas)
    gap = (ours - theirs).abs().max()
    print(f"qwen_image21: CFG {cfg_scale} rollout gap {gap:.2e}")
    assert gap <= 1e-5, gap
    assert (theirs - noise).abs().max() > 1e-2  # the rollout moved
    if cfg_scale > 1:
        assert (pipeline_latents(pipe, noise) - theirs).abs().max() > 1e-3  # CFG matters
    images = pipe(prompt=PROMPTS[0], height=64, width=64, output_type="pt", negative_prompt=" ",
                  true_cfg_scale=cfg_scale, latents=pipe._pack_latents(noise[:1], 1, 4, 4, 4)).images
    assert (adapter.decode(ours[:1]).clamp(0, 1) - images).abs().max() <= 1e-5


def test_a_rows_velocity_does_not_depend_on_its_batch(folder):
    adapter = load_adapter(folder, options=SIZE)
    x = torch.randn(3, *adapter.latent_shape(), generator=torch.Generator().manual_seed(4))
    rows = adapter.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    with torch.no_grad():
        together = adapter.velocity(x, torch.tensor([0.9, 0.5, 0.3]), rows)
        alone = torch.cat([adapter.velocity(x[i:i + 1], torch.tensor(s), rows[i:i + 1])
                           for i, s in enumerate([0.9, 0.5, 0.3])])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    assert (together[0] - together[2]).abs().max() > 1e-3  # the timestep reaches each row
    # why `velocity` never pads: padded and masked as the pipeline batches it, the shorter prompt's velocity moves
    cache = adapter.cache.tensors
    lengths = [int(cache["prompt_lengths"][r]) for r in rows[:2].tolist()]
    embeds = torch.stack([cache["prompt_embeds"][r] for r in rows[:2].tolist()])  # encoded together: padded
    assert lengths[0] < lengths[1] == embeds.shape[1]
    mask = torch.arange(embeds.shape[1])[None] < torch.tensor(lengths)[:, None]
    slots = torch.cat([torch.zeros(2, embeds.shape[1], dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        padded = adapter.net(x[:2].flatten(2).transpose(1, 2), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, timestep=torch.tensor([0.9, 0.5]),
                             img_shapes=[[(1, 4, 4)]] * 2, img_mask=slots, return_dict=False)[0][:, -16:]
    padded = padded.transpose(1, 2).reshape(2, *adapter.latent_shape())
    torch.testing.assert_close(padded[1], alone[1], atol=1e-6, rtol=1e-5)  # the longest prompt: no padding
    print(f"qwen_image21: the shorter prompt's velocity, padded vs alone: {(padded[0] - alone[0]).abs().max():.2e}")
    assert (padded[0] - alone[0]).abs().max() > 1e-4


def lora_load_warnings(base, lora_folder) -> list[str]:
    return tiny_diffusers.lora_key_warnings(pipeline(base), lora_folder, LORA_FILE)


def test_neighbor_grpo_lora_export_loads_in_the_pipeline(folder, tmp_path):
    config = tiny_run_config(folder, "optim.finetune=lora", "iterations=1", "model.height=64", "model.width=64",
                             "model.max_sequence_length=null", "model.cfg_scale=1.0")
    adapter = load_adapter(config.model.path, options=config.model)
    train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=REWARDS)
    assert set(adapter.net.peft_config["default"].target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert any(p.abs().max() > 0 for n, p in adapter.net.named_parameters() if "lora_B" in n)  # it trained
    aligned = tmp_path / "run" / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "lora"
    assert lora_load_warnings(folder, aligned) == []
    # the check can fail: a key for a block the transformer lacks is reported
    bad = tiny_diffusers.lora_with_a_foreign_block(aligned, tmp_path / "bad", LORA_FILE)
    assert any("unexpected keys" in m for m in lora_load_warnings(folder, bad))


def test_lora_round_trip(folder, tmp_path):
    """A LoRA export sampled by the pipeline (load_lora_weights) equals our rollout; load_adapter reloads it."""
    adapter = randomized_lora(load_adapter(folder, options=SIZE))
    adapter.save(tmp_path / "lora")
    pipe = pipeline(folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(2))
    ours = our_latents(adapter, noise, adapter.pipeline_sigmas())
    gap = (ours - pipeline_latents(pipe, noise)).abs().max()
    print(f"qwen_image21: LoRA round-trip rollout gap {gap:.2e}")
    assert gap <= 1e-5, gap
    assert (ours - our_latents(load_adapter(folder, options=SIZE), noise, adapter.pipeline_sigmas())).abs().max() > 1e-3
    reloaded = load_adapter(tmp_path / "lora")
    assert (our_latents(reloaded, noise, adapter.pipeline_sigmas()) - ours).abs().max() <= 1e-5


def test_gradient_checkpointing_and_full_export(folder, tmp_path):
    """Checkpointed blocks give the same gradients; a changed transformer exports as a pipeline folder that
    QwenImage21Pipeline.from_pretrained loads with those weights (sample_sigmas kept)."""
    adapter = load_adapter(folder, options={**SIZE, "export_pipeline": True})
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)

    def gradients():
        adapter.net.zero_grad(set_to_none=True)
        adapter.velocity(x, torch.tensor(0.5), rows).square().mean().backward()
        return {n: p.grad.clone() for n, p in adapter.net.named_parameters() if p.grad is not None}

    plain = gradients()
    adapter.enable_gradient_checkpointing()
    assert adapter.net.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "transformer_blocks.0.attn.to_q.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        next(adapter.net.parameters()).add_(0.1)  # stands in for optimizer steps of a full fine-tune
    adapter.save(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "model.json").read_text())["kind"] == "pipeline"
    exported = pipeline(tmp_path / "full")
    assert exported.config.sample_sigmas == tiny_qwen21.SAMPLE_SIGMAS
    for name, param in exported.transformer.named_parameters():
        assert torch.equal(param, dict(adapter.net.named_parameters())[name])
