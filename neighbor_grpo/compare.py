"""Side-by-side comparison of Neighbor GRPO and the SDE baselines at an equal forward-equivalent budget.

Every method starts from the same base model, trains on the same proxy reward (the digit classifier) and prompts,
for the same budget of forward-equivalents (neighbor_grpo.cost). Held-out evaluations (ODE sampler, seeds never
trained on) run at the same forward-equivalent points for every method (benchmark_rules.evaluation_points) and
score the proxy, the gold (never trained on, never used to select anything), the hacking monitors and the
distance from the base model. The rules that turn curves into a table live in benchmark_rules; the table, the
intervals and the plots in compare_report.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from neighbor_grpo import benchmark_rules as rules
from neighbor_grpo.config import load_config
from neighbor_grpo.cost import backward_factor, cost_note, forward_equivalents
from neighbor_grpo.io import atomic_write_text
from neighbor_grpo.iteration import train_iteration, training_counter
from neighbor_grpo.monitors import evaluate, generate
from neighbor_grpo.parts import build_training_parts, load_model, read_prompts

# Each baseline's optimizer as its reference repository sets it (table and file:line citations in
# docs/benchmarks.md, "Optimizer settings of the baselines"). All three use AdamW with betas (0.9, 0.999) and eps
# 1e-8, torch's defaults and the library's. The learning rate is swept alike for every method, not taken from here.
REFERENCE_OPTIMIZER: dict[str, list[str]] = {
    # yifan123/flow_grpo config/base.py:69 adam_weight_decay 1e-4, :76 max_grad_norm 1.0
    "flow_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=1.0"],
    # XueZeyue/DanceGRPO scripts/finetune/finetune_flux_grpo_8gpus.sh:46-47 (the FLUX recipe): max_grad_norm 0.01,
    # weight_decay 1e-4; its share of clipped steps is logged as grad_clipped_share
    "dance_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=0.01"],
    # Tencent-Hunyuan/MixGRPO scripts/finetune/finetune_flux_grpo_MixGRPO.sh:148-149 (and the Flash script's)
    "mix_grpo": ["optim.weight_decay=1e-4", "optim.max_grad_norm=1.0"],
}

# Each method at its own paper's settings: the main table (MAIN_TABLE, the default) and newer methods that
# `--methods` adds and later tables report against the main table's frozen target.
PAPER_SETTINGS: dict[str, list[str]] = {
    "neighbor_grpo": ["algorithm=neighbor_grpo"],  # 8-step DPM-Solver++, G 12, B 4, K 4; no public code: defaults
    "flow_grpo": ["algorithm=flow_grpo", *REFERENCE_OPTIMIZER["flow_grpo"]],  # 10 SDE steps
    "dance_grpo": ["algorithm=dance_grpo", *REFERENCE_OPTIMIZER["dance_grpo"]],  # 25 SDE steps, fraction 0.6
    "mix_grpo": ["algorithm=mix_grpo", *REFERENCE_OPTIMIZER["mix_grpo"]],  # 25 steps, SDE window of 4
    "mix_grpo_flash": ["algorithm=mix_grpo", "mix_grpo.flash=true", *REFERENCE_OPTIMIZER["mix_grpo"]],
    # yifan123/flow_grpo config/grpo.py pickscore_sd3_fast_nocfg (L323-L363): CPS eta 0.8 in a window of 3 steps
    # starting in [0, N // 2 - 3], clip 1e-5, global std, KL off; 10 steps
    "flow_grpo_cps": ["algorithm=flow_grpo", "flow_grpo.sde_type=cps", "flow_grpo.cps_eta=0.8",
                      "flow_grpo.fast_window_size=3", "flow_grpo.eps_clip=1e-5", *REFERENCE_OPTIMIZER["flow_grpo"]],
    # yifan123/flow_grpo config/grpo_guard.py pickscore_hps_sd3_ratio_norm (L84-L129): rationorm (both
    # mechanisms), clip 4e-6, per-group std, eta 0.7, steps 0-8 of 10, KL off
    "grpo_guard": ["algorithm=flow_grpo", "flow_grpo.guard_ratio_norm=true", "flow_grpo.guard_grad_reweight=true",
                   "flow_grpo.eps_clip=4e-6", "flow_grpo.global_std=false", *REFERENCE_OPTIMIZER["flow_grpo"]],
    # spec competitors.md 1.3 / 2.3: the authors' PickScore settings are the sections' defaults (docs/algorithms.md)
    "diffusion_nft": ["algorithm=diffusion_nft"],
    "awm": ["algorithm=awm"],
}
MAIN_TABLE = ("neighbor_grpo", "flow_grpo", "dance_grpo", "mix_grpo", "mix_grpo_flash")
REFERENCE_METHOD = "neighbor_grpo"  # every paired ratio and "no worse" verdict is against this one

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

GOLD_REWARD = "digit_gold"
PROBE_SEED = 20260  # the fixed held-out states of the distance from the base (the same for every method and seed)
PROBE_PER_PROMPT = 8


def equal_steps_overrides(method: str, steps: int) -> list[str]:
    """The same method with `steps` rollout steps."""
    section = next(o.split("=", 1)[1] for o in PAPER_SETTINGS[method] if o.startswith("algorithm="))
    extra = [f"{section}.rollout_steps={steps}"]
    if section == "mix_grpo":
        extra.append(f"mix_grpo.window_size={min(4, steps - 2)}")
    return PAPER_SETTINGS[method] + extra


def load_gold(device: str):
    """The gold reward object (with `components`), built from the reward registry."""
    from neighbor_grpo.rewards import REWARDS, build_rewards

    if GOLD_REWARD not in REWARDS:
        raise RuntimeError(f"gold reward {GOLD_REWARD!r} is not registered; the comparison scores every method on it")
    return build_rewards([{"name": GOLD_REWARD}], device=device).rewards[GOLD_REWARD]


class DistanceProbe:
    """Distance from the base model: mean over fixed held-out states of ||v_theta - v_ref||^2 / latent dims.
    States are points on straight paths from the base model's held-out samples to fixed noise, at fixed sigmas."""

    def __init__(self, adapter, prompts: list[str], seed: int, shift: float):
        latents, _ = generate(adapter, prompts, PROBE_PER_PROMPT, seed, "dpm++2m", 8, shift)  # the base model's
        generator = torch.Generator().manual_seed(PROBE_SEED)
        x0 = latents.flatten(0, 1).float().cpu()
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = 0.05 + 0.9 * torch.rand(x0.shape[0], generator=generator)
        s = sigmas.view(-1, *[1] * (x0.dim() - 1))
        self.states = ((1 - s) * x0 + s * noise).to(latents)
        self.sigmas = sigmas.to(latents)
        self.cond = adapter.encode_prompts([p for p in prompts for _ in range(PROBE_PER_PROMPT)])
        self.reference = self._velocity(adapter.velocity)

    @torch.no_grad()
    def _velocity(self, velocity) -> torch.Tensor:
        return velocity(self.states, self.sigmas, self.cond).float()

    def __call__(self, adapter) -> float:
        return float((self._velocity(adapter.velocity) - self.reference).pow(2).mean())


