"""Throughput of one training iteration: Neighbor GRPO against the SDE baselines, same model, same run.

    python benchmarks/throughput.py --out benchmarks/results/throughput_cpu_builtin.json
    python benchmarks/throughput.py --arch flux-dev --resolution 720 --prompts 1 --finetune lora \
        --methods neighbor_grpo dance_grpo --out throughput_flux.json            # on a GPU

For one model architecture it runs real training iterations (`iteration.train_iteration`, the loop `ngrpo train`
runs) of every method at its paper's settings (`compare.PAPER_SETTINGS`) and reports, per method: seconds per
iteration (median of the timed iterations, warm-up excluded), rollout images/s, trained samples/s, peak GPU
memory and model FLOP utilisation (MFU). It also reports the two ratios of issue #6, measured in the same run with
the same fine-tuning mode: DanceGRPO's iteration over Neighbor GRPO's in forward-pass equivalents and in
wall-clock.

What each figure means is written into the JSON under "definitions" (DEFINITIONS below).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from neighbor_grpo.training.cost import (backward_factor, config_schedule, cost_note, count_forward_flops, forward_equivalents,
                                schedule_forward_counts)
from neighbor_grpo.training.iteration import prompt_batch
from neighbor_grpo.plan.hardware import bf16_peak_tflops, device_description
from neighbor_grpo.models.architectures import ARCHS, checkpoint_blocks

sys.path.insert(0, str(Path(__file__).parent))
from method_runs import METHODS, MethodRun, TimedRewards, prepare_method, release, time_alternating, time_method  # noqa: E402

DEFINITIONS = {
    "iteration": "everything iteration.train_iteration does: prompt encoding, rollout, decoding, reward, advantages, "
                 "old policy, every loss/backward/optimizer step; the reward is part of it (reward_s says how much)",
    "s_per_iter": "median wall-clock seconds of the timed iterations (warm-up excluded)",
    "rollout_images_per_s": "P*G images / rollout seconds (iteration start to the trainer's after_rollout hook: "
                            "sampling, decoding and reward)",
    "train_samples_per_s": "with-grad per-sample forwards (trained (sample, step) units) / seconds after the rollout",
    "forward_equivalents": "per-sample forwards of the velocity net, no-grad and with-grad (iteration.training_counter: "
                           "the policy, a full fine-tune's frozen reference copy and the algorithm's own networks); a "
                           "trained sample also costs its backward: 2 forwards for a full fine-tune, about 1 for LoRA "
                           "(input gradients only)",
    "model_flops": "FlopCounterMode count of one velocity-net forward at the rollout batch shape (matmuls, convolutions, "
                   "attention; not the text encoder, VAE or reward), per sample, times forward_equivalents",
    "mfu": "model FLOPs per second / the card's dense bf16 peak; gradient-checkpointing recomputation is not model "
           "work (hfu in details counts it)",
    "peak_mem_gb": "torch.cuda.max_memory_allocated over the timed iterations, 1e9 bytes; null on CPU",
}

DEFAULT_RESOLUTION = {"builtin": 16, "builtin-unet": 16, "tiny-digits": 16, "sd35-medium": 512, "flux-dev": 720, "tiny-sd3": 32,
                      "tiny-flux": 32}
DEFAULT_PROMPTS = {"builtin": 8, "builtin-unet": 8, "tiny-digits": 8, "sd35-medium": 1, "flux-dev": 1, "tiny-sd3": 1, "tiny-flux": 1}
# The classifier of the built-in digits is its natural cheap reward; any real image takes the model-free JPEG one.
DEFAULT_REWARD = {"builtin": "digit_prob", "builtin-unet": "digit_prob"}
FALLBACK_REWARD = "jpeg_compressibility"

# ---- summaries ---------------------------------------------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(run: MethodRun, flops_per_sample: float, peak_tflops: float | None, finetune: str,
              checkpointing: bool) -> tuple[dict, dict]:
    """The method's five reported figures, and the details behind them."""
    records = run.records
    s_per_iter = median([r.seconds for r in records])
    fpe = median([forward_equivalents(r.rollout_forwards + r.other_forwards + r.reference_forwards, r.train_forwards,
                                      finetune) for r in records])
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
    # the algorithm's call schedule, in samples the net sees like the counter (SD3's CFG doubles them)
    analytic = schedule_forward_counts(config_schedule(run.config))
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
        "analytic_forward_equivalents": forward_equivalents(analytic["rollout"] + analytic["other"] + analytic["reference"],
                                                            analytic["train"], finetune),
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
    print(f"FPE/iter: {cost_note(result['settings']['finetune'])}\n")
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
    args.finetune = args.finetune or ("full" if args.arch in ("builtin", "builtin-unet", "tiny-digits") else "lora")
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
        from neighbor_grpo.builtin.pretrain import ensure_classifier

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
            prompts, _ = prompt_batch(list(run.config.prompts.train), run.config.seed, 0, args.prompts)
            velocity = run.parts.velocity or run.adapter.velocity
            flops.update(count_forward_flops(run.adapter, velocity, run.counter, prompts, args.group_size))
            flops["backward_factor"] = backward_factor(args.finetune)
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
