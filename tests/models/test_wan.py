"""Wan 2.1 / 2.2 text-to-video through diffusers, on tiny random WanPipelines saved to disk and loaded like real
checkpoints: video latents (batch, C, T, H, W) through the solvers and algorithms, step-for-step parity with
WanPipeline (with CFG, exported LoRAs and Wan 2.2's two experts), LoRA and full fine-tune training, exports the
pipeline loads, and bad options."""

import csv
import json

import numpy as np
import pytest
import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.models import WanAdapter, load_adapter
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.models.wan import SECOND_EXPERT_LORA, WanExperts
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_wan
from test_flux import quiet, randomized_lora

pytestmark = pytest.mark.usefixtures("single_thread")

FRAMES = 9  # 3 latent frames: the VAE compresses time 4x (frames 4k + 1)
SIZE = {"height": 16, "width": 16, "num_frames": FRAMES, "max_sequence_length": 8}
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return tiny_wan.build_wan(tmp_path_factory.mktemp("tiny") / "wan21")


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return tiny_wan.build_wan(tmp_path_factory.mktemp("tiny") / "wan22", seed=1, experts=2)


def pipeline(folder):
    from diffusers import WanPipeline

    return quiet(WanPipeline.from_pretrained(folder))


def pipeline_grid(folder, steps):
    """WanPipeline's own sigma grid (linspace to 1/1000, shifted, then 0): our solver integrates on it for parity."""
    scheduler = pipeline(folder).scheduler
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.clone()


def our_latents(adapter, noise, prompts, grid):
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, grid, "euler").states[-1]


def theirs(pipe, noise, steps, cfg, output_type="latent"):
    return pipe(prompt=PROMPTS, height=16, width=16, num_frames=FRAMES, num_inference_steps=steps,
                guidance_scale=cfg, max_sequence_length=8, latents=noise.clone(), output_type=output_type).frames


def test_adapter_contract_with_video_latents(wan21):
    adapter = load_adapter(wan21, options={**SIZE, "cfg_scale": 1.0})
    assert isinstance(adapter, WanAdapter) and adapter.experts == ["transformer"]
    assert adapter.latent_shape() == (16, 3, 2, 2)  # (C, T, H, W): 9 frames -> 3, 16 px -> 2 (8x VAE)
    assert adapter.net is adapter.pipeline.transformer
    assert not any(p.requires_grad for p in adapter.pipeline.text_encoder.parameters())
    assert not any(p.requires_grad for p in adapter.pipeline.vae.parameters())
    rows = adapter.encode_prompts(["a red cat", "a dog", "a red cat"])
    assert rows.tolist() == [0, 1, 0]
    # UMT5 embeddings exactly as the pipeline encodes them (padding rows zeroed up to max_sequence_length)
    expected, _ = adapter.pipeline.encode_prompt(["a red cat"], do_classifier_free_guidance=False,
                                                 max_sequence_length=8)
    torch.testing.assert_close(adapter.cache.gather("prompt_embeds", rows[:1], adapter.device, torch.float32), expected)
    x = torch.randn(3, *adapter.latent_shape())
    v = adapter.velocity(x, torch.tensor(0.7), rows)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    videos = adapter.decode(x)
    assert videos.shape == (3, FRAMES, 3, 16, 16) and videos.dtype == torch.float32  # (batch, T, C, H, W)
    adapter.options["decode_batch_size"] = 1
    torch.testing.assert_close(adapter.decode(x), videos, atol=1e-6, rtol=0)
    assert adapter.default_lora_targets() == ["to_q", "to_k", "to_v", "to_out.0"]
    # VAE tiling and offloading decode these small videos identically (tiles start above the minimum tile size)
    saving = load_adapter(wan21, options={**SIZE, "vae_tiling": True, "offload_vae": True})
    assert saving.pipeline.vae.use_tiling
    torch.testing.assert_close(saving.decode(x), videos, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_pipeline_parity_with_cfg_and_exported_lora(version, wan21, wan22, tmp_path):
    """WanPipeline (CFG 5, our exported LoRA loaded into each expert) and our Euler solver on the pipeline's grid give
    the same latents and videos from the same noise; our export reloads to the same samples."""
    folder = wan21 if version == "2.1" else wan22
    options = {**SIZE, "cfg_scale": 5.0}
    adapter = randomized_lora(load_adapter(folder, options=options))
    adapter.save(tmp_path / "lora")
    files = sorted(p.name for p in (tmp_path / "lora").glob("*.safetensors"))
    assert files == ([LORA_FILE] if version == "2.1" else [LORA_FILE, SECOND_EXPERT_LORA])
    steps = 4
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(1))
    grid = pipeline_grid(folder, steps)
    pipe = pipeline(folder)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE, adapter_name="high")
    if version == "2.2":
        pipe.load_lora_weights(tmp_path / "lora", weight_name=SECOND_EXPERT_LORA, adapter_name="low",
                               load_into_transformer_2=True)
    reference = theirs(pipe, noise, steps, 5.0)
    ours = our_latents(adapter, noise, PROMPTS, grid)
    print(f"Wan {version} latent parity (CFG 5, LoRA): {float((ours - reference).abs().max()):.3g}")
    # measured 1.9e-6 (2.1) and 2.4e-6 (2.2) on CPU fp32: CFG's two halves run as one batch here, as two calls
    # in the pipeline (0 without CFG)
    assert (ours - reference).abs().max() < 1e-5
    video = theirs(pipe, noise, steps, 5.0, output_type="pt")
    assert video.shape == (2, FRAMES, 3, 16, 16)
    print(f"Wan {version} video parity: {float((adapter.decode(ours).clamp(0, 1) - video).abs().max()):.3g}")
    assert (adapter.decode(ours).clamp(0, 1) - video).abs().max() < 1e-5
    reloaded = load_adapter(tmp_path / "lora")
    print(f"Wan {version} reload parity: {float((our_latents(reloaded, noise, PROMPTS, grid) - reference).abs().max()):.3g}")
    assert (our_latents(reloaded, noise, PROMPTS, grid) - reference).abs().max() < 1e-5
    # the LoRAs matter, each expert's own: without the low-noise expert's LoRA the samples differ
    if version == "2.2":
        pipe.set_adapters(["high"])
        assert (theirs(pipe, noise, steps, 5.0) - reference).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert (theirs(pipe, noise, steps, 5.0) - reference).abs().max() > 1e-3


