"""Throughput of one training iteration: Neighbor GRPO against the SDE baselines, same model, same run.

    python benchmarks/throughput.py --out benchmarks/results/throughput_cpu_builtin.json
    python benchmarks/throughput.py --arch flux-dev --resolution 720 --prompts 1 --finetune lora \
        --methods neighbor_grpo dance_grpo --out throughput_flux.json            # on a GPU

For one model architecture it runs real training iterations (`trainer.train_iteration`, the loop `ngrpo train`
runs) of every method at its paper's settings (`compare.PAPER_SETTINGS`) and reports, per method: seconds per
iteration (median of the timed iterations, warm-up excluded), rollout images/s, trained samples/s, peak GPU
memory and model FLOP utilisation (MFU). It also reports the two ratios of issue #6, measured in the same run with
the same fine-tuning mode: DanceGRPO's iteration over Neighbor GRPO's in forward-pass equivalents and in
wall-clock.

What each figure means is written into the JSON under "definitions" (DEFINITIONS below).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from neighbor_grpo import cost
from neighbor_grpo.algorithms.common import repeat_cond
from neighbor_grpo.compare import PAPER_SETTINGS
from neighbor_grpo.config import load_config
from neighbor_grpo.trainer import ModelCallCounter, build_training_parts, load_model, prompt_batch, train_iteration

DEFINITIONS = {
    "iteration": "everything trainer.train_iteration does: prompt encoding, rollout, decoding, reward, advantages, "
                 "old policy, every loss/backward/optimizer step; the reward is part of it (reward_s says how much)",
    "s_per_iter": "median wall-clock seconds of the timed iterations (warm-up excluded)",
    "rollout_images_per_s": "P*G images / rollout seconds (iteration start to the trainer's after_rollout hook: "
                            "sampling, decoding and reward)",
    "train_samples_per_s": "with-grad per-sample forwards (trained (sample, step) units) / seconds after the rollout",
    "forward_equivalents": "per-sample forwards of the velocity net (trainer.ModelCallCounter, no-grad and with-grad) "
                           "plus the reference model's forwards (counted here: a full fine-tune's reference is a frozen "
                           "copy the counter does not see); a trained sample also costs its backward: 2 forwards for a "
                           "full fine-tune, about 1 for LoRA (input gradients only)",
    "model_flops": "FlopCounterMode count of one velocity-net forward at the rollout batch shape (matmuls, convolutions, "
                   "attention; not the text encoder, VAE or reward), per sample, times forward_equivalents",
    "mfu": "model FLOPs per second / the card's dense bf16 peak; gradient-checkpointing recomputation is not model "
           "work (hfu in details counts it)",
    "peak_mem_gb": "torch.cuda.max_memory_allocated over the timed iterations, 1e9 bytes; null on CPU",
}

# Every method at its paper's settings; Neighbor GRPO also without the library's reference anchoring (the paper
# has none: its cost figures are for the leaping-policy loss alone).
METHODS: dict[str, list[str]] = {
    "neighbor_grpo": PAPER_SETTINGS["neighbor_grpo"],
    "neighbor_grpo_no_ref": PAPER_SETTINGS["neighbor_grpo"] + ["neighbor_grpo.ref_beta=0"],
    **{name: overrides for name, overrides in PAPER_SETTINGS.items() if name != "neighbor_grpo"},
}

ARCHS = ("builtin", "tiny-digits", "sd35-medium", "flux-dev", "tiny-sd3", "tiny-flux")
DEFAULT_RESOLUTION = {"builtin": 16, "tiny-digits": 16, "sd35-medium": 512, "flux-dev": 720, "tiny-sd3": 32,
                      "tiny-flux": 32}
DEFAULT_PROMPTS = {"builtin": 8, "tiny-digits": 8, "sd35-medium": 1, "flux-dev": 1, "tiny-sd3": 1, "tiny-flux": 1}
# The classifier of the built-in digits is its natural cheap reward; any real image takes the model-free JPEG one.
DEFAULT_REWARD = {"builtin": "digit_prob"}
FALLBACK_REWARD = "jpeg_compressibility"

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOPS, matched as lower-case substrings
# of torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
BF16_DENSE_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("h200 nvl", 835.0), ("h200", 989.0),                         # GH200 contains "h200": same Hopper peak
    ("h800 pcie", 756.0), ("h800", 989.0), ("b200", 2250.0), ("a100", 312.0), ("a800", 312.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("rtx 4090", 165.2), ("rtx 3090", 71.0),
]


# ---- the model under test ----------------------------------------------------------------------------------------

def build_adapter(arch: str, resolution: int, device: str, dtype: torch.dtype):
    """The model adapter of an architecture (the velocity net in `adapter.net`), on `device`.

    builtin: the cached built-in digits model (16x16 images; `resolution` is fixed). tiny-digits: a small random
    digits net (tests). sd35-medium / flux-dev: random-init transformers of the real architectures; tiny-sd3 /
    tiny-flux: the same code with tiny configs, for CPU runs. Random weights cost the same FLOPs as trained ones.
    """
    if arch == "builtin":
        adapter = load_model("builtin:digits", device, progress=False)
    elif arch == "tiny-digits":
        from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig

        adapter = DigitsAdapter.create(DigitsNetConfig(hidden=32, depth=2, cond_dim=16), seed=0)
    elif arch in ("sd35-medium", "flux-dev", "tiny-sd3", "tiny-flux"):
        adapter = build_diffusers_adapter(arch, resolution, device, dtype)
    else:
        raise ValueError(f"--arch: unknown {arch!r}; choose from {ARCHS}")
    if arch in ("builtin", "tiny-digits") and resolution != adapter.net_config.image_size:
        raise ValueError(f"--resolution: the {arch} model makes {adapter.net_config.image_size}x"
                         f"{adapter.net_config.image_size} images; got {resolution}")
    adapter.net.to(device)
    return adapter


# Random-weight stand-ins for the real checkpoints: the transformer and VAE configs of FLUX.1-dev and SD3.5-medium
# (their config.json on the Hub), and one-block tiny versions for CPU runs. Text encoders are frozen and run once
# per prompt (the adapters cache the embeddings), so they are replaced by random embeddings of the real shapes.
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
TINY_VAE = dict(block_out_channels=(4, 4), layers_per_block=1, norm_num_groups=1, use_quant_conv=False,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609)
DIFFUSERS_ARCHS = {
    "flux-dev": {"transformer": dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 "vae": FLUX_VAE, "text": (512, 4096, 768)},
    "tiny-flux": {"transformer": dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                      guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
                  "vae": {**TINY_VAE, "latent_channels": 1}, "text": (16, 32, 32)},
    "sd35-medium": {"transformer": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                        qk_norm="rms_norm"),
                    "vae": {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}, "text": (333, 4096, 2048)},
    "tiny-sd3": {"transformer": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                     pooled_projection_dim=64, out_channels=4),
                 "vae": {**TINY_VAE, "latent_channels": 4}, "text": (16, 32, 64)},
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created in `dtype` (a 12B transformer never exists in fp32 on the way to bf16)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_text_embeddings(tokens: int, width: int, pooled: int, device, dtype):
    """encode_new_prompts stand-in: fixed random embeddings per prompt (keyed by its CRC), the real shapes."""
    import zlib

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        generators = [torch.Generator().manual_seed(zlib.crc32(p.encode())) for p in prompts]
        embeds = torch.stack([torch.randn(tokens, width, generator=g) for g in generators])
        pooled_embeds = torch.stack([torch.randn(pooled, generator=g) for g in generators])
        return {"prompt_embeds": embeds.to(device, dtype), "pooled_prompt_embeds": pooled_embeds.to(device, dtype)}

    return encode


def build_diffusers_adapter(arch: str, resolution: int, device: str, dtype: torch.dtype):
    """The project's FluxAdapter / SD3Adapter around a random-weight pipeline built in memory (nothing downloaded)."""
    import diffusers

    from neighbor_grpo.models.diffusers_common import model_options

    spec = DIFFUSERS_ARCHS[arch]
    flux = "flux" in arch
    if flux:
        from neighbor_grpo.models.flux import FluxAdapter as adapter_class
    else:
        from neighbor_grpo.models.sd3 import SD3Adapter as adapter_class
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(0)
        transformer_class = diffusers.FluxTransformer2DModel if flux else diffusers.SD3Transformer2DModel
        transformer = transformer_class(**spec["transformer"])
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **spec["vae"])
    scheduler = (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
                 if flux else diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    encoders = {"text_encoder": torch.nn.Identity(), "tokenizer": None, "text_encoder_2": torch.nn.Identity(),
                "tokenizer_2": None}
    if flux:
        pipeline = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **encoders)
    else:
        pipeline = diffusers.StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, transformer=transformer,
                                                      text_encoder_3=torch.nn.Identity(), tokenizer_3=None, **encoders)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    options = model_options({"dtype": dtype_name, "height": resolution, "width": resolution})
    adapter = adapter_class(pipeline, Path("."), options, torch.device(device), loras=[])
    adapter.encode_new_prompts = random_text_embeddings(*spec["text"], device, dtype)
    return adapter