def _heldout_record(adapter, proxy, gold, probe, prompts, samples, seed, shift) -> tuple[dict, torch.Tensor]:
    metrics, images = evaluate(adapter, proxy, prompts, samples, seed, "dpm++2m", 8, shift)
    flat = images.flatten(0, 1).clamp(0, 1)
    parts = gold.components(flat, [p for p in prompts for _ in range(samples)])
    record = {"proxy": metrics["reward"], **{k: float(v.float().mean()) for k, v in parts.items()},
              "out_of_range": metrics["out_of_range"], "diversity": metrics["diversity"],
              "realism": metrics.get("realism_nn_dist"),
              "distance": probe(adapter)}
    return record, images


def run_method(overrides: list[str], lr: float, budget_fe: float, points: list[float], base_path: str, proxy, gold,
               eval_prompts: list[str], eval_samples: int, seed: int, device: str, common: list[str]) -> dict:
    """Train one method until `budget_fe` forward-equivalents; a held-out evaluation at the first iteration
    boundary at or past each point of `points` (points passed within one iteration share one evaluation)."""
    config = load_config(None, common + overrides + [f"optim.lr={lr}", f"seed={seed}"])
    adapter = load_model(base_path, device, progress=False)
    parts = build_training_parts(config, adapter)
    counter = training_counter(adapter, parts)  # the algorithm's own networks too (an old policy, an EMA copy)
    prompts = read_prompts(config)
    curve: list[dict] = []
    state = {"fe": 0.0, "iteration": 0, "train_s": 0.0}

    def held_out(probe):
        counter.reset()
        record, images = _heldout_record(adapter, proxy, gold, probe, eval_prompts, eval_samples, config.eval.seed,
                                         parts.shift)
        counter.reset()  # evaluation is not training cost
        curve.append({**state, **record})
        return images

    probe = DistanceProbe(adapter, eval_prompts, config.eval.seed, parts.shift)
    held_out(probe)
    s_per_iter: list[float] = []
    pending = list(points)
    while state["fe"] < budget_fe:
        tick = time.perf_counter()
        train_iteration(config, adapter, proxy, parts.algorithm, parts.optimizer, parts.params, parts.ema,
                        parts.reference_velocity, prompts, state["iteration"], lambda point: None, parts=parts)
        s_per_iter.append(time.perf_counter() - tick)
        state["train_s"] += s_per_iter[-1]
        no_grad, with_grad = counter.reset()
        state["fe"] += forward_equivalents(no_grad, with_grad, config.optim.finetune)
        state["iteration"] += 1
        if pending and state["fe"] >= pending[0]:
            held_out(probe)
            pending = [p for p in pending if p > state["fe"]]
    if pending or curve[-1]["iteration"] != state["iteration"]:
        held_out(probe)
    counter.remove()
    return {"lr": lr, "seed": seed, "iterations": state["iteration"], "median_s_per_iter": statistics.median(s_per_iter),
            "fe_per_iter": state["fe"] / state["iteration"], "finetune": config.optim.finetune, "curve": curve}


