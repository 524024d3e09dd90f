"""The planner's side of the GPU check: its prediction for the same settings as a measured run, the decision whether
a full fine-tune is run at all, and the planner's name for this GPU (benchmarks/gpu_check.py)."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import torch

# neighbor_grpo.plan.hardware's card names -> the planner's GPU names (memory decides between the A100 sizes)
PLANNER_GPUS = (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100-80gb"))
DEFAULT_PLANNER_GPU = "h100-80gb"


def planner_gpu(device: str) -> str:
    """The planner's name for this device's card; the H100 80 GB for a CPU or an unknown card."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return DEFAULT_PLANNER_GPU
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for key, planner_name in PLANNER_GPUS:
        if key in name:
            if key == "a100" and torch.cuda.get_device_properties(torch.device(device)).total_memory < 60e9:
                return "a100-40gb"
            return planner_name
    return DEFAULT_PLANNER_GPU


def planner_model_path(arch: str, folder: Path) -> str:
    """model.path naming the measured architecture to the planner: a shipped one (`arch:flux-dev`), or, for the tiny
    FLUX the planner does not ship, a diffusers folder holding only its config.json files (written into `folder`)."""
    from neighbor_grpo.models.architectures import DIFFUSERS_ARCHS

    if arch == "flux-dev":
        return "arch:flux-dev"
    spec = DIFFUSERS_ARCHS[arch]
    for name, values in (("model_index.json", {"_class_name": "FluxPipeline"}),
                         ("transformer/config.json", spec["transformer"]), ("vae/config.json", spec["vae"])):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(values))
    return str(folder)


def prediction_config(config, model_path: str, text_tokens: int, resolution: int, cuda: bool):
    """The run's config as the planner reads it: the architecture measured, at its resolution, dtype and prompt
    length, and without text encoders on the GPU (the check's stand-ins are cached random embeddings)."""
    import copy

    config = copy.deepcopy(config)
    config.model.path = model_path
    config.model.height = config.model.width = resolution
    config.model.dtype = "bfloat16" if cuda else "float32"
    config.model.max_sequence_length = text_tokens
    config.model.offload_text_encoders = True
    return config


def predict(config, gpus: int, gpu: str, mfu: float) -> tuple[dict | None, str | None]:
    """neighbor_grpo.plan.planner.plan for one config, or None and why not (a planner failure must never lose the
    measurements)."""
    try:
        from neighbor_grpo.plan.planner import plan
    except ImportError as error:
        return None, f"no planner in this checkout (neighbor_grpo.plan.planner.plan: {error})"
    try:
        return json.loads(json.dumps(plan(config, gpus=gpus, gpu=gpu, mfu=mfu), default=str)), None
    except Exception as error:  # noqa: BLE001  (recorded, not hidden: the JSON says why there is no prediction)
        return None, f"plan() failed: {type(error).__name__}: {error}"


def prediction_key(finetune: str, gpus: int, gpu: str) -> str:
    """'lora@1xh200': the plan of one fine-tuning mode (every method: the plan's baselines), on N GPUs of a kind."""
    return f"{finetune}@{gpus}x{gpu}"


def _plan_worker(jobs: list, mfu: float, results) -> None:
    for key, config, gpus, gpu in jobs:
        results.put((key, *predict(config, gpus, gpu, mfu)))


class Predictions:
    """The planner's predictions for the check's runs: read from a file made beforehand (`--predictions`, written by
    `--predict-only`), else computed in the order the jobs were given, inline (`background` false: the CPU check)
    or in one spawned process (the GPU check: the planner's CPU tracing overlaps the GPU runs instead of eating
    the time budget). `get` waits at most `timeout` seconds; `close` stops a planner still running."""

    def __init__(self, jobs: list, mfu: float, saved: dict | None = None, background: bool = False):
        self.done: dict = {key: tuple(answer) for key, answer in (saved or {}).items() if answer[0] is not None}
        self.jobs = [job for job in jobs if job[0] not in self.done]
        self.mfu, self.process, self.results = mfu, None, None
        if background and self.jobs:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            self.results = context.Queue()
            self.process = context.Process(target=_plan_worker, args=(self.jobs, mfu, self.results), daemon=True)
            self.process.start()

    def get(self, key: str, timeout: float) -> tuple[dict | None, str | None]:
        if key in self.done:
            return self.done[key]
        if self.process is None:
            if timeout <= 0:
                return None, (f"the time budget was spent before the planner ran {key} (precompute with "
                              "--predict-only and pass --predictions)")
            for job in self.jobs:
                if job[0] == key:
                    self.done[key] = predict(job[1], job[2], job[3], self.mfu)
                    return self.done[key]
            return None, f"no prediction was asked for {key}"
        deadline = time.perf_counter() + max(timeout, 0.0)
        while key not in self.done:
            try:
                found, *answer = self.results.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                return None, (f"the planner had not finished {key} when the time budget ran out (precompute with "
                              "--predict-only and pass --predictions)")
            self.done[found] = tuple(answer)
        return self.done[key]

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.process = None