def repeated_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer/residual blocks: children of every ModuleList whose name ends in 'blocks'."""
    return [block for name, module in net.named_modules() if isinstance(module, torch.nn.ModuleList)
            and name.rsplit(".", 1)[-1].endswith("blocks") for block in module]


def checkpoint_blocks(net: torch.nn.Module) -> str:
    """Gradient checkpointing for a model whose adapter has no switch of its own (the digits models): each block
    recomputes its activations in the backward pass. Adapters with enable_gradient_checkpointing() get
    speed.gradient_checkpointing instead."""
    blocks = repeated_blocks(net)
    if not blocks:
        raise ValueError("--gradient-checkpointing: found no blocks to checkpoint in this model")
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # rollouts and reference passes keep nothing to recompute
                return _forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return f"torch.utils.checkpoint on {len(blocks)} blocks (benchmark's own)"


# ---- counting what an iteration does -----------------------------------------------------------------------------

class CountedReference:
    """Wraps the reference velocity to count its per-sample forwards. With LoRA the reference is the trained net
    with its adapters off, which the call counter also sees: `hooked` keeps that share to avoid counting twice."""

    def __init__(self, reference_velocity, counter: ModelCallCounter):
        self.reference_velocity, self.counter = reference_velocity, counter
        self.samples = self.hooked = 0
        self.net_samples_per_sample = 1.0  # > 1 where the adapter batches more through the net (SD3's CFG: 2)

    def __call__(self, x, s, cond):
        before = self.counter.no_grad
        v = self.reference_velocity(x, s, cond)
        hooked = self.counter.no_grad - before
        self.samples += hooked or round(int(x.shape[0]) * self.net_samples_per_sample)
        self.hooked += hooked
        return v

    def reset(self) -> tuple[int, int]:
        counts = (self.samples, self.hooked)
        self.samples = self.hooked = 0
        return counts


class TimedRewards:
    """The rewards with the seconds spent scoring (the reward is part of an iteration; this says how much)."""

    def __init__(self, rewards, sync):
        self.rewards, self.sync, self.seconds = rewards, sync, 0.0

    def score(self, images, prompts):
        self.sync()
        tick = time.perf_counter()
        scores = self.rewards.score(images, prompts)
        self.sync()
        self.seconds += time.perf_counter() - tick
        return scores

    def __getattr__(self, name):  # total, weights: the wrapped rewards'
        return getattr(self.rewards, name)


@dataclass
class IterationRecord:
    seconds: float
    rollout_s: float
    train_s: float
    reward_s: float
    rollout_forwards: int      # no-grad per-sample forwards until the rollout is scored
    train_forwards: int        # with-grad per-sample forwards (trained units)
    reference_forwards: int    # the reference model's per-sample forwards (reference anchoring / KL)
    other_forwards: int        # other no-grad forwards after the rollout (old-policy recomputation)
    images: int
    peak_mem_bytes: int | None
    skipped: str


@dataclass
class MethodRun:
    name: str
    config: object
    adapter: object
    parts: object
    counter: ModelCallCounter
    reference: CountedReference
    records: list[IterationRecord] = field(default_factory=list)
    next_iteration: int = 0
    net_samples_per_sample: float = 1.0  # samples the net sees per velocity sample (SD3's CFG: 2)


def forward_equivalents(record: IterationRecord, finetune: str) -> float:
    """One iteration's cost by the project's single rule (neighbor_grpo.cost)."""
    no_grad = record.rollout_forwards + record.other_forwards + record.reference_forwards
    return cost.forward_equivalents(no_grad, record.train_forwards, finetune)


def analytic_forward_counts(config, prompts: int) -> dict | None:
    """Per-iteration forwards the settings imply, for Neighbor GRPO and DanceGRPO (None for the others):
    Neighbor GRPO: rollout P*G*N, trained P*B*K (+ as many reference forwards when ref_beta > 0);
    DanceGRPO: rollout P*G*N, trained P*G*int(fraction * (N - 1)) (the last step is never trained)."""
    c = config.algorithm_config
    if config.algorithm == "neighbor_grpo":
        if c.rollout_solver not in ("euler", "dpm++2m"):
            return None  # one model evaluation per step only for these solvers
        trained = prompts * min(c.num_anchors, c.group_size) * c.trained_steps
        reference = trained if c.ref_beta > 0 else 0
        other = trained if c.old_policy == "recompute" else 0
        return {"rollout": prompts * c.group_size * c.rollout_steps, "train": trained, "reference": reference,
                "other": other}
    if config.algorithm == "dance_grpo":
        steps = max(1, int(c.train_step_fraction * (c.rollout_steps - 1)))
        trained = prompts * c.group_size * steps
        return {"rollout": prompts * c.group_size * c.rollout_steps, "train": trained, "reference": 0,
                "other": trained if c.old_policy == "recompute" else 0}
    return None


def analytic_fpe(counts: dict, finetune: str) -> float:
    return cost.forward_equivalents(counts["rollout"] + counts["other"] + counts["reference"], counts["train"], finetune)


# ---- FLOPs and the card's peak -----------------------------------------------------------------------------------

def count_forward_flops(run: "MethodRun", batch_prompts: int, group_size: int) -> dict:
    """FLOPs of one velocity-net forward at the rollout batch shape (P*G samples) and per sample the net saw (CFG
    doubles what the net sees), through the trainer's velocity (mixed precision as configured); plus, at one
    sample, a measured forward+backward: a check on the 2x / 1x backward rule."""
    adapter, velocity = run.adapter, run.parts.velocity or run.adapter.velocity
    prompts, _ = prompt_batch(list(run.config.prompts.train), run.config.seed, 0, batch_prompts)
    cond = adapter.encode_prompts(prompts)
    device = adapter.device
    x = torch.randn(len(prompts) * group_size, *adapter.latent_shape(), device=device)
    s = torch.tensor(0.5, device=device)
    eager = getattr(torch.compiler, "set_stance", None)  # count the eager graph when speed.compile is on
    with eager("force_eager") if eager else contextlib.nullcontext():
        run.counter.reset()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            velocity(x, s, repeat_cond(cond, group_size))
        total, seen = counter.get_total_flops(), run.counter.reset()[0]
        with FlopCounterMode(display=False) as counter:
            v = velocity(x[:1], s, cond[:1])
            forward_one = counter.get_total_flops()
            v.float().square().mean().backward()
        both_one = counter.get_total_flops()
    run.counter.reset()
    adapter.net.zero_grad(set_to_none=True)
    return {"batch": int(x.shape[0]), "net_samples_at_batch": seen, "forward_at_batch": int(total),
            "forward_per_sample": total / seen,
            "measured_backward_over_forward": (both_one - forward_one) / forward_one if forward_one else None}


def bf16_peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak (TFLOPS) and where it came from; None on CPU or an unknown card."""
    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for key, tflops in BF16_DENSE_PEAK_TFLOPS:
        if key in name:
            return tflops, f"table entry {key!r} for {name!r}"
    return None, f"unknown card {name!r} (pass --peak-tflops)"


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"


