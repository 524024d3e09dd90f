"""`plan(config, gpus, gpu, mfu)`: peak memory per GPU with its breakdown, FLOPs per iteration by phase, and the
predicted seconds per iteration, for the configured run and every baseline at its paper settings, without weights
and without a GPU (docs/planning.md).

The iteration is composed from the algorithm's own `call_schedule` (its velocity-net calls, common.Phase) plus the
VAE decode and the rewards of the rollout's samples; each call is traced once at its shape (trace.py) and the
persistent memory comes from memory.py. Phases run one after another, so the peak is the largest phase's
activations on top of what persists.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from neighbor_grpo.plan import memory
from neighbor_grpo.plan.bounds import DoesNotFit, check_lower_bound, shape_lower_bound
from neighbor_grpo.plan.models import ModelSpec, resolve_model
from neighbor_grpo.plan.rewards import reward_estimate
from neighbor_grpo.plan.trace import PLAN_PROMPT, Trace, make_traceable, meta_adapter, trace_decode, trace_velocity
from neighbor_grpo.plan.persistent import cached_prompts, gpu_dtype, held_peak, persistent_memory, phase_peak  # noqa: F401
from neighbor_grpo.plan.gpus import GIB, GPUS, MARGIN, allowance_bytes, gpu_spec  # noqa: F401 (the tests and report use them here)


# An editing model's planned prompt carries this as its source image: a source at the output's aspect ratio
PLANNED_SOURCE = "<a source image at the output's aspect ratio>"


class Tracer:
    """The traced models and calls of one plan invocation, each built or traced once (FLUX takes 15-30 s a trace)."""

    def __init__(self, model: ModelSpec, progress=None):
        self.model = model
        self.progress = progress or (lambda message: None)
        self.models: dict = {}
        self.traces: dict = {}

    def traced_model(self, config):
        from neighbor_grpo.training.parts import lora_targets, load_model

        key = model_key(config)
        if key not in self.models:
            self.progress(f"building {self.model.name} ({describe_key(key)})")
            if self.model.kind == "builtin":
                adapter = load_model(self.model.name, "cpu", progress=False, options=config.model)
            else:
                options = {k: v for k, v in dataclasses.asdict(config.model).items() if k not in ("path", "dtype", "height", "width")}
                adapter = meta_adapter(self.model.arch, self.model.spec, image_size(config, self.model), gpu_dtype(config), options)
            lora = None
            if config.optim.finetune == "lora":
                lora = {"rank": config.optim.lora_rank, "alpha": config.optim.lora_alpha,
                        "targets": lora_targets(config, adapter)}
            prompt = config.prompts.train[0] if config.prompts.train else PLAN_PROMPT  # the built-in model knows '0'..'9'
            if self.model.edits and not hasattr(prompt, "image"):  # the stand-in features never open the image
                from neighbor_grpo.config.prompts import EditPrompt

                prompt = EditPrompt(prompt, PLANNED_SOURCE)
            master = master_weights(config, next(adapter.net.parameters()).dtype)
            self.models[key] = make_traceable(adapter, lora, config.speed.gradient_checkpointing, prompt, master)
        return self.models[key]

    def call(self, config, kind: str, network: str, grad: bool, batch: int, exact: bool) -> Trace:
        """The trace of one call; `exact` False reuses a trace of the same call at another batch, scaled."""
        from neighbor_grpo.training.speed import compute_precision

        traced = self.traced_model(config)
        precision = compute_precision(config.speed.mixed_precision, traced.master_weights)
        network = "reference" if network == "reference" else "policy"  # other networks: copies of the policy
        base = (model_key(config), kind, network, grad, precision)
        if (*base, batch) in self.traces:
            return self.traces[(*base, batch)]
        if not exact:
            near = [k for k in self.traces if k[:-1] == base]
            if near:
                return self.traces[min(near, key=lambda k: abs(k[-1] - batch))].scaled(batch)
        what = "VAE decode" if kind == "decode" else f"{network} {'forward+backward' if grad else 'forward'}"
        self.progress(f"tracing {what} at batch {batch}")
        if kind == "decode":
            trace = trace_decode(traced, batch)
        else:
            trace = trace_velocity(traced, batch, grad, network, precision)
        self.progress(f"  {trace.flops / 1e12:.2f} TFLOP, peak {trace.peak_bytes / GIB:.2f} GiB, {trace.seconds:.1f} s")
        self.traces[(*base, batch)] = trace
        return trace


def model_key(config) -> tuple:
    o = config.optim
    lora = (o.lora_rank, o.lora_alpha, tuple(o.lora_targets)) if o.finetune == "lora" else None
    m = config.model
    return (lora, config.speed.gradient_checkpointing, m.dtype, m.height, m.width, m.cfg_scale, m.forward_batch_size,
            m.decode_batch_size, m.max_sequence_length, m.vae_tiling, m.num_frames)


def describe_key(key: tuple) -> str:
    return f"{'LoRA' if key[0] else 'full'}, checkpointing {'on' if key[1] else 'off'}"


def master_weights(config, loaded: torch.dtype) -> bool:
    """Whether the run on a CUDA GPU keeps fp32 master weights for a net loaded in `loaded` (training.speed)."""
    from neighbor_grpo.training.speed import keeps_master_weights

    return keeps_master_weights(config.model.dtype, "cuda", config.optim.finetune, loaded)


def image_size(config, model: ModelSpec) -> tuple[int, int]:
    """(height, width) in pixels: model.height / model.width (one of them alone: square), else the model's default
    (Wan's 480 x 832 videos, 1024 px images)."""
    height, width = config.model.height, config.model.width
    default = (480, 832) if model.video else (1024, 1024)
    if not height and not width:
        return default
    return (height or width, width or height)


def resolution(config, model: ModelSpec):
    """The plan's `resolution`: the side of a square image, else "HEIGHTxWIDTH"."""
    height, width = image_size(config, model)
    return height if height == width else f"{height}x{width}"


def video_frames(adapter) -> int:
    """Frames per sample: a video adapter's (Wan) num_frames, 1 for an image."""
    return adapter.num_frames() if hasattr(adapter, "num_frames") else 1


def local_prompts(prompts: int, gpus: int) -> tuple[int, float]:
    """Prompts one process rolls out, and the share of them it holds when a group is split over processes."""
    if prompts >= gpus:
        return math.ceil(prompts / gpus), 1.0
    return 1, prompts / gpus


def per_chunk(prompts: int, limit: int | None) -> int:
    return prompts if not limit else min(limit, prompts)


def schedule(config, prompts: int):
    from neighbor_grpo.algorithms import ALGORITHMS

    algorithm = ALGORITHMS[config.algorithm](config.algorithm_config, seed=config.seed)
    if not hasattr(algorithm, "call_schedule"):
        raise ValueError(f"algorithm {config.algorithm!r} declares no call_schedule(prompts); the planner needs it")
    return algorithm, algorithm.call_schedule(prompts, rollout_chunk=config.speed.rollout_chunk,
                                              micro_batch=config.speed.micro_batch)


def plan_core(config, tracer: Tracer, gpus: int, gpu: str, mfu: float, exact: bool = True) -> dict:
    """One configuration's plan (no baselines, no fit options)."""
    check_gpus_fit_batch(config, gpus)
    memory_bytes, peak_flops = gpu_spec(gpu)
    prompts, share = local_prompts(config.prompts_per_iteration, gpus)
    algorithm, phases = schedule(config, prompts)
    traced = tracer.traced_model(config)
    group = config.algorithm_config.group_size
    samples = max(1, round(prompts * group * share))
    height, width = image_size(config, tracer.model) if tracer.model.kind == "diffusers" else (0, 0)
    frames = video_frames(traced.adapter)  # a video's decoded frames are each an image, scored by image rewards
    bound = shape_lower_bound(config.algorithm, config.algorithm_config.rollout_steps, samples, traced.adapter.latent_shape(),
                              height, width, tracer.model.spec.get("transformer"), torch.finfo(gpu_dtype(config)).bits // 8,
                              frames)
    check_lower_bound(bound, memory_bytes, MARGIN, allowance_bytes(gpus))  # before any trace: never allocate petabytes
    flops, peaks, calls, saved = {}, {}, {}, 0
    for phase in phases:
        n = max(1, round(phase.samples * share))
        batch = max(1, min(n, round(phase.batch * share)))
        trace = tracer.call(config, "velocity", phase.network, phase.grad, batch, exact)
        flops[phase.name] = flops.get(phase.name, 0) + trace.flops * n / batch
        peaks[phase.name] = max(peaks.get(phase.name, (0, 0)), (held_peak(trace, phase.held), trace.grad_bytes))
        calls[phase.name] = calls.get(phase.name, 0) + n
        if phase.grad:
            saved = max(saved, trace.forward_bytes * phase.held)
    # a no-grad call of another network inside the loss (the reference, an algorithm's own network) runs while the
    # with-grad passes' saved activations are alive; the rollout and an old-policy recompute run before the loss
    for phase in phases:
        if not phase.grad and phase.name != "rollout" and phase.network != "policy":
            peak, grads = peaks[phase.name]
            peaks[phase.name] = (peak + saved, grads)
    # the iteration decodes (and scores) chunk by chunk (speed.rollout_chunk) and keeps every chunk's images
    chunk = max(1, min(samples, round(per_chunk(prompts, config.speed.rollout_chunk) * group * share)))
    decode = tracer.call(config, "decode", "vae", False, chunk, exact)
    images = memory.image_bytes(samples * frames, height, width) if height else 0
    flops["decode"] = decode.flops * samples / chunk
    peaks["decode"] = (decode.peak_bytes + images * (samples - chunk) // samples, 0)
    rewards = [reward_estimate(r.name, r.kwargs) for r in config.rewards]
    flops["reward"] = sum(r.flops_per_image for r in rewards) * samples * frames
    peaks["reward"] = (images + sum(r.activation_bytes for r in rewards), 0)
    persistent = persistent_memory(config, traced, tracer.model, algorithm, gpus, samples)
    peak_phase, peak = phase_peak(persistent, peaks, config, traced.adapter.net, gpus)
    total_flops = sum(flops.values())
    no_grad = sum(n for p, n in calls.items() if not any(ph.grad for ph in phases if ph.name == p))
    with_grad = sum(calls.values()) - no_grad
    from neighbor_grpo.training.cost import forward_equivalents

    fe = forward_equivalents(no_grad, with_grad, config.optim.finetune)
    seconds = total_flops / (peak_flops * mfu)
    fits = peak * MARGIN + allowance_bytes(gpus) <= memory_bytes
    return {"algorithm": config.algorithm, "prompts_per_gpu": prompts * share, "samples_per_gpu": samples,
            "frames": frames if hasattr(traced.adapter, "num_frames") else None,
            "phases": [dataclasses.asdict(p) for p in phases],
            "flops_per_gpu": {k: float(v) for k, v in flops.items()}, "flops_total_per_gpu": float(total_flops),
            "flops_all_gpus": float(total_flops * gpus),
            "forward_equivalents_per_sample": fe / samples,
            "seconds_per_iteration": seconds,
            "memory_gib": {**{k: v / GIB for k, v in persistent.items()},
                           "activations_peak": (peak - sum(persistent.values())) / GIB,
                           "peak_phase": peak_phase, "total": peak / GIB},
            "trainable_parameters": sum(p.numel() for p in traced.adapter.net.parameters() if p.requires_grad),
            "fits": bool(fits), "gpu_memory_gib": memory_bytes / GIB}


def check_gpus_fit_batch(config, gpus: int) -> None:
    """What the trainer refuses, the planner refuses: more GPUs than a prompt's candidates can be spread over."""
    from neighbor_grpo.parallel.distributed import Processes, check_batch_fits

    try:
        check_batch_fits(config.prompts_per_iteration, Processes(0, gpus), config.algorithm_config.group_size,
                         f"{config.algorithm}.group_size")
    except ValueError as error:
        raise ValueError(f"--gpus {gpus}: {str(error).replace('launch fewer processes', 'plan fewer --gpus')}") from None


def stderr_progress(message: str) -> None:
    print(f"ngrpo plan: {message}", file=sys.stderr, flush=True)


# ---- the public entry: the run, its baselines, and what would make it fit ----------------------------------------

def with_overrides(config, overrides: list[str]):
    """The config with key=value overrides applied and validated (as `ngrpo train` would read them)."""
    from neighbor_grpo.config.train_config import apply_overrides, from_dict, to_dict, validate

    changed = from_dict(type(config), apply_overrides(to_dict(config), overrides))
    validate(changed)
    return changed


def baselines(config, tracer: Tracer, gpus: int, gpu: str, mfu: float) -> list[dict]:
    """Every method of compare.PAPER_SETTINGS on the same model, resolution and speed settings; the cost ratio is
    per-iteration FLOPs over Neighbor GRPO's at its paper settings."""
    from neighbor_grpo.bench.compare import PAPER_SETTINGS, REFERENCE_METHOD

    rows = []
    for method, settings in PAPER_SETTINGS.items():
        try:
            result = plan_core(with_overrides(config, settings), tracer, gpus, gpu, mfu, exact=False)
        except ValueError as error:  # e.g. an algorithm without a call schedule yet
            rows.append({"method": method, "error": str(error)})
            continue
        rows.append({"method": method, "flops_per_gpu": result["flops_total_per_gpu"],
                     "seconds_per_iteration": result["seconds_per_iteration"],
                     "forward_equivalents_per_sample": result["forward_equivalents_per_sample"],
                     "peak_gib": result["memory_gib"]["total"], "fits": result["fits"]})
    anchor = next((r for r in rows if r["method"] == REFERENCE_METHOD and "error" not in r), None)
    for row in rows:
        if anchor and "error" not in row:
            row["cost_ratio_vs_neighbor_grpo"] = row["flops_per_gpu"] / anchor["flops_per_gpu"]
    return rows


def fit_candidates(config, gpus: int, diffusers: bool) -> list[tuple[str, list[str], int]]:
    """(label, overrides, gpus) of each option that lowers memory and is not already on."""
    options = []
    if config.optim.finetune == "full":
        options.append(("LoRA", ["optim.finetune=lora"], gpus))
    if not config.speed.gradient_checkpointing:
        options.append(("gradient checkpointing", ["speed.gradient_checkpointing=true"], gpus))
    if gpu_dtype(config) == torch.float32:
        options.append(("bf16 weights", ["model.dtype=bfloat16"], gpus))
    elif diffusers and master_weights(config, gpu_dtype(config)):
        options.append(("pure bf16 weights and AdamW state (loses updates below 2^-9 of a weight)",
                        ["model.dtype=bfloat16"], gpus))
    if config.speed.micro_batch != 1:
        options.append(("micro-batch of 1 prompt", ["speed.micro_batch=1"], gpus))
    if config.speed.rollout_chunk != 1:
        options.append(("roll out 1 prompt at a time", ["speed.rollout_chunk=1"], gpus))
    if diffusers and config.model.forward_batch_size not in (1, 2, 3, 4):  # the adapters' own chunking
        options.append(("velocity calls of at most 4 samples", ["model.forward_batch_size=4"], gpus))
    for flag in ("offload_text_encoders", "prompt_cache_on_cpu", "offload_vae"):
        if not getattr(config.model, flag):
            options.append((f"model.{flag}", [f"model.{flag}=true"], gpus))
    if config.speed.optimizer == "adamw":
        options.append(("8-bit AdamW", ["speed.optimizer=adamw8bit"], gpus))
    for more in (2, 4, 8, 16, 32, 64):
        if more > gpus:
            options.append((f"FSDP over {more} GPUs", ["speed.parallel=fsdp"], more))
    return options


def combined_option(config, tracer: Tracer, candidates: list, gpus: int, gpu: str, mfu: float,
                    found: list[dict]) -> list[dict]:
    """Where no single option fits on these GPUs, every memory-lowering option on them at once (the usual answer
    at FLUX scale: checkpointing, micro-batches and rollout chunks of one prompt, offloads), if that fits."""
    if any(option["gpus"] == gpus for option in found):
        return []
    singles = [(label, overrides) for label, overrides, n in candidates if n == gpus and label != "LoRA"]
    if len(singles) < 2:
        return []
    overrides = [o for _, group in singles for o in group]
    try:
        changed = plan_core(with_overrides(config, overrides), tracer, gpus, gpu, mfu, exact=False)
    except ValueError:
        return []
    if not changed["fits"]:
        return []
    return [{"option": "all of: " + ", ".join(label for label, _ in singles), "overrides": overrides, "gpus": gpus,
             "peak_gib": changed["memory_gib"]["total"]}]


def fit_options(config, tracer: Tracer, gpus: int, gpu: str, mfu: float, result: dict) -> list[dict]:
    """Each single option that would make the run fit, with its predicted peak; FSDP only at the fewest GPUs that
    fit. Offloading optimizer state to the CPU is modelled but not supported by the trainer yet."""
    found, fsdp_done = [], False
    candidates = fit_candidates(config, gpus, tracer.model.kind == "diffusers")
    for label, overrides, n in candidates:
        if fsdp_done and label.startswith("FSDP"):
            continue
        try:
            changed = plan_core(with_overrides(config, overrides), tracer, n, gpu, mfu, exact=False)
        except ValueError:
            continue
        if changed["fits"]:
            found.append({"option": label, "overrides": overrides, "gpus": n, "peak_gib": changed["memory_gib"]["total"]})
            fsdp_done = fsdp_done or label.startswith("FSDP")
    found += combined_option(config, tracer, candidates, gpus, gpu, mfu, found)
    offloaded = result["memory_gib"]["total"] - result["memory_gib"]["optimizer_state"]
    if offloaded * MARGIN + allowance_bytes(gpus) / GIB <= result["gpu_memory_gib"]:
        found.append({"option": "optimizer state offloaded to the CPU (not supported by the trainer yet)",
                      "overrides": [], "gpus": gpus, "peak_gib": offloaded})
    return found


def plan(config, gpus: int = 1, gpu: str = "h100-80gb", mfu: float = 0.4, progress=None, tracer=None) -> dict:
    """The plan of `config` (a TrainConfig) on `gpus` GPUs of kind `gpu` at model FLOPs utilisation `mfu`: a
    JSON-able dict with the run's per-GPU memory breakdown, FLOPs by phase, seconds per iteration, every baseline
    side by side and, when it does not fit, the options that would make it fit. `tracer` (a Tracer of the same
    model) shares its traces between several plans."""
    check_torch()
    if gpus < 1:
        raise ValueError(f"--gpus: expected an integer >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu: expected a share in (0, 1], got {mfu}")
    memory_bytes, peak_flops = gpu_spec(gpu)
    model = resolve_model(config.model.path, dataclasses.asdict(config.model))
    tracer = tracer if tracer is not None and tracer.model == model else Tracer(model, progress)  # same spec too
    out = {"model": model.name, "gpu": gpu, "gpus": gpus, "mfu": mfu, "gpu_peak_tflops": peak_flops / 1e12,
           "allowance_gib": allowance_bytes(gpus) / GIB, "margin": MARGIN,
           "resolution": resolution(config, model) if model.kind == "diffusers" else None,
           "finetune": config.optim.finetune}
    try:
        result = plan_core(config, tracer, gpus, gpu, mfu)
    except DoesNotFit as error:  # found from shapes: nothing traced, no baselines (they would not fit either)
        return {**out, "algorithm": config.algorithm, "fits": False, "gpu_memory_gib": memory_bytes / GIB, "does_not_fit":
                str(error), "lower_bound_gib": {name: nbytes / GIB for name, nbytes in error.terms.items()}}
    out.update(result)
    out["baselines"] = baselines(config, tracer, gpus, gpu, mfu)
    out["fit_options"] = [] if result["fits"] else fit_options(config, tracer, gpus, gpu, mfu, result)
    out["unknown_rewards"] = [r.name for r in config.rewards if not reward_estimate(r.name, r.kwargs).known]
    return out


def check_torch() -> None:
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        raise RuntimeError(f"ngrpo plan needs torch >= 2.6 (fake tensors of meta-built models); this is torch "
                           f"{torch.__version__}")