def proxy_auc(run: dict) -> float:
    return rules.area_under_curve([r["fe"] for r in run["curve"]], [r["proxy"] for r in run["curve"]])


def run_all(methods: dict[str, list[str]], lrs: list[float], seeds: list[int], budget_fe: float, evals_per_run: int,
            base_path: str, proxy, gold, eval_prompts, eval_samples, device, common, log, partial) -> dict:
    """The lr sweep on the first seed (chosen by the area under the held-out proxy curve), then the other seeds at
    the chosen lr. Returns {"runs": {method: {seed: run}}, "lr_selection": ...}."""
    points = rules.evaluation_points(budget_fe, evals_per_run)
    runs: dict[str, dict[str, dict]] = {name: {} for name in methods}
    selection: dict[str, dict] = {}
    total = len(methods) * (len(lrs) + len(seeds) - 1)
    done = 0

    def one(name, lr, seed):
        nonlocal done
        tick = time.perf_counter()
        run = run_method(methods[name], lr, budget_fe, points, base_path, proxy, gold, eval_prompts, eval_samples,
                         seed, device, common)
        done += 1
        if len(run["curve"]) - 1 < rules.FINAL_EVALUATIONS:  # the final value needs 3 evaluations after the base
            raise ValueError(f"--budget-fe: {name} costs {run['fe_per_iter']:.0f} forward-equivalents per iteration, so "
                             f"{budget_fe:g} gives it {len(run['curve']) - 1} held-out evaluations; expected >= "
                             f"{rules.FINAL_EVALUATIONS} (raise --budget-fe to >= {3 * run['fe_per_iter']:.0f})")
        log(f"[{done}/{total}] {name} lr={lr:g} seed={seed}: {run['iterations']} it, final gold "
            f"{run['curve'][-1]['gold']:.3f}, proxy {run['curve'][-1]['proxy']:.3f} ({time.perf_counter() - tick:.0f} s)")
        return run

    first, rest = seeds[0], seeds[1:]
    for name in methods:
        sweep = {lr: one(name, lr, first) for lr in lrs}
        chosen = rules.select_lr({lr: ([r["fe"] for r in run["curve"]], [r["proxy"] for r in run["curve"]])
                                  for lr, run in sweep.items()})
        selection[name] = {"proxy_auc": {str(lr): proxy_auc(run) for lr, run in sweep.items()}, "chosen": chosen}
        runs[name][str(first)] = sweep[chosen]
        partial({"runs": runs, "lr_selection": selection, "eval_points": points})
    for seed in rest:
        for name in methods:
            runs[name][str(seed)] = one(name, selection[name]["chosen"], seed)
            partial({"runs": runs, "lr_selection": selection, "eval_points": points})
    return {"runs": runs, "lr_selection": selection, "eval_points": points}


def check_arguments(budget_fe: float, seeds: list[int], lrs: list[float], evals_per_run: int, eval_samples: int,
                    methods: list[str]) -> None:
    """One-line errors naming the flag, before anything runs."""
    if not budget_fe > 0:
        raise ValueError(f"--budget-fe: expected > 0 forward-equivalents, got {budget_fe:g}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: expected distinct integers >= 0, got {seeds}")
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"--lrs: expected learning rates > 0, got {lrs}")
    if evals_per_run < rules.FINAL_EVALUATIONS:
        raise ValueError(f"--evals-per-run: expected >= {rules.FINAL_EVALUATIONS}, got {evals_per_run}")
    if eval_samples < 2:
        raise ValueError(f"--eval-samples: expected >= 2 samples per prompt (diversity needs pairs), got {eval_samples}")
    unknown = [n for n in methods if n not in PAPER_SETTINGS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(PAPER_SETTINGS)}")
    if REFERENCE_METHOD not in methods:
        raise ValueError(f"--methods: must include {REFERENCE_METHOD} (every comparison is paired against it)")