# ---- running iterations ------------------------------------------------------------------------------------------

def method_overrides(args, method: str, device: str, reward: str) -> list[str]:
    """The method at its paper's settings, with the benchmark's shared settings on top (every algorithm section
    gets the same group size, so all methods score the same number of images per iteration)."""
    shared = [f"device={device}", f"prompts_per_iteration={args.prompts}", f"optim.finetune={args.finetune}",
              f"seed={args.seed}", f"rewards=[{{name: {reward}}}]"]
    shared += [f"{section}.group_size={args.group_size}" for section in ("neighbor_grpo", "flow_grpo", "dance_grpo", "mix_grpo")]
    if args.dtype == "bf16":  # the trainer's autocast (fp32 master weights); real models also hold bf16 weights
        shared.append("speed.mixed_precision=bf16")
    if args.compile:
        shared.append("speed.compile=true")
    return METHODS[method] + shared + list(args.set)


def prepare_method(args, method: str, device: str, dtype: torch.dtype, reward: str) -> tuple[MethodRun, str | None]:
    """The method's config, its own copy of the model and its training parts; and how checkpointing was enabled."""
    config = load_config(None, method_overrides(args, method, device, reward))
    adapter = build_adapter(args.arch, args.resolution, device, dtype)
    if args.finetune == "lora" and callable(getattr(adapter, "default_lora_targets", None)):
        if not any(s.startswith("optim.lora_targets=") for s in args.set):
            config.optim.lora_targets = adapter.default_lora_targets()  # a real model's attention projections
    checkpointing = None
    if args.gradient_checkpointing and callable(getattr(adapter, "enable_gradient_checkpointing", None)):
        config.speed.gradient_checkpointing = True
        checkpointing = f"{type(adapter).__name__}.enable_gradient_checkpointing() (speed.gradient_checkpointing)"
    parts = build_training_parts(config, adapter)
    counter = ModelCallCounter(adapter.net)
    run = MethodRun(method, config, adapter, parts, counter, CountedReference(parts.reference_velocity, counter))
    return run, checkpointing


