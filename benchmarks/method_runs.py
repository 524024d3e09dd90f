"""Each method's training iterations, built and timed for the throughput benchmark: its config at its paper's
settings, its own model copy and training parts, and one record per timed iteration (seconds by phase, forwards)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from neighbor_grpo.bench.compare import LIBRARY_DEFAULTS, MAIN_TABLE, PAPER_SETTINGS
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import CountedReference
from neighbor_grpo.training.iteration import ModelCallCounter, train_iteration, training_counter
from neighbor_grpo.models.architectures import build_adapter
from neighbor_grpo.training.parts import build_training_parts

# Every method at its paper's settings; Neighbor GRPO also without the library's reference anchoring (the paper
# has none: its cost figures are for the leaping-policy loss alone).
METHODS: dict[str, list[str]] = {
    "neighbor_grpo": LIBRARY_DEFAULTS,
    "neighbor_grpo_no_ref": PAPER_SETTINGS["neighbor_grpo"],  # the paper's settings: ref_beta 0
    **{name: PAPER_SETTINGS[name] for name in MAIN_TABLE if not name.startswith("neighbor_grpo")},
}


# ---- counting what an iteration does -----------------------------------------------------------------------------

class TimedRewards:
    """The rewards with the seconds spent scoring (the reward is part of an iteration; this says how much)."""

    def __init__(self, rewards, sync):
        self.rewards, self.sync, self.seconds = rewards, sync, 0.0

    def score(self, images, prompts, **inputs):  # source images, group ids: passed through as they come
        self.sync()
        tick = time.perf_counter()
        scores = self.rewards.score(images, prompts, **inputs)
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


# ---- running iterations ------------------------------------------------------------------------------------------

def method_overrides(args, method: str, device: str, reward: str) -> list[str]:
    """The method at its paper's settings, with the benchmark's shared settings on top (every algorithm section
    gets the same group size, so all methods score the same number of images per iteration)."""
    shared = [f"device={device}", f"prompts_per_iteration={args.prompts}", f"optim.finetune={args.finetune}",
              f"seed={args.seed}", f"rewards=[{{name: {reward}}}]"]
    shared += [f"{section}.group_size={args.group_size}" for section in ("neighbor_grpo", "flow_grpo", "dance_grpo", "mix_grpo")]
    if args.dtype == "bf16":  # bf16 weights (built so) and the trainer's bf16 autocast; model.dtype=bfloat16 keeps
        # a full fine-tune in pure bf16 as measured so far (at `auto` on CUDA it would get fp32 master weights)
        shared += ["speed.mixed_precision=bf16", "model.dtype=bfloat16"]
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
    counter = training_counter(adapter, parts)  # CountedReference leaves out what this counter saw of the reference
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