def read_frozen_target(path: str | Path) -> float:
    """The gold target frozen in an earlier results JSON (later tables report against it)."""
    try:
        return float(json.loads(Path(path).read_text())["target"]["gold"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--frozen-target {str(path)!r}: expected a results JSON of ngrpo compare with "
                         f"target.gold ({error})") from None


def compare(out: str | Path, budget_fe: float = 60000.0, lrs: tuple[float, ...] = (1e-4, 3e-4),
            methods: list[str] | None = None, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), evals_per_run: int = 24,
            eval_samples: int = 32, frozen_target: str | Path | None = None, equal_steps: int | None = None,
            ablation: str | None = None, device: str | None = None,
            base_path: str = "builtin:digits", overwrite: bool = False, progress: bool = True,
            command: str | None = None) -> dict:
    """Run the comparison; write the results JSON, a markdown table and PNG plots next to `out`."""
    from neighbor_grpo.compare_report import markdown_report, plot_report, summarize
    from neighbor_grpo.distributed import check_device
    from neighbor_grpo.ownership import check_file_outputs, write_marker
    from neighbor_grpo.rewards import build_rewards

    names = list(methods or MAIN_TABLE)
    seeds, lrs = [int(s) for s in seeds], [float(lr) for lr in lrs]
    check_arguments(budget_fe, seeds, lrs, evals_per_run, eval_samples, names)
    table, reference = {n: PAPER_SETTINGS[n] for n in names}, REFERENCE_METHOD
    if equal_steps is not None:
        if equal_steps < 2:
            raise ValueError(f"--equal-steps: expected >= 2 rollout steps, got {equal_steps}")
        table = {n: equal_steps_overrides(n, equal_steps) for n in names}
    if ablation is not None:  # Neighbor GRPO's variants, paired against the first (the defaults where listed)
        if ablation not in ABLATIONS:
            raise ValueError(f"--ablation: unknown {ablation!r}; choose from {list(ABLATIONS)}")
        table = {label: PAPER_SETTINGS[REFERENCE_METHOD] + extra for label, extra in ABLATIONS[ablation].items()}
        reference = next(iter(table))
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: expected a .json file (the .md table and plots are written beside it)")
    check_file_outputs(compare_outputs(out), overwrite)  # only the files it names are ever replaced
    frozen = read_frozen_target(frozen_target) if frozen_target else None
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, "--device")
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
        write_marker(out.parent, "compare")
    if base_path == "builtin:digits":
        from neighbor_grpo.pretrain import ensure_base_model, ensure_classifier

        ensure_classifier(progress=progress)
        base_path = str(ensure_base_model(progress=progress))
    proxy = build_rewards([{"name": "digit_prob"}], device=device)
    gold = load_gold(device)
    common = [f"device={device}", "prompts_per_iteration=8"]
    partial_path = out.with_name(out.stem + ".partial.json")

    def log(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    finetune = load_config(None, common).optim.finetune
    header = {
        "command": command,
        "settings": {"device": device, "budget_fe": budget_fe, "lrs": lrs, "seeds": seeds, "methods": list(table),
                     "overrides": table, "equal_steps": equal_steps, "ablation": ablation,
                     "evals_per_run": evals_per_run, "eval_samples_per_prompt": eval_samples, "proxy": "digit_prob",
                     "gold": GOLD_REWARD, "finetune": finetune, "backward_factor": backward_factor(finetune),
                     "cost_note": cost_note(finetune)},
        "rules": {"final_evaluations": rules.FINAL_EVALUATIONS, "target_fraction": rules.TARGET_FRACTION,
                  "no_worse_margin": rules.NO_WORSE_MARGIN, "confidence": rules.CONFIDENCE,
                  "lr_selection": f"highest area under the held-out proxy curve, seed {seeds[0]}",
                  "reference_method": reference},
    }

    def partial(state: dict) -> None:  # what is done so far survives an interrupted run
        atomic_write_text(partial_path, json.dumps({**header, **state}))

    measured = run_all(table, lrs, seeds, budget_fe, evals_per_run, base_path, proxy,
                       gold, [str(d) for d in range(10)], eval_samples, device, common, log, partial)
    results = {**header, **measured}
    results.update(summarize(results, frozen))
    results["wall_clock_s"] = time.perf_counter() - started
    plot_report(results, out.parent, out.stem)
    atomic_write_text(out.with_suffix(".md"), markdown_report(results) + "\n")
    atomic_write_text(out, json.dumps(results, indent=2))
    partial_path.unlink(missing_ok=True)
    return results


def compare_outputs(out: Path) -> list[Path]:
    """Every file a comparison writes: the JSON, its .md, and its two plots in the same folder."""
    return [out, out.with_suffix(".md"), out.parent / f"{out.stem}_curves.png",
            out.parent / f"{out.stem}_overoptimization.png"]
