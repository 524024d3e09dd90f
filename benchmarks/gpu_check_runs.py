"""The GPU check's runs: one method at one fine-tuning mode, its iterations timed under a time budget, peak memory
measured, and FLOPs per phase turned into MFU. Built on method_runs.py and throughput.py (benchmarks/gpu_check.py)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from method_runs import MethodRun, run_iteration  # noqa: E402  (benchmarks/ is on sys.path: gpu_check.py)
from neighbor_grpo.training.cost import backward_factor, config_schedule, schedule_forward_counts


class Budget:
    """Wall-clock seconds the whole check may take, counted from `started` (the install included): an iteration or
    a run starts only when its estimated length still fits; every refusal is recorded."""

    def __init__(self, seconds: float, started: float):
        self.seconds, self.started = seconds, started
        self.cuts: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    def cut(self, what: str, estimate_s: float) -> None:
        self.cuts.append(f"{what}: estimated {estimate_s:.1f} s, {max(self.left(), 0.0):.1f} s of the budget left")


@dataclass
class Measured:
    """A run's iterations: the timed ones, or the warm-up ones when the budget cut every timed iteration."""

    records: list = field(default_factory=list)
    reserved_peaks: list = field(default_factory=list)   # torch.cuda.max_memory_reserved per kept iteration
    warmup_records: list = field(default_factory=list)
    warmup_reserved: list = field(default_factory=list)
    cut_by_budget: bool = False
    measured_on_warmup: bool = False