def test_wan22_routes_each_timestep_to_its_expert(wan22):
    adapter = load_adapter(wan22, options={**SIZE, "cfg_scale": 1.0})
    experts = adapter.net
    assert isinstance(experts, WanExperts) and experts.boundary == 875.0
    assert experts.high is adapter.pipeline.transformer and experts.low is adapter.pipeline.transformer_2
    assert all(p.requires_grad for p in experts.parameters())
    x = torch.randn(2, *adapter.latent_shape())
    rows = adapter.encode_prompts(PROMPTS)
    embeds = adapter.cache.gather("prompt_embeds", rows, adapter.device, torch.float32)
    with torch.no_grad():
        for s, expert in ((0.9, experts.high), (0.875, experts.high), (0.5, experts.low)):
            expected = expert(x, torch.full((2,), s * 1000), embeds, return_dict=False)[0]
            torch.testing.assert_close(adapter.velocity(x, torch.tensor(s), rows), expected)
        # a batch that straddles the boundary: each sample from its own expert
        mixed = adapter.velocity(x, torch.tensor([0.9, 0.5]), rows)
        torch.testing.assert_close(mixed[0], adapter.velocity(x[:1], torch.tensor(0.9), rows[:1])[0])
        torch.testing.assert_close(mixed[1], adapter.velocity(x[1:], torch.tensor(0.5), rows[1:])[0])