def run_iteration(run: MethodRun, rewards: TimedRewards, sync, device: str) -> IterationRecord:
    """One train_iteration of a method, timed by phase, with its forward counts."""
    marks: dict = {}

    def hook(point: str) -> None:
        if point == "after_rollout":
            sync()
            marks["rollout_end"], marks["rollout_forwards"] = time.perf_counter(), run.counter.no_grad

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    run.counter.reset()
    run.reference.reset()
    rewards.seconds = 0.0
    sync()
    start = time.perf_counter()
    _, skipped = train_iteration(run.config, run.adapter, rewards, run.parts.algorithm, run.parts.optimizer,
                                 run.parts.params, run.parts.ema, run.reference, list(run.config.prompts.train),
                                 run.next_iteration, hook, parts=run.parts)
    sync()
    end = time.perf_counter()
    run.next_iteration += 1
    no_grad, with_grad = run.counter.reset()
    reference, hooked = run.reference.reset()
    rollout_end = marks.get("rollout_end", end)  # a skipped update never reaches the hook
    rollout_forwards = marks.get("rollout_forwards", no_grad)
    images = run.config.prompts_per_iteration * run.config.algorithm_config.group_size
    return IterationRecord(
        seconds=end - start, rollout_s=rollout_end - start, train_s=end - rollout_end, reward_s=rewards.seconds,
        rollout_forwards=rollout_forwards, train_forwards=with_grad, reference_forwards=reference,
        other_forwards=no_grad - rollout_forwards - hooked, images=images,
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if cuda else None, skipped=skipped)


