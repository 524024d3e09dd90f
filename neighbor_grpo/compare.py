"""Side-by-side comparison of Neighbor GRPO and the SDE baselines under an equal training wall-clock budget.

Every method starts from the same base model and trains on the same reward, prompts and seeds. Held-out
evaluation (ODE sampler, seeds never trained on) runs at the same interval of *training* time for every method;
its own time is not counted. Each method gets the same learning-rate sweep and is reported at its best.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from neighbor_grpo.config import load_config
from neighbor_grpo.io import atomic_write_text
from neighbor_grpo.logs import plot_curves
from neighbor_grpo.monitors import evaluate
from neighbor_grpo.trainer import ModelCallCounter, build_training_parts, load_model, read_prompts, train_iteration

# Each method at its own paper's settings (the main table).
PAPER_SETTINGS: dict[str, list[str]] = {
    "neighbor_grpo": ["algorithm=neighbor_grpo"],  # 8-step DPM-Solver++, G 12, B 4, K 4
    "flow_grpo": ["algorithm=flow_grpo"],  # 10 SDE steps
    "dance_grpo": ["algorithm=dance_grpo"],  # 25 SDE steps, timestep fraction 0.6
    "mix_grpo": ["algorithm=mix_grpo"],  # 25 steps, SDE window of 4
    "mix_grpo_flash": ["algorithm=mix_grpo", "mix_grpo.flash=true"],
}
SDE_BASELINES = ("flow_grpo", "dance_grpo", "mix_grpo")

# Ablations of Neighbor GRPO the paper reports: name -> {label: overrides}.
ABLATIONS: dict[str, dict[str, list[str]]] = {
    "sigma": {f"sigma={v}": [f"neighbor_grpo.neighbor_sigma={v}"] for v in (0.1, 0.3, 0.5, 0.7)},
    "anchors": {f"B={b}": [f"neighbor_grpo.num_anchors={b}"] for b in (1, 2, 4, 6)},
    "p": {f"p={p}": [f"neighbor_grpo.quasi_norm_p={p}"] for p in (0.8, 1.0, 2.0)},
    "solver": {"dpm++2m x8": ["neighbor_grpo.rollout_solver=dpm++2m", "neighbor_grpo.rollout_steps=8"],
               "euler x28": ["neighbor_grpo.rollout_solver=euler", "neighbor_grpo.rollout_steps=28"]},
    "tau": {f"tau_rel={t}": [f"neighbor_grpo.tau_rel={t}"] for t in (0.03, 0.1, 0.3)},
    "ref_beta": {f"ref_beta={b}": [f"neighbor_grpo.ref_beta={b}"] for b in (0.0, 1.0, 10.0)},
    "distance": {"relative tau (mean)": [],
                 # the relative tau is ~0.006 on this model (logged as `tau`); 0.384 = 0.006 x 64 latent dims
                 "fixed tau=0.006, mean": ["neighbor_grpo.tau=0.006", "neighbor_grpo.distance_reduction=mean"],
                 "fixed tau=0.384, sum": ["neighbor_grpo.tau=0.384", "neighbor_grpo.distance_reduction=sum"],
                 "fixed tau=0.006, sum": ["neighbor_grpo.tau=0.006", "neighbor_grpo.distance_reduction=sum"]},
    "clip": {f"eps_clip={e}": [f"neighbor_grpo.eps_clip={e}"] for e in (0.05, 0.2, 0.5)},
    "steps": {"random K=4": [], "first K=4": ["neighbor_grpo.step_selection=first"],
              "last K=4": ["neighbor_grpo.step_selection=last"], "all K=8": ["neighbor_grpo.step_selection=all"]},
}


def equal_steps_overrides(method: str, steps: int) -> list[str]:
    """The same method with `steps` rollout steps (the second table)."""
    section = "mix_grpo" if method.startswith("mix_grpo") else method
    extra = [f"{section}.rollout_steps={steps}"]
    if section == "mix_grpo":
        extra.append(f"mix_grpo.window_size={min(4, steps - 2)}")
    return PAPER_SETTINGS[method] + extra


@dataclass
class RunCurve:
    train_s: list[float] = field(default_factory=list)
    model_evals: list[float] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)


def run_method(overrides: list[str], lr: float, budget_s: float, eval_every_s: float, base_path: str, rewards,
               eval_prompts: list[str], eval_samples: int, seed: int, device: str, common: list[str]) -> dict:
    """Train one method for `budget_s` seconds of training time; held-out metrics every `eval_every_s`."""
    config = load_config(None, common + overrides + [f"optim.lr={lr}", f"seed={seed}"])
    adapter = load_model(base_path, device, progress=False)
    parts = build_training_parts(config, adapter)
    counter = ModelCallCounter(adapter.net, parts.reference_net)
    prompts = read_prompts(config)
    shift = parts.shift
    curve, train_s, evals, iteration, rewards_seen = RunCurve(), 0.0, 0.0, 0, []

    def held_out() -> None:
        counter.reset()
        metrics, _ = evaluate(adapter, rewards, eval_prompts, eval_samples, config.eval.seed, "dpm++2m", 8, shift)
        counter.reset()
        curve.train_s.append(train_s)
        curve.model_evals.append(evals)
        curve.heldout.append(metrics)

    held_out()
    next_eval = eval_every_s
    while train_s < budget_s:
        tick = time.perf_counter()
        values, _ = train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params, parts.ema,
                                    parts.reference_velocity, prompts, iteration, lambda point: None)
        train_s += time.perf_counter() - tick
        no_grad, with_grad = counter.reset()
        evals += no_grad + 3 * with_grad  # a backward pass counts as two forward passes
        rewards_seen.append(values["reward_mean"])
        iteration += 1
        if train_s >= next_eval or train_s >= budget_s:
            held_out()
            next_eval += eval_every_s
    counter.remove()
    tail = rewards_seen[-max(1, len(rewards_seen) // 10):]
    return {"lr": lr, "iterations": iteration, "s_per_iter": train_s / iteration, "model_evals_per_iter": evals / iteration,
            "final_reward": sum(tail) / len(tail), "curve": {"train_s": curve.train_s, "model_evals": curve.model_evals,
                                                              "heldout": curve.heldout}}


TARGET_TOLERANCE = 1e-3  # a saturating reward (a probability) reaches 1.0 only up to float rounding


def time_to_target(run: dict, target: float) -> float | None:
    """Training seconds until the held-out reward first reaches the target (within TARGET_TOLERANCE)."""
    for seconds, metrics in zip(run["curve"]["train_s"], run["curve"]["heldout"]):
        if metrics["reward"] >= target - TARGET_TOLERANCE:
            return seconds
    return None


def summarize(run: dict, base_metrics: dict, target: float) -> dict:
    last = run["curve"]["heldout"][-1]
    return {"s_per_iter": run["s_per_iter"], "model_evals_per_iter": run["model_evals_per_iter"],
            "final_reward": run["final_reward"], "heldout_reward": last["reward"],
            "time_to_target_s": time_to_target(run, target),
            "diversity": last["diversity"] / base_metrics["diversity"], "out_of_range": last["out_of_range"],
            "realism": last.get("realism_nn_dist"), "best_lr": run["lr"], "iterations": run["iterations"]}


def run_table(methods: dict[str, list[str]], lrs: list[float], budget_s: float, evals_per_run: int, base_path: str,
              rewards, eval_prompts, eval_samples, seed, device, common, target: float | None, progress: bool) -> dict:
    """Every method at every lr; best lr by final held-out reward; the target and time-to-target."""
    runs: dict[str, dict] = {}
    jobs = [(name, lr) for name in methods for lr in lrs]
    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress)
    for name, lr in bar:
        bar.set_postfix(method=name, lr=lr)
        run = run_method(methods[name], lr, budget_s, budget_s / evals_per_run, base_path, rewards, eval_prompts,
                         eval_samples, seed, device, common)
        best = runs.get(name)
        if best is None or run["curve"]["heldout"][-1]["reward"] > best["curve"]["heldout"][-1]["reward"]:
            runs[name] = run
    base_metrics = next(iter(runs.values()))["curve"]["heldout"][0]
    if target is None:
        finals = [runs[m]["curve"]["heldout"][-1]["reward"] for m in runs if m in SDE_BASELINES]
        target = max(finals) if finals else base_metrics["reward"]
    return {"target_reward": target, "base": base_metrics,
            "methods": {name: summarize(run, base_metrics, target) for name, run in runs.items()},
            "curves": {name: run["curve"] for name, run in runs.items()}}


def markdown_table(table: dict) -> str:
    lines = [f"target held-out reward: {table['target_reward']:.4f} (base model: {table['base']['reward']:.4f})", "",
             "| method | s/iter | model evals/iter | held-out reward | time to target (s) | diversity (x base) "
             "| out of range | realism (NN dist) | best lr |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in table["methods"].items():
        ttt = "never" if m["time_to_target_s"] is None else f"{m['time_to_target_s']:.1f}"
        lines.append(f"| {name} | {m['s_per_iter']:.3f} | {m['model_evals_per_iter']:.0f} | {m['heldout_reward']:.4f} | {ttt} "
                     f"| {m['diversity']:.3f} | {m['out_of_range']:.4f} | {m['realism']:.4f} | {m['best_lr']:g} |")
    return "\n".join(lines)


def plot_table(table: dict, folder: Path, suffix: str = "") -> None:
    curves = table["curves"]
    plot_curves({n: (c["train_s"], [h["reward"] for h in c["heldout"]]) for n, c in curves.items()},
                folder / f"reward_vs_time{suffix}.png", "training wall-clock (s)", "held-out reward", "held-out reward vs time")
    plot_curves({n: (c["model_evals"], [h["reward"] for h in c["heldout"]]) for n, c in curves.items()},
                folder / f"reward_vs_evals{suffix}.png", "model evaluations (forward-pass equivalents)", "held-out reward",
                "held-out reward vs model evaluations")


def compare(out: str | Path, budget_s: float = 25.0, lrs: tuple[float, ...] = (1e-4, 3e-4), methods: list[str] | None = None,
            target: float | None = None, equal_steps: int | None = 8, ablation: str | None = None, evals_per_run: int = 8,
            eval_samples: int = 8, seed: int = 0, device: str | None = None, base_path: str = "builtin:digits",
            progress: bool = True, overwrite: bool = False) -> dict:
    """Run the comparison and write results JSON, markdown tables and plots next to `out`. Existing results are
    refused unless `overwrite`; then only the files named by `compare_outputs` are replaced."""
    from neighbor_grpo.distributed import check_device
    from neighbor_grpo.ownership import check_file_outputs, write_marker
    from neighbor_grpo.rewards import build_rewards

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, "--device")
    for name, value, least in (("--budget-s", budget_s, 0), ("--evals-per-run", evals_per_run, 0),
                               ("--eval-samples", eval_samples, 1)):
        if not value > least:
            raise ValueError(f"{name}: expected a number > {least}, got {value}")
    if not lrs or not all(lr > 0 for lr in lrs):
        raise ValueError(f"--lrs: expected learning rates > 0, got {list(lrs)}")
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: expected a .json file (the .md table and plots are written beside it)")
    check_file_outputs(compare_outputs(out, ablation, equal_steps), overwrite)
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
        write_marker(out.parent, "compare")
    if base_path == "builtin:digits":
        from neighbor_grpo.pretrain import ensure_base_model, ensure_classifier

        ensure_classifier(progress=progress)
        base_path = str(ensure_base_model(progress=progress))
    rewards = build_rewards([{"name": "digit_prob"}], device=device)
    eval_prompts = [str(d) for d in range(10)]
    common = [f"device={device}", "prompts_per_iteration=8"]
    args = dict(lrs=list(lrs), budget_s=budget_s, evals_per_run=evals_per_run, base_path=base_path, rewards=rewards,
                eval_prompts=eval_prompts, eval_samples=eval_samples, seed=seed, device=device, common=common,
                progress=progress)
    names = methods or list(PAPER_SETTINGS)
    unknown = [n for n in names if n not in PAPER_SETTINGS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(PAPER_SETTINGS)}")
    results: dict = {"device": device, "budget_s": budget_s, "lrs": list(lrs), "seed": seed}
    if ablation:
        if ablation not in ABLATIONS:
            raise ValueError(f"--ablation: unknown {ablation!r}; choose from {list(ABLATIONS)}")
        variants = {label: PAPER_SETTINGS["neighbor_grpo"] + extra for label, extra in ABLATIONS[ablation].items()}
        # no SDE baseline to set the target here: a fixed, documented one unless --target is given
        table = run_table(variants, target=0.9 if target is None else target, **args)
        results.update({"ablation": ablation, **table})
        markdown = f"## Ablation: {ablation}\n\n" + markdown_table(table)
        plot_table(table, out.parent, f"_{ablation}")
    else:
        table = run_table({n: PAPER_SETTINGS[n] for n in names}, target=target, **args)
        results.update(table)
        markdown = "## Paper settings\n\n" + markdown_table(table)
        plot_table(table, out.parent)
        if equal_steps:
            second = run_table({n: equal_steps_overrides(n, equal_steps) for n in names}, target=target, **args)
            results["equal_steps"] = {"steps": equal_steps, **second}
            markdown += f"\n\n## Equal step counts ({equal_steps} rollout steps)\n\n" + markdown_table(second)
            plot_table(second, out.parent, "_equal_steps")
        results["speedup"] = speedups(table)
        markdown += "\n\n" + "\n".join(f"- {k}: {v}" for k, v in results["speedup"].items())
    results["wall_clock_s"] = time.perf_counter() - started
    atomic_write_text(out, json.dumps(results, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown + "\n")
    return results


def compare_outputs(out: Path, ablation: str | None, equal_steps: int | None) -> list[Path]:
    """Every file a comparison writes: the JSON, its .md, and the plots in the same folder."""
    suffixes = [f"_{ablation}"] if ablation else [""] + (["_equal_steps"] if equal_steps else [])
    plots = [out.parent / f"reward_vs_{x}{s}.png" for s in suffixes for x in ("time", "evals")]
    return [out, out.with_suffix(".md"), *plots]


def speedups(table: dict) -> dict:
    """Time-to-target of the fastest SDE baseline (paper settings) over Neighbor GRPO's, and over MixGRPO-Flash's."""
    methods = table["methods"]
    ours = methods.get("neighbor_grpo", {}).get("time_to_target_s")
    sde = [methods[m]["time_to_target_s"] for m in SDE_BASELINES if m in methods]
    reached = [t for t in sde if t is not None]
    result = {"neighbor_grpo_time_to_target_s": ours,
              "fastest_sde_time_to_target_s": min(reached) if reached else None}
    if ours and reached:
        result["speedup_vs_fastest_sde"] = min(reached) / ours
    flash = methods.get("mix_grpo_flash", {}).get("time_to_target_s")
    if ours and flash:
        result["speedup_vs_mix_grpo_flash"] = flash / ours
    evals = {m: methods[m]["model_evals_per_iter"] for m in methods}
    if "neighbor_grpo" in evals and "dance_grpo" in evals:
        result["evals_per_iter_dance_over_neighbor"] = evals["dance_grpo"] / evals["neighbor_grpo"]
    return result
