"""A short GPU check: Neighbor GRPO and DanceGRPO on a random-initialised FLUX.1-dev transformer, measured beside
the planner's predictions, in one JSON, in at most 4 minutes on one H100/H200 (the install included).

    pip download diffusers==0.42.1 --no-deps -d benchmarks/wheels        # here, once (benchmarks/wheels/ is ignored)
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --wheel benchmarks/wheels --out gpu_check.json   # on the GPU
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --tiny --out gpu_check_tiny.json                 # on a CPU

On a machine that has torch, peft and transformers but not diffusers, `--wheel` (a .whl file or a folder holding
one) is installed with `pip install --no-deps` first (nothing when diffusers already imports). Then, for LoRA and
then full fine-tuning, each method at its paper's settings (compare.PAPER_SETTINGS) runs real training iterations
(iteration.train_iteration, through benchmarks/method_runs.py) of FLUX.1-dev's transformer (its published config,
random weights built on the GPU in bf16, nothing downloaded) at 720 px, G 12, one prompt. The text encoders are
replaced by fixed random prompt embeddings of T5-XXL's and CLIP-L's output shapes (512 x 4096, pooled 768; they run
once per prompt and are cached in training anyway); the VAE is FLUX's VAE config with random weights. Full
fine-tuning runs only where the planner predicts it fits on this GPU. `--budget-s` (default 210) bounds the whole
check: an iteration or a run starts only if its estimate fits in what is left, and the JSON records each cut. The
JSON is rewritten after every run, so a check killed from outside still leaves what it measured.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here: imports and the install are part of the 4 minutes

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check_install import ensure_module  # noqa: E402
from gpu_check_plan import (Predictions, comparison, full_finetune_gate, mfu_from_plan, planner_gpu,  # noqa: E402
                            planner_model_path, prediction_config, prediction_key, prediction_summary)
from gpu_check_report import model_description, print_report, ratios  # noqa: E402
from gpu_check_runs import (Budget, estimated_iteration_s, memory_figures, overall_tflops, phase_figures,  # noqa: E402
                            time_run)

METHODS = ("neighbor_grpo", "dance_grpo")
DEFINITIONS = {
    "s_per_iter": "median wall-clock seconds of the kept iterations (warm-up excluded unless the budget cut every "
                  "timed one: then measured_on_warmup is true)",
    "rollout_images_per_s": "P*G images / rollout seconds (sampling, VAE decode and reward, until the trainer's "
                            "after_rollout hook)",
    "peak_memory_allocated_gb": "CUDA: torch.cuda.max_memory_allocated over the kept iterations (1e9 bytes); CPU: "
                                "peak live tensor bytes (LiveBytes) over the resident tensors",
    "peak_memory_reserved_gb": "CUDA: torch.cuda.max_memory_reserved (the caching allocator's pool); null on CPU",
    "mfu_rollout": "velocity-net FLOPs of the rollout (FlopCounterMode count per sample x counted forwards) / rollout "
                   "seconds / the card's dense bf16 peak (neighbor_grpo.plan.hardware); the VAE and reward are in the "
                   "seconds but not the FLOPs",
    "mfu_train": "((1 + b) x with-grad forwards + reference + old-policy forwards) x FLOPs per sample / seconds after "
                 "the rollout / peak; b = 1 for LoRA, 2 for a full fine-tune; checkpointing recomputation is not "
                 "model work",
    "mfu": "all model FLOPs of an iteration / s_per_iter / peak",
    "predicted": "neighbor_grpo.plan.planner.plan(config, gpus, gpu, mfu) for the same settings, or null with the "
                 "reason",
}


# ---- the command --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", help="a diffusers .whl (or a folder holding one), installed when diffusers is missing")
    parser.add_argument("--install-target", help="pip --target folder for the wheel (default: this Python's environment)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random FLUX at 32 px instead of FLUX.1-dev (CPU, tests)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (720; --tiny: 32)")
    parser.add_argument("--group-size", type=int, default=12, help="G, candidates per prompt (12)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=("lora", "full"),
                        help="fine-tuning modes, in this order (full runs only where the planner predicts it fits)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations of the check's first run (1)")
    parser.add_argument("--later-warmup", type=int, default=0,
                        help="untimed iterations of every later run (0: the first run already warmed CUDA and cuBLAS)")
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per run, fewer if the budget cuts (2)")
    parser.add_argument("--budget-s", type=float, default=210.0, help="seconds for the whole check, install included")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"),
                        help="recompute activations in backward (default on for FLUX.1-dev, off for --tiny)")
    parser.add_argument("--force-full", action="store_true", help="run full fine-tuning even without a prediction that it fits")
    parser.add_argument("--gpus", type=int, help="GPUs for the planner's FSDP prediction (default: the visible ones)")
    parser.add_argument("--plan-gpu", nargs="+", help="the planner's GPU name (default: from the device name); "
                        "--predict-only takes several")
    parser.add_argument("--predictions", help="a file --predict-only wrote: predictions read instead of computed")
    parser.add_argument("--predict-only", action="store_true",
                        help="write the planner's predictions for every run to --out and stop (no GPU needed)")
    parser.add_argument("--plans-in-background", choices=("auto", "on", "off"), default="auto",
                        help="plan in a spawned process while the runs go on (auto: on a GPU)")
    parser.add_argument("--mfu", type=float, default=0.4, help="the MFU the planner predicts at (0.4)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if the table lacks it")
    parser.add_argument("--device", help="cuda (default when available) or cpu (--tiny only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", help="results JSON (default: $OUT/gpu_check.json, else gpu_check.json)")
    args = parser.parse_args(argv)
    args.arch = "tiny-flux" if args.tiny else "flux-dev"
    args.resolution = args.resolution or (32 if args.tiny else 720)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not args.device.startswith("cuda") and not args.predict_only:
        parser.error("FLUX.1-dev needs a CUDA GPU (bf16, ~24 GB of weights); on a CPU use --tiny")
    if args.iters < 1 or args.warmup < 0 or args.later_warmup < 0 or args.budget_s < 0:
        parser.error("--iters must be >= 1, --warmup/--later-warmup >= 0, --budget-s >= 0")
    checkpointing = args.gradient_checkpointing or ("off" if args.tiny else "on")
    args.gradient_checkpointing = checkpointing == "on"
    args.gpus = args.gpus or (torch.cuda.device_count() if args.device.startswith("cuda") else 1)
    args.out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    return args


def throughput_args(throughput, args, finetune: str) -> argparse.Namespace:
    """The settings benchmarks/throughput.py would parse for this check (method_runs reads them)."""
    argv = ["--arch", args.arch, "--resolution", str(args.resolution), "--group-size", str(args.group_size),
            "--prompts", "1", "--finetune", finetune, "--device", args.device, "--methods", *args.methods,
            "--schedule", "sequential"]
    argv += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    for override in args.set:
        argv += ["--set", override]
    return throughput.parse_args(argv)


def environment(args, device: str, install: dict, argv) -> dict:
    import diffusers
    import peft
    import transformers

    cuda = device.startswith("cuda")
    return {
        "device": device, "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gb": torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9 if cuda else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "install": install,
        "command": ["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])],
    }


def write(result: dict, out: Path) -> None:
    from neighbor_grpo.runs.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")


def measure(throughput, run, label: str, args, finetune: str, rewards, sync, budget: Budget, flops: dict,
            peak_tflops, first: bool, estimate: float) -> dict | None:
    """Time one built run and summarise it (throughput.summarize, plus per-phase MFU and both memory peaks); None
    when the budget let no iteration run."""
    measured = time_run(run, label, rewards, sync, args.device, args.warmup if first else args.later_warmup,
                        args.iters, budget, None if first else estimate)
    if not measured.records:
        return None
    figures, details = throughput.summarize(run, flops["forward_per_sample"], peak_tflops, finetune,
                                            args.gradient_checkpointing)
    per_sample = flops["forward_per_sample"]
    return {
        "s_per_iter": figures["s_per_iter"], "rollout_images_per_s": figures["rollout_images_per_s"],
        "train_samples_per_s": figures["train_samples_per_s"], **memory_figures(measured, args.device),
        "mfu": figures["mfu"], **phase_figures(measured.records, per_sample, finetune, peak_tflops),
        "achieved_tflops": overall_tflops(measured.records, per_sample, finetune),
        "rollout_s": details["rollout_s"], "train_s": details["train_s"], "reward_s": details["reward_s"],
        "iterations_timed": len(measured.records), "warmup_iterations": len(measured.warmup_records),
        "measured_on_warmup": measured.measured_on_warmup, "cut_by_budget": measured.cut_by_budget,
        "s_per_iter_each": details["s_per_iter_each"], "forwards": details["forwards"],
        "forward_equivalents": details["forward_equivalents"], "model_flops_per_iter": details["model_flops_per_iter"],
        "velocity_flops_executed": details["model_flops_per_iter"] + details["recompute_flops_per_iter"],
        "hfu": details["hfu"], "skipped_updates": details["skipped_updates"], "settings": details["settings"],
    }


def planned_runs(throughput, args, reward: str) -> list[tuple[str, str, str, argparse.Namespace, object]]:
    """(label, method, finetune, throughput settings, config) of every run, in the order they run."""
    from method_runs import method_overrides

    from neighbor_grpo.config.train_config import load_config

    runs = []
    for finetune in args.finetune:
        targs = throughput_args(throughput, args, finetune)
        for method in args.methods:
            config = load_config(None, method_overrides(targs, method, args.device, reward))
            config.speed.gradient_checkpointing = args.gradient_checkpointing  # as prepare_method sets it
            runs.append((f"{method}/{finetune}", method, finetune, targs, config))
    return runs


def prediction_jobs(runs, args, model_path: str, gpu_names: list[str]) -> list[tuple]:
    """(key, planner config, gpus, gpu): one plan per fine-tuning mode, of the first method's config (the plan's
    baselines hold the other methods); full fine-tuning first (its prediction decides whether it runs), and on
    several GPUs also its FSDP plan over them."""
    from neighbor_grpo.models.architectures import DIFFUSERS_ARCHS

    cuda = args.device.startswith("cuda") or args.predict_only
    tokens = DIFFUSERS_ARCHS[args.arch]["text"][0]
    jobs = []
    for finetune in ("full", "lora"):
        config = next((c for _, _, f, _, c in runs if f == finetune), None)
        if config is None:
            continue
        planner_config = prediction_config(config, model_path, tokens, args.resolution, cuda)
        for gpu in gpu_names:
            jobs.append((prediction_key(finetune, 1, gpu), planner_config, 1, gpu))
            if finetune == "full" and args.gpus > 1:
                sharded = prediction_config(planner_config, model_path, tokens, args.resolution, cuda)
                sharded.speed.parallel = "fsdp"
                jobs.append((prediction_key(finetune, args.gpus, gpu), sharded, args.gpus, gpu))
    return jobs


def fill_prediction(result: dict, entry: dict, predictions: Predictions, key: str, method: str, timeout: float) -> None:
    """The run's prediction (and the whole plan, once per key, under result['plans']) and measured / predicted."""
    plan, entry["prediction_note"] = predictions.get(key, timeout)
    if plan is not None:
        result["plans"][key] = plan
    entry["predicted"] = prediction_summary(plan, method, key)
    if entry["predicted"] is None and plan is not None:
        entry["prediction_note"] = f"plans[{key!r}] has no row for {method}"
    entry["measured_over_predicted"] = comparison(entry["measured"], entry["predicted"])
    entry["mfu_from_plan"] = mfu_from_plan(entry["measured"], entry["predicted"],
                                           result["flops"].get("peak_tflops_bf16_dense"))