def time_method(run: MethodRun, rewards, sync, device: str, warmup: int, iters: int) -> None:
    """Warm-up iterations (not kept), then the timed ones."""
    for _ in range(warmup):
        run_iteration(run, rewards, sync, device)
    run.records = [run_iteration(run, rewards, sync, device) for _ in range(iters)]


def time_alternating(runs: list[MethodRun], rewards, sync, device: str, warmup: int, iters: int) -> None:
    """The methods interleaved iteration by iteration, rotating which goes first, so that load from other
    processes on a shared machine hits every method alike and consecutive iterations can be paired."""
    for _ in range(warmup):
        for run in runs:
            run_iteration(run, rewards, sync, device)
    for round_index in range(iters):
        shift = round_index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.records.append(run_iteration(run, rewards, sync, device))


def release(run: MethodRun, cuda: bool) -> None:
    """Free a method's model and optimizer (the sequential schedule, before building the next method)."""
    run.counter.remove()
    run.adapter = run.parts = run.reference = None
    if cuda:
        torch.cuda.empty_cache()


# ---- summaries ---------------------------------------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(run: MethodRun, flops_per_sample: float, peak_tflops: float | None, finetune: str,
              checkpointing: bool) -> tuple[dict, dict]:
    """The method's five reported figures, and the details behind them."""
    records = run.records
    s_per_iter = median([r.seconds for r in records])
    fpe = median([forward_equivalents(r, finetune) for r in records])
    model_flops = fpe * flops_per_sample
    recompute_flops = median([r.train_forwards for r in records]) * flops_per_sample if checkpointing else 0.0
    peak = peak_tflops * 1e12 if peak_tflops else None
    peak_mem = max((r.peak_mem_bytes for r in records if r.peak_mem_bytes is not None), default=None)
    figures = {
        "s_per_iter": s_per_iter,
        "rollout_images_per_s": median([r.images / r.rollout_s for r in records if r.rollout_s > 0]),
        "train_samples_per_s": median([r.train_forwards / r.train_s for r in records if r.train_s > 0]),
        "peak_mem_gb": peak_mem / 1e9 if peak_mem is not None else None,
        "mfu": model_flops / s_per_iter / peak if peak else None,
    }
    analytic = analytic_forward_counts(run.config, run.config.prompts_per_iteration)
    if analytic:  # in samples the net sees, like the counter (SD3's CFG doubles them)
        analytic = {k: v * run.net_samples_per_sample for k, v in analytic.items()}
    details = {
        "iterations_timed": len(records), "s_per_iter_each": [r.seconds for r in records],
        "rollout_s": median([r.rollout_s for r in records]), "train_s": median([r.train_s for r in records]),
        "reward_s": median([r.reward_s for r in records]),
        "forwards": {"rollout": median([r.rollout_forwards for r in records]),
                     "train_with_grad": median([r.train_forwards for r in records]),
                     "reference": median([r.reference_forwards for r in records]),
                     "other_no_grad": median([r.other_forwards for r in records])},
        "forward_equivalents": fpe,
        "analytic_forwards": analytic,
        "analytic_forward_equivalents": analytic_fpe(analytic, finetune) if analytic else None,
        "images_per_iter": records[0].images if records else None,
        "model_flops_per_iter": model_flops, "recompute_flops_per_iter": recompute_flops,
        "hfu": (model_flops + recompute_flops) / s_per_iter / peak if peak else None,
        "skipped_updates": sum(1 for r in records if r.skipped),
        "settings": settings_of(run.config),
    }
    return figures, details