def test_ti2v_5b_layout_48_channel_vae_and_per_token_timesteps(tmp_path):
    """Wan2.2-TI2V-5B's layout: its 48-channel VAE (16x spatial), and one timestep per latent token
    (expand_timesteps); text-to-video latents and videos as WanPipeline's."""
    folder = tiny_wan.build_wan(tmp_path / "ti2v", seed=2, ti2v=True)
    options = {**SIZE, "height": 32, "width": 32, "num_frames": 5, "cfg_scale": 1.0}
    adapter = load_adapter(folder, options=options)
    assert adapter.latent_shape() == (48, 2, 2, 2)  # 5 frames -> 2, 32 px -> 2 (16x VAE)
    noise = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(3))
    pipe = pipeline(folder)
    run = dict(prompt=PROMPTS, height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=1.0,
               max_sequence_length=8)
    reference = pipe(**run, latents=noise.clone(), output_type="latent").frames
    ours = our_latents(adapter, noise, PROMPTS, pipeline_grid(folder, 3))
    video = pipe(**run, latents=noise.clone(), output_type="pt").frames
    difference = float((ours - reference).abs().max())
    video_difference = float((adapter.decode(ours).clamp(0, 1) - video).abs().max())
    print(f"Wan TI2V-5B layout parity: latents {difference:.3g}, videos {video_difference:.3g}")
    assert difference < 1e-5 and video_difference < 1e-5 and video.shape == (2, 5, 3, 32, 32)
    with pytest.raises(ValueError, match="model.height: expected a multiple of 32"):
        load_adapter(folder, options={**options, "height": 48})


def brightness_change(videos, prompts):
    """A video reward (needs the whole video): minus the mean frame-to-frame change, cheap and deterministic."""
    return -(videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


brightness_change.needs = ("video",)


def tiny_run_config(folder, *overrides):
    return load_config(None, [f"model.path={folder}", "model.height=16", "model.width=16", f"model.num_frames={FRAMES}",
                              "model.max_sequence_length=8", "model.cfg_scale=1.0", "iterations=2",
                              "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                              "neighbor_grpo.rollout_steps=3", "eval.samples_per_prompt=2", "eval.steps=2",
                              "eval.every=0", "optim.lr=1e-3", "optim.lora_rank=4",
                              "prompts.train=[a red cat, a blue dog, a green photo]", "prompts.eval=[a cat]",
                              *overrides])


def test_wan22_lora_training_exports_one_lora_per_expert(wan22, tmp_path):
    """Neighbor GRPO (policy_space x0) with a LoRA on both experts, an image reward scored per frame plus a video
    reward; the export loads into WanPipeline and reloads to the trained velocities."""
    rewards = WeightedRewards({"red": tiny_diffusers.cheap_reward, "steady": brightness_change},
                              {"red": 1.0, "steady": 0.5})
    config = tiny_run_config(wan22, "optim.finetune=lora", "neighbor_grpo.policy_space=x0")
    adapter = load_adapter(config.model.path, options=config.model)
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=rewards)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    trained = {n for n, p in adapter.net.named_parameters() if p.requires_grad}
    assert any(".high." in n for n in trained) and any(".low." in n for n in trained)
    eval_after = json.loads((result.run_dir / "eval_after.json").read_text())
    assert "temporal_difference" in json.dumps(eval_after)
    aligned = result.run_dir / "aligned"
    assert (aligned / LORA_FILE).is_file() and (aligned / SECOND_EXPERT_LORA).is_file()
    assert f"weight_name='{SECOND_EXPERT_LORA}', load_into_transformer_2=True" in (aligned / "README.md").read_text()
    pipe = pipeline(wan22)
    pipe.load_lora_weights(aligned, weight_name=LORA_FILE)
    pipe.load_lora_weights(aligned, weight_name=SECOND_EXPERT_LORA, load_into_transformer_2=True)
    reloaded = load_adapter(aligned)
    x = torch.randn(2, *reloaded.latent_shape())
    for s in (0.95, 0.3):  # one timestep per expert
        with torch.no_grad():
            expected = adapter.velocity(x, torch.tensor(s), adapter.encode_prompts(PROMPTS))
            torch.testing.assert_close(reloaded.velocity(x, torch.tensor(s), reloaded.encode_prompts(PROMPTS)),
                                       expected, atol=1e-5, rtol=1e-5)