def resident_tensors(run: MethodRun) -> list[torch.Tensor]:
    """The tensors a run holds between iterations (the CPU tracker's baseline): every module of the pipeline, the
    policy (LoRA included), frozen copies, the algorithm's networks, the optimizer state."""
    modules = [run.adapter.net, getattr(run.parts, "reference_net", None), *getattr(run.parts, "algorithm_nets", {}).values()]
    pipeline = getattr(run.adapter, "pipeline", None)
    if pipeline is not None:
        modules += [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())]
    tensors += [v for state in run.parts.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def iteration_tracker(resident: list[torch.Tensor]):
    """LiveBytes starting at the resident bytes, which never counts their storages again (an in-place op on a
    weight or an optimizer moment returns an existing storage)."""
    from neighbor_grpo.plan.live_bytes import LiveBytes, tensor_bytes

    return LiveBytes(tensor_bytes(resident), existing=resident)


def measured_iteration(run: MethodRun, rewards, sync, device: str, track_cpu_memory: bool):
    """One train_iteration and its peak memory: on CUDA the caching allocator's own peaks (run_iteration resets
    them); on CPU, when asked, peak live tensor bytes (LiveBytes over the resident tensors; it slows the iteration
    several-fold, so only untimed iterations are tracked)."""
    if device.startswith("cuda"):
        record = run_iteration(run, rewards, sync, device)
        return record, torch.cuda.max_memory_reserved(device)
    if not track_cpu_memory:
        return run_iteration(run, rewards, sync, device), None
    with iteration_tracker(resident_tensors(run)) as tracker:
        record = run_iteration(run, rewards, sync, device)
    record.peak_mem_bytes = tracker.peak
    return record, None


def time_run(run: MethodRun, label: str, rewards, sync, device: str, warmup: int, iters: int, budget: Budget,
             first_estimate_s: float | None) -> Measured:
    """Warm-up, then timed iterations, each started only if the last one's length (the first: `first_estimate_s`)
    fits in the budget; the first iteration of the whole check always runs (first_estimate_s None). On CPU the first
    iteration measures memory and is never timed (warm-up at least 1)."""
    measured = Measured()
    if not device.startswith("cuda"):
        warmup = max(warmup, 1)
    estimate = first_estimate_s
    for index in range(warmup + iters):
        if estimate is not None and not budget.allows(estimate):
            budget.cut(f"{label} iteration {index + 1} of {warmup + iters}", estimate)
            measured.cut_by_budget = True
            break
        record, reserved = measured_iteration(run, rewards, sync, device, track_cpu_memory=index == 0)
        if index < warmup:
            measured.warmup_records.append(record)
            measured.warmup_reserved.append(reserved)
        else:
            measured.records.append(record)
            measured.reserved_peaks.append(reserved)
        estimate = record.seconds
    if not measured.records and measured.warmup_records:
        measured.records, measured.reserved_peaks = measured.warmup_records, measured.warmup_reserved
        measured.measured_on_warmup = True
    run.records = measured.records
    return measured


# ---- FLOPs per phase and MFU ----------------------------------------------------------------------------------------

def phase_flops(record, flops_per_sample: float, finetune: str) -> tuple[float, float]:
    """Model FLOPs of the rollout (no-grad forwards until the rollout is scored) and of the training phase after it
    (with-grad forwards and their backward, (1 + b) forwards each; reference and old-policy forwards)."""
    rollout = record.rollout_forwards * flops_per_sample
    train = ((1.0 + backward_factor(finetune)) * record.train_forwards + record.reference_forwards
             + record.other_forwards) * flops_per_sample
    return rollout, train


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def phase_figures(records, flops_per_sample: float, finetune: str, peak_tflops: float | None) -> dict:
    """Achieved model TFLOP/s and MFU of the rollout and the training phase (medians over the iterations)."""
    out = {}
    for index, phase in enumerate(("rollout", "train")):
        rates = []
        for record in records:
            seconds = record.rollout_s if phase == "rollout" else record.train_s
            flops = phase_flops(record, flops_per_sample, finetune)[index]
            if seconds > 0 and flops > 0:
                rates.append(flops / seconds / 1e12)
        achieved = median(rates)
        out[f"achieved_tflops_{phase}"] = achieved
        out[f"mfu_{phase}"] = achieved / peak_tflops if achieved is not None and peak_tflops else None
    return out


def memory_figures(measured: Measured, device: str) -> dict:
    """Peak memory over every iteration the run made (warm-up included: the allocator's peak is reached in the
    first one), in GB (1e9 bytes), and what was measured."""
    records = [*measured.warmup_records, *measured.records]
    reserved_peaks = [*measured.warmup_reserved, *measured.reserved_peaks]
    allocated = max((r.peak_mem_bytes for r in records if r.peak_mem_bytes is not None), default=None)
    reserved = max((b for b in reserved_peaks if b is not None), default=None)
    cuda = device.startswith("cuda")
    return {
        "peak_memory_allocated_gb": allocated / 1e9 if allocated is not None else None,
        "peak_memory_reserved_gb": reserved / 1e9 if reserved is not None else None,
        "peak_memory_source": ("torch.cuda.max_memory_allocated / max_memory_reserved" if cuda else
                               "CPU: peak live tensor bytes (neighbor_grpo.plan.live_bytes.LiveBytes) in the run's first "
                               "(untimed) iteration, over the resident parameters, buffers and optimizer state; no "
                               "caching allocator, so no reserved figure"),
    }


def estimated_iteration_s(config, prompts: int, finetune: str, flops_per_sample: float | None,
                          achieved_tflops: float | None) -> float | None:
    """A run's first iteration, before it starts: its FLOPs from its algorithm's call schedule (cost.config_schedule)
    at the model FLOP rate the earlier runs achieved. None when either is unknown (the run then starts if time is
    left)."""
    counts = schedule_forward_counts(config_schedule(config, prompts))
    if not flops_per_sample or not achieved_tflops:
        return None
    forwards = counts["rollout"] + counts["reference"] + counts["other"] + (1 + backward_factor(finetune)) * counts["train"]
    return forwards * flops_per_sample / (achieved_tflops * 1e12)


def overall_tflops(records, flops_per_sample: float, finetune: str) -> float | None:
    rates = [sum(phase_flops(r, flops_per_sample, finetune)) / r.seconds / 1e12 for r in records if r.seconds > 0]
    return median(rates)


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