def settings_of(config) -> dict:
    c = config.algorithm_config
    keys = ("group_size", "rollout_steps", "rollout_solver", "num_anchors", "train_step_fraction", "ref_beta",
            "num_minibatches", "window_size", "flash", "old_policy")
    out = {k: getattr(c, k) for k in keys if hasattr(c, k)}
    if hasattr(c, "trained_steps"):
        out["trained_steps"] = c.trained_steps
    return out


def ratios(figures: dict, details: dict, runs: list[MethodRun]) -> dict:
    """DanceGRPO over Neighbor GRPO (the library's default, and without reference anchoring as in the paper):
    (a) forward-pass equivalents (target >= 5), (b) wall-clock (target >= 4), as the ratio of the medians, the
    median of paired ratios (iterations run back to back), and without the reward's seconds."""
    by_name = {run.name: run for run in runs}
    result = {}
    for ours_name, label in (("neighbor_grpo", "neighbor"), ("neighbor_grpo_no_ref", "neighbor_no_ref")):
        if ours_name not in figures or "dance_grpo" not in figures:
            continue
        ours, dance = details[ours_name], details["dance_grpo"]
        pairs = list(zip(by_name[ours_name].records, by_name["dance_grpo"].records))
        paired = [d.seconds / n.seconds for n, d in pairs]
        analytic = (dance["analytic_forward_equivalents"] / ours["analytic_forward_equivalents"]
                    if dance["analytic_forward_equivalents"] and ours["analytic_forward_equivalents"] else None)
        wall = figures["dance_grpo"]["s_per_iter"] / figures[ours_name]["s_per_iter"]
        fpe = dance["forward_equivalents"] / ours["forward_equivalents"]
        without_reward = (median([d.seconds - d.reward_s for _, d in pairs])
                          / median([n.seconds - n.reward_s for n, _ in pairs]))
        result[f"dance_over_{label}_forward_equivalents"] = {"measured": fpe, "analytic": analytic, "target": 5.0,
                                                             "met": fpe >= 5.0}
        result[f"dance_over_{label}_wall_clock"] = {
            "ratio_of_medians": wall, "median_of_paired": median(paired), "paired_min": min(paired),
            "paired_max": max(paired), "ratio_of_medians_without_reward": without_reward, "target": 4.0,
            "met": wall >= 4.0}
    return result


