"""The planner's side of the GPU check: its prediction for the same settings as a measured run, the decision whether
a full fine-tune is run at all, and the planner's name for this GPU (benchmarks/gpu_check.py)."""

from __future__ import annotations

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


def predict(config, args, gpu: str, gpus: int) -> tuple[dict | None, str | None]:
    """neighbor_grpo.plan.planner.plan for the run's config, or None and why not (a planner failure must never
    lose the measurements)."""
    try:
        from neighbor_grpo.plan.planner import plan
    except ImportError as error:
        return None, f"no planner in this checkout (neighbor_grpo.plan.planner.plan: {error})"
    try:
        return plan(config, gpus=gpus, gpu=gpu, mfu=args.mfu), None
    except Exception as error:  # noqa: BLE001  (recorded, not hidden: the JSON says why there is no prediction)
        return None, f"plan() failed: {type(error).__name__}: {error}"


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
