"""Wan2.2-TI2V-5B image-to-video on a tiny random TI2V pipeline (tiny_wan.build_wan(ti2v=True)): editing prompt rows
(JSONL `image`) give the first latent frame, as diffusers' WanImageToVideoPipeline with expand_timesteps does it.
Our Euler rollout equals that pipeline's latents and videos; the image's frame is the transformer's first input
frame, with timestep 0, at every call of every solver and algorithm, and never part of the sampled latents; one
Neighbor GRPO iteration trains a LoRA; the export loads into the pipeline and reloads to the same samples."""

import csv
import json

import numpy as np
import pytest
import torch

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.config.prompts import EditPrompt
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.solvers import SOLVERS, integrate
from neighbor_grpo.models import decode_samples, load_adapter, sample_latent_shape
from neighbor_grpo.models.diffusers_common import LORA_FILE
from neighbor_grpo.rewards import WeightedRewards
from neighbor_grpo.training.trainer import train

import tiny_diffusers
import tiny_wan
from test_flux import randomized_lora

pytestmark = pytest.mark.usefixtures("single_thread")

FRAMES = 5  # 2 latent frames: the image's, then one sampled (the VAE compresses time 4x)
SIZE = {"height": 32, "width": 32, "num_frames": FRAMES, "max_sequence_length": 8}  # 16x VAE: 2 x 2 latents
SETTINGS = {  # small groups and grids, as tests/algorithms/test_video_latents.py
    "neighbor_grpo": ["neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2", "neighbor_grpo.rollout_steps=3"],
    "flow_grpo": ["flow_grpo.group_size=4", "flow_grpo.rollout_steps=3", "flow_grpo.num_minibatches=1"],
    "dance_grpo": ["dance_grpo.group_size=4", "dance_grpo.rollout_steps=3", "dance_grpo.num_minibatches=1"],
    "mix_grpo": ["mix_grpo.group_size=4", "mix_grpo.rollout_steps=4", "mix_grpo.window_size=2", "mix_grpo.num_minibatches=1"],
    "diffusion_nft": ["diffusion_nft.group_size=4", "diffusion_nft.rollout_steps=3"],
    "awm": ["awm.group_size=4", "awm.rollout_steps=4", "awm.num_times=2"],
    "dgpo": ["dgpo.group_size=4", "dgpo.rollout_steps=3", "dgpo.trunc_steps=1", "dgpo.num_times=2"],
}


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    return tiny_wan.build_wan(tmp_path_factory.mktemp("tiny") / "ti2v", seed=2, ti2v=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two source images (32 px, the output size) and a JSONL prompt set that animates them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("sources")
    generator = torch.Generator().manual_seed(5)
    rows = []
    for name, text in (("one", "a red cat walks"), ("two", "a blue dog runs")):
        pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}.png")
        rows.append({"prompt": text, "image": f"{name}.png"})
    (folder / "videos.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def prompts_of(sources):
    return [EditPrompt("a red cat walks", sources / "one.png"), EditPrompt("a blue dog runs", sources / "two.png")]


def i2v_pipeline(folder):
    """diffusers' image-to-video pipeline on the TI2V folder (its model_index says WanPipeline and expand_timesteps,
    as Wan2.2-TI2V-5B-Diffusers; WanImageToVideoPipeline loads it without an image encoder)."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps and pipe.image_encoder is None
    return pipe


def umt5_embeddings(pipe, prompt: str) -> torch.Tensor:
    """WanPipeline's encode_prompt on the same components. WanImageToVideoPipeline's own prompt cleaning calls ftfy
    unconditionally, which is not installed here (WanPipeline skips it then); ftfy leaves these ASCII prompts as they
    are, so the embeddings are the ones it would compute."""
    from diffusers import WanPipeline

    text = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
                       transformer=pipe.transformer)
    return text.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=8)[0]


def theirs(pipe, prompts, noise, steps, cfg, output_type="latent"):
    """The pipeline, one prompt at a time (it repeats one image's latent over the batch), from full-length noise;
    the negative prompt is our default, the empty string."""
    from PIL import Image

    out = []
    for k, prompt in enumerate(prompts):
        with Image.open(prompt.image) as image:
            out.append(pipe(image=image.convert("RGB"), prompt_embeds=umt5_embeddings(pipe, str(prompt)),
                            negative_prompt_embeds=umt5_embeddings(pipe, "") if cfg > 1 else None, height=32,
                            width=32, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=cfg,
                            latents=noise[k:k + 1].clone(), output_type=output_type).frames)
    return torch.cat([torch.as_tensor(o) for o in out])


def pipeline_grid(pipe, steps):
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.sigmas.clone()


def our_latents(adapter, prompts, noise, grid):
    cond = adapter.encode_prompts(prompts)
    with torch.no_grad():
        return integrate(lambda x, s: adapter.velocity(x, s, cond), noise, grid, "euler").states[-1]


def test_image_to_video_rollout_equals_wan_image_to_video_pipeline(ti2v, sources):
    """From the same noise and images (CFG 5), our Euler rollout of the sampled frames equals the pipeline's latents
    after its first frame, which is the image's latent; the decoded videos agree; the pipeline's own noise for the
    first frame does not change its output (so leaving that frame out of our latents loses nothing)."""
    adapter = load_adapter(ti2v, options={**SIZE, "cfg_scale": 5.0})
    prompts = prompts_of(sources)
    assert adapter.latent_shape() == (48, 2, 2, 2)  # text-to-video: both latent frames are sampled
    assert adapter.latent_shape(prompts) == (48, 1, 2, 2) == sample_latent_shape(adapter, prompts)
    steps = 3
    noise = torch.randn(2, 48, 2, 2, 2, generator=torch.Generator().manual_seed(7))
    pipe = i2v_pipeline(ti2v)
    reference = theirs(pipe, prompts, noise, steps, 5.0)
    rows = adapter.encode_prompts(prompts)
    first = adapter.cache.gather("first_frame", rows, adapter.device, torch.float32)
    assert first.shape == (2, 48, 1, 2, 2)
    ours = our_latents(adapter, prompts, noise[:, :, 1:], pipeline_grid(pipe, steps))
    frame_gap = float((first - reference[:, :, :1]).abs().max())
    latent_gap = float((ours - reference[:, :, 1:]).abs().max())
    print(f"Wan TI2V image-to-video parity (CFG 5): first frame {frame_gap:.3g}, sampled latents {latent_gap:.3g}")
    assert frame_gap <= 1e-6 and latent_gap <= 1e-5
    video = theirs(pipe, prompts, noise, steps, 5.0, output_type="pt")
    ours_video = decode_samples(adapter, ours, rows)
    assert ours_video.shape == video.shape == (2, FRAMES, 3, 32, 32)
    video_gap = float((ours_video.clamp(0, 1) - video).abs().max())
    print(f"Wan TI2V image-to-video video parity: {video_gap:.3g}")
    assert video_gap <= 1e-5
    other_noise = noise.clone()
    other_noise[:, :, :1] = torch.randn(2, 48, 1, 2, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(theirs(pipe, prompts, other_noise, steps, 5.0), reference)
    # the image matters: another source image gives other samples
    swapped = [EditPrompt(str(p), sources / "one.png") for p in prompts]
    assert (our_latents(adapter, swapped, noise[:, :, 1:], pipeline_grid(pipe, steps))[1] - ours[1]).abs().max() > 1e-3


class FirstFrameSpy:
    """Records, at every transformer call, the first input frame and the timesteps of its tokens and of the rest."""

    def __init__(self, net):
        self.calls = []
        self.handle = net.register_forward_pre_hook(self.record)

    def record(self, module, inputs):
        hidden, timestep = inputs[0], inputs[1]
        per_frame = (hidden.shape[3] // 2) * (hidden.shape[4] // 2)
        self.calls.append((hidden.shape[2], hidden[:, :, :1].detach().float(), timestep[:, :per_frame].detach(),
                           timestep[:, per_frame:].detach()))


def test_the_image_frame_is_given_at_every_call_of_every_solver_and_algorithm(ti2v, sources):
    """Whatever integrates or trains (each solver; each algorithm's rollout and loss, SDE ones included), the
    transformer sees the image's latent as its first frame with timestep 0, and the algorithms' latents (hence
    their distances and log-probs) hold only the sampled frames."""
    adapter = load_adapter(ti2v, options={**SIZE, "cfg_scale": 1.0})
    prompts = prompts_of(sources)
    cond = adapter.encode_prompts(prompts)
    image_frames = adapter.cache.gather("first_frame", cond, adapter.device, torch.float32)
    shape = sample_latent_shape(adapter, prompts)
    spy = FirstFrameSpy(adapter.net)

    def check(where, rows=None):
        """`rows`: each sample's prompt row, when every call holds all samples in order (solvers, rollouts)."""
        assert spy.calls, where
        for frames, first, image_timesteps, noisy_timesteps in spy.calls:
            assert frames == 2, where  # the image's frame + the one sampled frame
            if rows is not None:
                assert torch.equal(first, image_frames[rows.long()]), where
            else:  # a loss's minibatch of anchors: every first frame is one of the images
                assert all(any(torch.equal(f, e) for e in image_frames) for f in first), where
            assert torch.all(image_timesteps == 0), where
            assert torch.all(noisy_timesteps > 0), where
        spy.calls.clear()

    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for solver in sorted(SOLVERS):
            integrate(lambda x, s: adapter.velocity(x, s, cond), noise, torch.tensor([1.0, 0.6, 0.3, 0.0]), solver)
            check(solver, cond)
    velocity = adapter.velocity
    for name in sorted(ALGORITHMS):
        config = load_config(None, [f"algorithm={name}", *SETTINGS[name]])
        method = ALGORITHMS[name](getattr(config, name), seed=3)
        with torch.no_grad():
            rollout = method.rollout(velocity, cond, prompts, [0, 1], 0, shape)
        assert rollout.states.shape[3:] == shape, name  # (steps, P, G, C, T - 1, H, W)
        check(f"{name} rollout", cond.repeat_interleave(rollout.group_size))
        advantages, _ = method.clip(method.advantages(rollout.final.flatten(2).mean(-1)))
        batch = method.minibatches(rollout, 0)[0]
        if hasattr(method, "prepare_old_policy"):
            rollout = method.prepare_old_policy(velocity, rollout, [batch])
        loss, _ = method.loss(velocity, rollout, advantages, batch, reference_velocity=velocity)
        assert torch.isfinite(loss), name
        check(f"{name} loss")
    spy.handle.remove()


def animated_frames(videos, prompts, source_images):
    """A video reward that needs the source images: how close the last frame stays to the source image."""
    assert videos.shape[1:] == (FRAMES, 3, 32, 32) and source_images.shape[1:] == (3, 32, 32)
    return -(videos[:, -1] - source_images).abs().mean(dim=(1, 2, 3))


animated_frames.needs = ("video", "source_images")


def test_neighbor_grpo_trains_a_lora_on_image_prompts_and_the_export_loads(ti2v, sources, tmp_path):
    jsonl = sources / "videos.jsonl"
    config = load_config(None, [f"model.path={ti2v}", "model.height=32", "model.width=32", f"model.num_frames={FRAMES}",
                                "model.max_sequence_length=8", "model.cfg_scale=1.0", "iterations=1",
                                "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
                                "neighbor_grpo.rollout_steps=3", "eval.samples_per_prompt=2", "eval.steps=2",
                                "eval.every=0", "optim.lr=1e-3", "optim.lora_rank=4", "optim.finetune=lora",
                                f"prompts.file={jsonl}", f"prompts.eval_file={jsonl}"])
    adapter = load_adapter(config.model.path, options=config.model)
    rewards = WeightedRewards({"red": tiny_diffusers.cheap_reward, "animated": animated_frames})
    result = train(config, tmp_path / "run", progress=False, adapter=adapter, rewards=rewards)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 1 and np.isfinite(losses[0])
    trained = [p for n, p in adapter.net.named_parameters() if "lora_B" in n]
    assert trained and any(bool(p.abs().sum() > 0) for p in trained)  # LoRA B starts at zero: the step moved it
    assert "temporal_difference" in json.dumps(json.loads((result.run_dir / "eval_after.json").read_text()))
    aligned = result.run_dir / "aligned"
    assert (aligned / LORA_FILE).is_file()
    prompts = prompts_of(sources)
    reloaded = load_adapter(aligned)
    x = torch.randn(2, *sample_latent_shape(reloaded, prompts), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.velocity(x, torch.tensor(0.6), reloaded.encode_prompts(prompts)),
                                   adapter.velocity(x, torch.tensor(0.6), adapter.encode_prompts(prompts)),
                                   atol=1e-5, rtol=1e-5)


def test_lora_export_loads_into_the_image_to_video_pipeline(ti2v, sources, tmp_path):
    adapter = randomized_lora(load_adapter(ti2v, options={**SIZE, "cfg_scale": 1.0}))
    adapter.save(tmp_path / "lora")
    pipe = i2v_pipeline(ti2v)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_FILE)
    prompts = prompts_of(sources)
    noise = torch.randn(2, 48, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    reference = theirs(pipe, prompts, noise, 2, 1.0)
    grid = pipeline_grid(pipe, 2)
    gap = float((our_latents(adapter, prompts, noise[:, :, 1:], grid) - reference[:, :, 1:]).abs().max())
    reloaded_gap = float((our_latents(load_adapter(tmp_path / "lora"), prompts, noise[:, :, 1:], grid)
                          - reference[:, :, 1:]).abs().max())
    print(f"Wan TI2V image-to-video LoRA parity: {gap:.3g}, after reload {reloaded_gap:.3g}")
    assert gap <= 1e-5 and reloaded_gap <= 1e-5
    pipe.unload_lora_weights()
    assert (theirs(pipe, prompts, noise, 2, 1.0) - reference).abs().max() > 1e-3  # the LoRA matters
    # a merged pipeline export keeps expand_timesteps (the image is the first latent frame) and reloads the same
    adapter.options["export_pipeline"] = True
    adapter.save(tmp_path / "merged")
    merged = i2v_pipeline(tmp_path / "merged")
    assert merged.config.expand_timesteps is True
    merged_gap = float((our_latents(load_adapter(tmp_path / "merged", options={**SIZE, "cfg_scale": 1.0}), prompts,
                                    noise[:, :, 1:], grid) - reference[:, :, 1:]).abs().max())
    assert merged_gap <= 1e-4


def test_image_prompts_need_the_ti2v_layout(tmp_path, sources):
    wan21 = tiny_wan.build_wan(tmp_path / "wan21")
    adapter = load_adapter(wan21, options={"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 8})
    with pytest.raises(ValueError, match="need Wan2.2-TI2V-5B's layout"):
        adapter.encode_prompts(prompts_of(sources))


def test_sample_cli_animates_a_source_image(ti2v, sources, tmp_path):
    """`ngrpo sample --image`: every sample starts from the image's frame (the same first video frame), and the
    samples are those of the prompt row with that image."""
    from neighbor_grpo.cli import main
    from neighbor_grpo.training.monitors import generate

    common = ["sample", "--checkpoint", str(ti2v), "--resolution", "32", "--num-frames", str(FRAMES),
              "--max-sequence-length", "8", "--cfg-scale", "1", "--prompt", "a red cat walks", "--num", "2",
              "--steps", "2", "--solver", "euler"]
    assert main([*common, "--image", str(sources / "one.png"), "--out", str(tmp_path / "clip.npz")]) == 0
    videos = torch.from_numpy(np.load(tmp_path / "clip.npz")["images"])
    assert videos.shape == (2, FRAMES, 3, 32, 32)
    assert torch.equal(videos[0, 0], videos[1, 0]) and not torch.equal(videos[0, 1:], videos[1, 1:])
    adapter = load_adapter(ti2v, options={**SIZE, "cfg_scale": 1.0})
    _, expected = generate(adapter, prompts_of(sources)[:1], 2, 0, "euler", 2, adapter.default_shift())
    torch.testing.assert_close(videos, expected[0].clamp(0, 1), atol=1e-6, rtol=0)
    assert main([*common, "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "other.npz")]) == 2