def print_report(result: dict) -> None:
    flops = result["flops"]
    print(f"\ndevice: {result['device']}")
    print(f"model FLOPs (FlopCounterMode): {flops['forward_at_batch']:.4g} per forward at batch {flops['batch']} = "
          f"{flops['forward_per_sample']:.4g} per sample; measured backward/forward at batch 1: "
          f"{flops['measured_backward_over_forward']:.2f} (counted as {flops['backward_factor']:g})")
    print(f"reward: {result['settings']['reward']} (scored inside every iteration)")
    print(f"FPE/iter: {cost.cost_note(result['settings']['finetune'])}\n")
    print("| method | s/iter | rollout img/s | train samples/s | FPE/iter | reward s | peak mem GB | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in result["methods"].items():
        d = result["details"][name]
        mem = "-" if m["peak_mem_gb"] is None else f"{m['peak_mem_gb']:.2f}"
        mfu = "-" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%"
        print(f"| {name} | {m['s_per_iter']:.4f} | {m['rollout_images_per_s']:.1f} | {m['train_samples_per_s']:.1f} "
              f"| {d['forward_equivalents']:.0f} | {d['reward_s']:.4f} | {mem} | {mfu} |")
    r = result["ratios"]
    for label, name in (("neighbor", "Neighbor GRPO"), ("neighbor_no_ref", "Neighbor GRPO without reference anchoring")):
        if f"dance_over_{label}_wall_clock" not in r:
            continue
        a, b = r[f"dance_over_{label}_forward_equivalents"], r[f"dance_over_{label}_wall_clock"]
        analytic = "-" if a["analytic"] is None else f"{a['analytic']:.2f}x"
        print(f"\nDanceGRPO / {name}, per iteration: {a['measured']:.2f}x forward-pass equivalents "
              f"(analytic {analytic}; target >= 5x), {b['ratio_of_medians']:.2f}x wall-clock (paired median "
              f"{b['median_of_paired']:.2f}x, range {b['paired_min']:.2f}-{b['paired_max']:.2f}; without the reward "
              f"{b['ratio_of_medians_without_reward']:.2f}x; target >= 4x)")


# ---- the command -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="builtin", help="model architecture (default builtin)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: per architecture)")
    parser.add_argument("--group-size", type=int, default=12, help="G, candidates per prompt, every method (12)")
    parser.add_argument("--prompts", type=int, help="prompts per iteration (default: 8 builtin, 1 real models)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per method first")
    parser.add_argument("--finetune", choices=("full", "lora"), help="default: full for the digits models, lora otherwise")
    parser.add_argument("--dtype", choices=("fp32", "bf16"),
                        help="bf16: speed.mixed_precision=bf16 (and bf16 weights for real models); "
                             "default fp32 on CPU, bf16 on GPU")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="speed.compile: torch.compile the velocity net in place")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="methods at their paper's settings (default: all)")
    parser.add_argument("--reward", help="reward name (default: digit_prob for builtin, jpeg_compressibility otherwise)")
    parser.add_argument("--schedule", choices=("auto", "alternate", "sequential"), default="auto",
                        help="alternate methods per iteration (CPU default) or one after another (GPU default)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if the table lacks it")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every method (e.g. neighbor_grpo.rollout_steps=4)")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.arch]
    args.prompts = args.prompts or DEFAULT_PROMPTS[args.arch]
    args.finetune = args.finetune or ("full" if args.arch in ("builtin", "tiny-digits") else "lora")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.schedule == "auto":
        args.schedule = "sequential" if args.device.startswith("cuda") else "alternate"
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    reward = args.reward or DEFAULT_REWARD.get(args.arch, FALLBACK_REWARD)
    if reward == "digit_prob":
        from neighbor_grpo.pretrain import ensure_classifier

        ensure_classifier(progress=False)
    from neighbor_grpo.rewards import build_rewards

    rewards = TimedRewards(build_rewards([{"name": reward}], device=device), sync)
    started = time.perf_counter()

    flops: dict = {}
    extras: dict = {}

    def setup(method: str) -> MethodRun:
        """Build the method; FLOPs are counted on the first model built (recomputation is reported apart)."""
        run, checkpointing = prepare_method(args, method, device, dtype, reward)
        if args.gradient_checkpointing:
            extras["gradient_checkpointing"] = checkpointing or checkpoint_blocks(run.adapter.net)
        if not flops:
            flops.update(count_forward_flops(run, args.prompts, args.group_size))
            flops["backward_factor"] = cost.backward_factor(args.finetune)
        run.net_samples_per_sample = run.reference.net_samples_per_sample = flops["net_samples_at_batch"] / flops["batch"]
        return run

    if args.schedule == "sequential":  # one model resident at a time: clean peak memory, big models fit
        runs = []
        for name in args.methods:
            runs.append(setup(name))
            time_method(runs[-1], rewards, sync, device, args.warmup, args.iters)
            release(runs[-1], cuda)
    else:
        runs = [setup(name) for name in args.methods]
        time_alternating(runs, rewards, sync, device, args.warmup, args.iters)
    peak_tflops, peak_source = bf16_peak_tflops(device, args.peak_tflops)
    figures, details = {}, {}
    for run in runs:
        figures[run.name], details[run.name] = summarize(run, flops["forward_per_sample"], peak_tflops, args.finetune,
                                                         args.gradient_checkpointing)
    flops.update(peak_tflops_bf16_dense=peak_tflops, peak_source=peak_source)
    result = {
        "device": device_description(device),
        "methods": figures,
        "ratios": ratios(figures, details, runs),
        "flops": flops,
        "settings": {"arch": args.arch, "resolution": args.resolution, "group_size": args.group_size,
                     "prompts_per_iteration": args.prompts, "iters": args.iters, "warmup": args.warmup,
                     "finetune": args.finetune, "dtype": args.dtype, "schedule": args.schedule,
                     "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
                     "reward": reward, "overrides": list(args.set), "seed": args.seed, **extras},
        "details": details,
        "definitions": DEFINITIONS,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(),
                        "command": ["benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]},
        "wall_clock_s": time.perf_counter() - started,
    }
    print_report(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