def prediction_summary(plan: dict | None, method: str, key: str) -> dict | None:
    """The figures a measurement is compared with, for `method`: from the plan itself when it is that method's
    (with FLOPs and memory by phase), else from its row in the plan's baselines (same model and settings, the
    method's paper settings). Memory in GiB as the planner gives it, and in GB (1e9 bytes) like the measurements."""
    if plan is None:
        return None
    if plan.get("algorithm") == method:
        figures = {"s_per_iter": plan["seconds_per_iteration"], "peak_memory_gib": plan["memory_gib"]["total"],
                   "fits": plan["fits"], "flops_per_iter": plan["flops_total_per_gpu"],
                   "flops_by_phase": plan["flops_per_gpu"], "memory_gib": plan["memory_gib"],
                   "source": f"plans[{key!r}]"}
    else:
        row = next((r for r in plan.get("baselines", []) if r.get("method") == method and "error" not in r), None)
        if row is None:
            return None
        figures = {"s_per_iter": row["seconds_per_iteration"], "peak_memory_gib": row["peak_gib"], "fits": row["fits"],
                   "flops_per_iter": row["flops_per_gpu"], "flops_by_phase": None, "memory_gib": None,
                   "source": f"plans[{key!r}].baselines ({method} at its paper settings)"}
    figures["peak_memory_gb"] = figures["peak_memory_gib"] * 2**30 / 1e9
    return figures


def comparison(measured: dict | None, predicted: dict | None) -> dict | None:
    """Measured over predicted: seconds per iteration, peak memory (allocated, the planner's live-tensor peak), and
    velocity-net FLOPs with checkpointing's recomputation (the planner counts the FLOPs the GPU executes)."""
    if not measured or not predicted:
        return None
    out = {"s_per_iter": measured["s_per_iter"] / predicted["s_per_iter"],
           "peak_memory": (measured["peak_memory_allocated_gb"] / predicted["peak_memory_gb"]
                           if measured["peak_memory_allocated_gb"] else None)}
    phases = predicted.get("flops_by_phase")
    if phases:
        velocity = sum(v for k, v in phases.items() if k not in ("decode", "reward"))
        out["velocity_flops"] = measured["velocity_flops_executed"] / velocity if velocity else None
    return out


def mfu_from_plan(measured: dict | None, predicted: dict | None, peak_tflops: float | None) -> dict | None:
    """MFU per phase with the planner's FLOPs (what the GPU executes: checkpointing's recomputation, the VAE decode
    and the reward in the rollout) over the measured phase seconds."""
    phases = (predicted or {}).get("flops_by_phase")
    if not measured or not phases or not peak_tflops:
        return None
    rollout = sum(v for k, v in phases.items() if k in ("rollout", "decode", "reward"))
    train = sum(v for k, v in phases.items() if k not in ("rollout", "decode", "reward"))
    peak = peak_tflops * 1e12
    return {"rollout": rollout / measured["rollout_s"] / peak if measured["rollout_s"] else None,
            "train": train / measured["train_s"] / peak if measured["train_s"] else None}


def full_finetune_gate(prediction: dict | None, method: str, args, cuda: bool) -> str | None:
    """Why a full fine-tune is not run here, or None to run it: only where the planner predicts it fits on this
    one GPU (the check runs one process; FSDP over several GPUs is the planner's prediction only)."""
    if args.force_full:
        return None
    summary = prediction_summary(prediction, method, "")
    if summary is None or summary["fits"] is None:
        if not cuda:
            return None  # the tiny CPU model fits anywhere
        return "no planner prediction that a full fine-tune fits on this GPU (pass --force-full to try anyway)"
    if summary["fits"]:
        return None
    peak = f"{summary['peak_memory_gib']:.1f} GiB"
    if prediction.get("gpu_memory_gib"):  # the planner's rule: peak x margin + allowance <= the GPU's memory
        peak += (f" x {prediction.get('margin')} + {prediction.get('allowance_gib')} GiB allowance > "
                 f"{prediction['gpu_memory_gib']} GiB")
    where = f"{args.gpus} GPUs with FSDP are predicted separately (predicted_fsdp); " if args.gpus > 1 else ""
    return (f"the planner predicts a full fine-tune does not fit on one GPU (peak {peak}); {where}"
            "gpu_check runs one process")
