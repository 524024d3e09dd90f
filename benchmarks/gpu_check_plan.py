"""The planner's side of the GPU check: its prediction for the same settings as a measured run, the decision whether
a full fine-tune is run at all, and the planner's name for this GPU (benchmarks/gpu_check.py)."""

from __future__ import annotations

import json
import queue
import time

import torch

# neighbor_grpo.hardware's card names -> the planner's GPU names (memory decides between the A100 sizes)
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


def prediction_config(config, arch: str, resolution: int, cuda: bool):
    """The run's config as the planner reads it: the architecture it runs (a name the planner ships) at the
    resolution and dtype measured."""
    import copy

    config = copy.deepcopy(config)
    config.model.path = arch
    config.model.height = config.model.width = resolution
    config.model.dtype = "bfloat16" if cuda else "float32"
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


def prediction_key(label: str, gpus: int, gpu: str) -> str:
    """'neighbor_grpo/lora@1xh200': a run, on how many of which GPU."""
    return f"{label}@{gpus}x{gpu}"


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


def prediction_summary(prediction: dict | None, method: str) -> dict | None:
    """The figures a measurement is compared with: predicted s/iter, peak memory per GPU (GB) and whether it fits,
    FLOPs per phase; the planner's whole answer is kept under `plan`."""
    if prediction is None:
        return None
    entry = prediction.get("algorithms", {}).get(method, prediction)
    return {"s_per_iter": entry.get("s_per_iter"), "peak_memory_gb": entry.get("peak_memory_gb"),
            "fits": entry.get("fits"), "flops": entry.get("flops"), "plan": prediction}


def full_finetune_gate(prediction: dict | None, method: str, args, cuda: bool) -> str | None:
    """Why a full fine-tune is not run here, or None to run it: only where the planner predicts it fits on this
    one GPU (the check runs one process; FSDP over several GPUs is the planner's prediction only)."""
    if args.force_full:
        return None
    summary = prediction_summary(prediction, method)
    if summary is None or summary["fits"] is None:
        if not cuda:
            return None  # the tiny CPU model fits anywhere
        return "no planner prediction that a full fine-tune fits on this GPU (pass --force-full to try anyway)"
    if summary["fits"]:
        return None
    peak = summary["peak_memory_gb"]
    where = f"{args.gpus} GPUs with FSDP are predicted separately (predicted_fsdp); " if args.gpus > 1 else ""
    return (f"the planner predicts a full fine-tune does not fit on one GPU (peak {peak} GB); {where}"
            "gpu_check runs one process")