def test_wan21_full_finetune_and_wan22_pipeline_exports(wan21, wan22, tmp_path):
    config = tiny_run_config(wan21, "algorithm=dance_grpo", "iterations=1", "dance_grpo.group_size=4",
                             "dance_grpo.rollout_steps=3", "dance_grpo.num_minibatches=1", "optim.finetune=full")
    rewards = WeightedRewards({"red": tiny_diffusers.cheap_reward}, {"red": 1.0})
    result = train(config, tmp_path / "run", progress=False, rewards=rewards)
    aligned = result.run_dir / "aligned"
    assert json.loads((aligned / "model.json").read_text())["kind"] == "transformer"
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(aligned / "transformer")
    base = pipeline(wan21).transformer
    assert any(not torch.equal(p, dict(base.named_parameters())[n]) for n, p in exported.named_parameters())
    reloaded = load_adapter(aligned)
    for name, param in reloaded.net.named_parameters():
        assert torch.equal(param, dict(exported.named_parameters())[name])
    # Wan 2.2: a changed full fine-tune writes both experts (transformer/, transformer_2/); a merged pipeline folder
    # keeps the experts and the boundary
    adapter = load_adapter(wan22, options=SIZE)
    with torch.no_grad():
        next(adapter.net.low.parameters()).add_(0.1)
    adapter.save(tmp_path / "full22")
    assert (tmp_path / "full22" / "transformer_2" / "config.json").is_file()
    assert "pipe.transformer_2 = " in (tmp_path / "full22" / "README.md").read_text()
    x = torch.randn(1, *adapter.latent_shape())
    again = load_adapter(tmp_path / "full22")
    with torch.no_grad():
        for s in (0.95, 0.3):
            torch.testing.assert_close(again.velocity(x, torch.tensor(s), again.encode_prompts(PROMPTS[:1])),
                                       adapter.velocity(x, torch.tensor(s), adapter.encode_prompts(PROMPTS[:1])))
    lora = randomized_lora(load_adapter(wan22, options=SIZE), seed=4)
    lora.options["export_pipeline"] = True
    lora.save(tmp_path / "merged22")
    merged = pipeline(tmp_path / "merged22")
    assert merged.config.boundary_ratio == 0.875 and merged.transformer_2 is not None
    from_merged = load_adapter(tmp_path / "merged22")
    with torch.no_grad():
        for s in (0.95, 0.3):
            torch.testing.assert_close(from_merged.velocity(x, torch.tensor(s), from_merged.encode_prompts(PROMPTS[:1])),
                                       lora.velocity(x, torch.tensor(s), lora.encode_prompts(PROMPTS[:1])),
                                       atol=1e-5, rtol=1e-5)


def test_bad_video_options(wan21):
    with pytest.raises(ValueError, match="model.num_frames: expected 4k \\+ 1"):
        load_adapter(wan21, options={**SIZE, "num_frames": 8})
    with pytest.raises(ValueError, match="model.height"):
        load_adapter(wan21, options={**SIZE, "height": 24})