def count_flops(run, args, flops: dict, peak_tflops, peak_source) -> None:
    """FLOPs of one velocity-net forward at the rollout batch, counted once on the first model built."""
    from neighbor_grpo.training.cost import count_forward_flops
    from neighbor_grpo.training.iteration import prompt_batch
    from neighbor_grpo.plan.attention_flops import cpu_attention_flops

    prompts, _ = prompt_batch(list(run.config.prompts.train), run.config.seed, 0, 1)
    with cpu_attention_flops():  # CPU attention is 0 FLOPs to stock torch; the CUDA kernels are counted
        flops.update(count_forward_flops(run.adapter, run.parts.velocity or run.adapter.velocity, run.counter,
                                         prompts, args.group_size))
    flops.update(peak_tflops_bf16_dense=peak_tflops, peak_source=peak_source,
                 transformer_parameters=sum(p.numel() for p in run.adapter.net.parameters()))


def main(argv: list[str] | None = None, started: float | None = None) -> dict:
    """The check; its budget counts from `started` (the script: its first line; a caller: this call)."""
    started = time.perf_counter() if started is None else started
    args = parse_args(argv)
    install = ensure_module("diffusers", args.wheel, args.install_target)
    budget = Budget(args.budget_s, started)
    import throughput

    runs = planned_runs(throughput, args, throughput.FALLBACK_REWARD)
    gpu_names = args.plan_gpu or [planner_gpu(args.device)]
    saved = json.loads(Path(args.predictions).read_text())["predictions"] if args.predictions else None
    folder = tempfile.mkdtemp(prefix="gpu_check_model-")  # the tiny model's config files, for the planner
    model_path = planner_model_path(args.arch, Path(folder))
    try:
        if args.predict_only:
            jobs = prediction_jobs(runs, args, model_path, gpu_names)
            return write_predictions(Predictions(jobs, args.mfu), args, argv, install)
        predictions = Predictions(prediction_jobs(runs, args, model_path, gpu_names[:1]), args.mfu, saved,
                                  background=args.plans_in_background == "on" or (
                                      args.plans_in_background == "auto" and args.device.startswith("cuda")))
        return measure_all(args, argv, started, install, budget, throughput, runs, predictions, gpu_names[0])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_all(args, argv, started: float, install: dict, budget: Budget, throughput, runs, predictions,
                gpu_name: str) -> dict:
    """Every run in turn, under the budget, each beside its prediction; the JSON rewritten after each."""
    from method_runs import TimedRewards, prepare_method, release

    from neighbor_grpo.plan.hardware import bf16_peak_tflops
    from neighbor_grpo.rewards import build_rewards

    device, cuda = args.device, args.device.startswith("cuda")
    reward = throughput.FALLBACK_REWARD
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    rewards = TimedRewards(build_rewards([{"name": reward}], device=device), sync)
    peak_tflops, peak_source = bf16_peak_tflops(device, args.peak_tflops)
    flops: dict = {}
    result = {
        "complete": False, "environment": environment(args, device, install, argv),
        "settings": {"arch": args.arch, "resolution": args.resolution, "group_size": args.group_size,
                     "prompts_per_iteration": 1, "methods": list(args.methods), "finetune": list(args.finetune),
                     "dtype": "bf16 weights + bf16 autocast" if cuda else "fp32", "reward": reward,
                     "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup,
                     "later_warmup": args.later_warmup, "iters": args.iters, "overrides": list(args.set),
                     "planner": {"gpu": gpu_name, "gpus": args.gpus, "mfu": args.mfu,
                                 "predictions_file": args.predictions}},
        "model": model_description(args),
        "flops": flops, "budget": {"budget_s": args.budget_s, "cut": False, "cuts": budget.cuts},
        "runs": {}, "plans": {}, "definitions": DEFINITIONS,
    }
    write(result, args.out)  # the environment, even if the first run fails
    achieved = None  # model TFLOP/s of the runs so far: estimates the next run's first iteration
    build_s = 0.0  # the last model build's seconds: estimates the next one's
    try:
        for label, method, finetune, targs, config in runs:
            entry = result["runs"][label] = {"status": "measured", "measured": None, "predicted": None,
                                             "prediction_note": None, "measured_over_predicted": None}
            if finetune == "full":  # the prediction decides whether it runs
                key = prediction_key(finetune, 1, gpu_name)
                fill_prediction(result, entry, predictions, key, method, budget.left())
                gate = full_finetune_gate(result["plans"].get(key), method, args, cuda)
                if gate:
                    entry.update(status="skipped", reason=gate)
                    if args.gpus > 1:  # what sharding over the visible GPUs would take, for the record
                        key = prediction_key(finetune, args.gpus, gpu_name)
                        fsdp, _ = predictions.get(key, budget.left())
                        result["plans"][key] = fsdp
                        entry["predicted_fsdp"] = prediction_summary(fsdp, method, key)
                    continue
            first = not any(r["measured"] for r in result["runs"].values())
            estimate = estimated_iteration_s(config, 1, finetune, flops.get("forward_per_sample"), achieved) or 0.0
            if not first and not budget.allows(estimate + build_s):  # building the model is part of the run
                budget.cut(f"{label} (not started)", estimate + build_s)
                entry.update(status="skipped", reason="time budget: " + budget.cuts[-1])
                continue
            run = None
            try:
                tick = time.perf_counter()
                run, _ = prepare_method(targs, method, device, dtype, reward)
                entry["build_s"] = build_s = time.perf_counter() - tick
                if not flops:
                    count_flops(run, args, flops, peak_tflops, peak_source)
                run.net_samples_per_sample = run.reference.net_samples_per_sample = (
                    flops["net_samples_at_batch"] / flops["batch"])
                entry["measured"] = measure(throughput, run, label, args, finetune, rewards, sync, budget, flops,
                                            peak_tflops, first, estimate)
                achieved = (entry["measured"] or {}).get("achieved_tflops") or achieved
            except torch.cuda.OutOfMemoryError as error:
                entry.update(status="out_of_memory", reason=str(error).splitlines()[0])
            except Exception as error:  # noqa: BLE001  (one device call is all there may be: record it, go on)
                entry.update(status="error", reason=f"{type(error).__name__}: {error}".splitlines()[0],
                             traceback=traceback.format_exc()[-3000:])
            finally:
                if run is not None:
                    release(run, cuda)
                run = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            if not entry["measured"] and entry["status"] == "measured":
                entry.update(status="skipped", reason="time budget: no iteration ran")
            result["budget"].update(cut=bool(budget.cuts), elapsed_s=time.perf_counter() - started)
            write(result, args.out)
        for label, entry in result["runs"].items():  # the predictions not needed before, as far as time allows
            method, finetune = label.split("/")
            fill_prediction(result, entry, predictions, prediction_key(finetune, 1, gpu_name), method,
                            budget.left())
    finally:
        predictions.close()
    result["ratios"] = ratios(result["runs"], args.finetune)
    result["budget"].update(cut=bool(budget.cuts), elapsed_s=time.perf_counter() - started)
    result["complete"] = True
    write(result, args.out)
    print_report(result, args.out)
    return result


def write_predictions(predictions: Predictions, args, argv, install: dict) -> dict:
    """--predict-only: every run's prediction (for each --plan-gpu) in one file for --predictions; no GPU needed."""
    result = {"predictions": {job[0]: list(predictions.get(job[0], float("inf"))) for job in predictions.jobs},
              "settings": {"arch": args.arch, "resolution": args.resolution, "group_size": args.group_size,
                           "methods": list(args.methods), "finetune": list(args.finetune), "mfu": args.mfu,
                           "overrides": list(args.set)},
              "environment": {"torch": torch.__version__, "install": install,
                              "command": ["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]}}
    write(result, args.out)
    missing = [key for key, (prediction, _) in result["predictions"].items() if prediction is None]
    print(f"wrote {len(result['predictions'])} predictions to {args.out}" + (f"; none for {missing}" if missing else ""))
    return result


if __name__ == "__main__":
    main(started=STARTED)