def test_sample_cli_writes_videos_and_a_frame_grid(wan21, tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    from neighbor_grpo.cli import main
    from neighbor_grpo.training.monitors import generate

    common = ["sample", "--checkpoint", str(wan21), "--resolution", "16", "--num-frames", str(FRAMES),
              "--max-sequence-length", "8", "--cfg-scale", "1", "--prompt", "a red cat", "--num", "2", "--steps", "2",
              "--solver", "euler"]
    assert main([*common, "--out", str(tmp_path / "clip.mp4"), "--fps", "8"]) == 0
    assert main([*common, "--out", str(tmp_path / "clip.gif")]) == 0
    assert main([*common, "--out", str(tmp_path / "frames.png")]) == 0
    adapter = load_adapter(wan21, options={**SIZE, "cfg_scale": 1.0})
    _, expected = generate(adapter, ["a red cat"], 2, 0, "euler", 2, adapter.default_shift())
    for k in range(2):
        gif = iio.imread(tmp_path / f"clip-{k}.gif")  # (T, H, W, 3), palette-quantised
        assert gif.shape == (FRAMES, 16, 16, 3)
        mp4 = iio.imread(tmp_path / f"clip-{k}.mp4", plugin="FFMPEG")
        assert mp4.shape == (FRAMES, 16, 16, 3)
        frames = expected[0, k].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255
        # mean error per 8-bit value, measured 0.25 (GIF palette) and 4.7 (H.264, yuv420 on 16 px frames); a flat
        # frame at the video's mean is 9.6 away
        assert np.abs(gif.astype(float) - frames).mean() < 1.0
        assert np.abs(mp4.astype(float) - frames).mean() < 6.5
    with Image.open(tmp_path / "frames.png") as grid:  # 2 rows of 9 frames (enlarged 4x)
        assert grid.width > 9 * 64 and 2 * 64 < grid.height < 3 * 64
    assert main([*common, "--out", str(tmp_path / "clip.mp4")]) == 2  # exists: refused without --overwrite
    assert main(["sample", "--checkpoint", str(wan21), "--resolution", "16", "--num-frames", "8", "--prompt", "a",
                 "--out", str(tmp_path / "bad.mp4")]) == 2


def test_fsdp_shards_each_block_of_each_expert(wan22, tmp_path):
    """The FSDP wrap policy (parallel.wrapping.shard_in_place) on Wan 2.2's experts: every WanTransformerBlock of both
    experts is its own unit, then the root; the sharded net gives the same velocities (1 process, gloo, CPU)."""
    import torch.distributed as dist
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    from torch.distributed.fsdp import FSDPModule

    from neighbor_grpo.parallel.wrapping import shard_in_place

    adapter = load_adapter(wan22, options={**SIZE, "cfg_scale": 1.0})
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = [adapter.velocity(x, torch.tensor(s), rows) for s in (0.95, 0.3)]
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        shard_in_place(adapter.net)
        blocks = [m for m in adapter.net.modules() if isinstance(m, WanTransformerBlock)]
        assert len(blocks) == 4 and all(isinstance(b, FSDPModule) for b in blocks)  # 2 experts x 2 layers
        assert isinstance(adapter.net, FSDPModule)
        with torch.no_grad():
            for s, expected in zip((0.95, 0.3), before):
                torch.testing.assert_close(adapter.velocity(x, torch.tensor(s), rows), expected)
    finally:
        dist.destroy_process_group()


def test_sharded_experts_run_what_any_process_runs(wan22, monkeypatch):
    """Under FSDP on several processes (per-sample times, e.g. DiffusionNFT's, route their batches differently),
    every process runs each expert that any of them needs: one needed only elsewhere runs on one row with weight 0,
    leaving this process's velocities unchanged, and its backward reaches that expert (zero gradients), so the
    gradient reductions line up. The 2-process run itself: tests/parallel/test_fsdp_models.py (slow)."""
    adapter = load_adapter(wan22, options={**SIZE, "cfg_scale": 1.0})
    experts = adapter.net
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)
    calls = []
    for expert in (experts.high, experts.low):
        expert.register_forward_hook(lambda module, args, out: calls.append((module, args[0].shape[0])))
    alone = adapter.velocity(x, torch.tensor(0.95), rows)  # one process: the high-noise expert only
    assert [(m is experts.high, n) for m, n in calls] == [(True, 2)]
    monkeypatch.setattr(WanExperts, "_sharded_over_processes", lambda self: True)
    monkeypatch.setattr(WanExperts, "_runs_anywhere", staticmethod(lambda runs, device: [True, True]))
    calls.clear()
    experts.zero_grad(set_to_none=True)
    lockstep = adapter.velocity(x, torch.tensor(0.95), rows)
    assert [(m is experts.high, n) for m, n in calls] == [(True, 2), (False, 1)]  # high, then low on one row
    torch.testing.assert_close(lockstep, alone, atol=0, rtol=0)
    lockstep.square().mean().backward()
    low = [p.grad for p in experts.low.parameters()]
    assert all(g is not None and not g.any() for g in low)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in experts.high.parameters())


def test_ddp_trains_one_expert_per_pass(wan22, tmp_path):
    """DDP (parallel.wrapping.replicate; a 1-process gloo group) around Wan 2.2's experts: a training pass at a
    high-noise time leaves the low-noise expert without gradients, which DDP refused at the next pass ("Expected to
    have finished reduction in the prior iteration") until the experts declared it."""
    import torch.distributed as dist

    from neighbor_grpo.parallel.wrapping import replicate, velocity_through

    adapter = load_adapter(wan22, options={**SIZE, "cfg_scale": 1.0})
    x, rows = torch.randn(2, *adapter.latent_shape()), adapter.encode_prompts(PROMPTS)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        module = replicate(adapter.net)
        assert module.find_unused_parameters
        velocity = velocity_through(adapter, module)
        for s in (0.95, 0.95, 0.3, 0.3):  # high, high, low, low: one expert per pass
            adapter.net.zero_grad(set_to_none=True)
            velocity(x, torch.tensor(s), rows).square().mean().backward()
            trained = [any(p.grad is not None for p in expert.parameters()) for expert in (adapter.net.high, adapter.net.low)]
            assert trained == [s >= 0.875, s < 0.875]
    finally:
        dist.destroy_process_group()
