"""Side-by-side comparison of Neighbor GRPO and the SDE baselines at an equal forward-equivalent budget.

Every method starts from the same base model, trains on the same proxy reward (the task's, bench/tasks.py: the
digit classifier on builtin:digits, rapidocr on builtin:words) and prompts, for the same budget of
forward-equivalents (neighbor_grpo.training.cost). Held-out evaluations (ODE sampler, seeds never trained on) run at
the same forward-equivalent points for every method (benchmark_rules.evaluation_points) and score the proxy, the
gold (never trained on, never used to select anything), the hacking monitors and the distance from the base model.
What runs: compare_settings; one run: compare_run; the tuning grid, the x3 rule and the seeds: compare_grid; where
runs execute: compare_workers; seconds per iteration: compare_throughput. The rules that turn curves into a table
live in benchmark_rules; the table, the intervals and the plots in compare_report.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.cost import backward_factor, cost_note
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.bench.report import compare_outputs, read_frozen_target  # noqa: F401  (re-exported)
from neighbor_grpo.bench.tasks import BASES, task_for_base
from neighbor_grpo.bench.workers import schedule
from neighbor_grpo.bench.method_run import GOLD_REWARD, DistanceProbe, load_gold, run_method  # noqa: F401  (re-exported)
from neighbor_grpo.bench.settings import (ABLATIONS, KNOBS, LIBRARY_DEFAULTS, MAIN_TABLE, PAPER_SETTINGS,  # noqa: F401
                                            REFERENCE_EMA, REFERENCE_METHOD, REFERENCE_OPTIMIZER, equal_steps_overrides,
                                            knob_grid, protocol_grid)

EVAL_SAMPLERS = {"dpm8": ("dpm++2m", 8), "euler40": ("euler", 40)}


def eval_sampler_steps(name: str, flag: str = "--eval-sampler") -> tuple[str, int]:
    """The held-out sampler as (solver, steps): a preset (dpm8, euler40) or SOLVER:STEPS (euler:4, the few-step
    sampler a distilled model is used with)."""
    from neighbor_grpo.maths.solvers import SOLVERS

    if name in EVAL_SAMPLERS:
        return EVAL_SAMPLERS[name]
    solver, _, steps = name.partition(":")
    if solver in SOLVERS and steps.isdigit() and int(steps) >= 1:
        return solver, int(steps)
    raise ValueError(f"{flag}: expected {' or '.join(sorted(EVAL_SAMPLERS))}, or SOLVER:STEPS with a solver "
                     f"of {sorted(SOLVERS)} and >= 1 steps (euler:4), got {name!r}")
"""Held-out samplers: the 8-step DPM-Solver++ of the tables before issue #23 (Neighbor GRPO's rollout sampler) and
the neutral 40-step Euler ODE the references evaluate with; with euler40 the dpm8 gold is recorded beside it."""
TUNING_GOLD = ("all", "final")
"""Where tuning runs on seeds never reported score the gold: at every evaluation, or at the final value's only."""


def side_sampler_steps(name: str | None, eval_sampler: str) -> tuple[str, int] | None:
    """The side sampler scored beside the headline as (solver, steps), or None: `none` skips it; by default (None)
    dpm8 beside any other headline sampler (the tables of issue #23)."""
    if name is None:
        return None if eval_sampler == "dpm8" else EVAL_SAMPLERS["dpm8"]
    if name == "none":
        return None
    return eval_sampler_steps(name, flag="--side-sampler")


def check_arguments(budget_fe: float, seeds: list[int], lrs: list[float], evals_per_run: int, eval_samples: int,
                    methods: list[str], workers: int = 1, throughput_iters: int = 6, throughput_warmup: int = 1,
                    reference: str = REFERENCE_METHOD) -> None:
    """One-line errors naming the flag, before anything runs."""
    if not budget_fe > 0:
        raise ValueError(f"--budget-fe: expected > 0 forward-equivalents, got {budget_fe:g}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: expected distinct integers >= 0, got {seeds}")
    if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs: expected distinct learning rates > 0, got {lrs}")
    if evals_per_run < rules.FINAL_EVALUATIONS:
        raise ValueError(f"--evals-per-run: expected >= {rules.FINAL_EVALUATIONS}, got {evals_per_run}")
    if eval_samples < 2:
        raise ValueError(f"--eval-samples: expected >= 2 samples per prompt (diversity needs pairs), got {eval_samples}")
    unknown = [n for n in methods if n not in PAPER_SETTINGS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(PAPER_SETTINGS)}")
    if reference not in methods:
        raise ValueError(f"--methods: must include {reference} (every comparison is paired against it; --reference "
                         f"names another row)")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods: expected distinct names, got {methods}")
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1 worker processes, got {workers}")
    if throughput_iters < 0:
        raise ValueError(f"--throughput-iters: expected >= 0 timed iterations (0 skips the measurement), got "
                         f"{throughput_iters}")
    if throughput_warmup < 0:
        raise ValueError(f"--throughput-warmup: expected >= 0 iterations, got {throughput_warmup}")


def resolve_base(base_path: str, progress: bool) -> str:
    """The base model's folder: a built-in model (`builtin:NAME`, pretrained and cached on first use) or a model
    folder; first what its task's rewards need (the digit classifier built on first use, Tesseract present)."""
    if base_path.startswith("builtin:") and base_path not in BASES:
        raise ValueError(f"--base {base_path!r}: unknown built-in model; expected one of {', '.join(BASES)} or a "
                         f"model folder")
    task = task_for_base(base_path)
    task.check_rewards(progress)
    return task.resolve_base(base_path, progress)


def check_protocol(seeds: list[int], lrs: list[float], tuning_seeds: list[int] | None, max_lr_points: int | None,
                   eval_sampler: str, tuning_gold: str = "all", side_sampler: str | None = None) -> None:
    """One-line errors for the issue #23 flags, before anything runs."""
    if tuning_seeds is not None:
        if not tuning_seeds or len(set(tuning_seeds)) != len(tuning_seeds) or min(tuning_seeds) < 0:
            raise ValueError(f"--tuning-seeds: expected distinct integers >= 0, got {tuning_seeds}")
        if set(tuning_seeds) & set(seeds):
            raise ValueError(f"--tuning-seeds: expected seeds never reported, but {sorted(set(tuning_seeds) & set(seeds))} "
                             f"are also in --seeds")
    if max_lr_points is not None and not len(lrs) <= max_lr_points <= rules.MAX_LR_POINTS:
        raise ValueError(f"--max-lr-points: expected {len(lrs)} (the --lrs given) to {rules.MAX_LR_POINTS}, got "
                         f"{max_lr_points}")
    eval_sampler_steps(eval_sampler)  # refused here, before any run
    side_sampler_steps(side_sampler, eval_sampler)
    if tuning_gold not in TUNING_GOLD:
        raise ValueError(f"--tuning-gold: expected {' or '.join(TUNING_GOLD)}, got {tuning_gold!r}")
    if tuning_gold == "final" and tuning_seeds is None:
        raise ValueError("--tuning-gold final: expected --tuning-seeds (seeds never reported); without them the "
                         "tuning runs are the first reported seed's, whose whole gold curve the table reads")


def iterations_in_budget(overrides: list[str], common: list[str], budget_fe: float) -> int:
    """Iterations a row gets from the budget, at the cost its call schedule implies (its first iteration's)."""
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    config = load_config(None, common + overrides)
    return max(1, math.ceil(budget_fe / schedule_forward_equivalents(config_schedule(config), config.optim.finetune)))


def git_commit() -> str | None:
    """The checkout's HEAD commit (None outside git): what the results were produced by."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def check_evaluations(table: dict[str, list[str]], points: list[float], common: list[str]) -> None:
    """Refuse, before any run, a budget that gives a row fewer than 3 held-out evaluations, where its cost per
    iteration is what its call schedule implies (at its first iteration: MixGRPO's window moves)."""
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    for row, overrides in table.items():
        config = load_config(None, common + overrides)
        per_iteration = schedule_forward_equivalents(config_schedule(config), config.optim.finetune)
        evaluations = len({math.ceil(p / per_iteration - 1e-9) for p in points})
        if evaluations < rules.FINAL_EVALUATIONS:
            raise ValueError(f"--budget-fe: {row} costs {per_iteration:.0f} forward-equivalents per iteration, so "
                             f"{points[-1]:g} gives it {evaluations} held-out evaluations; expected >= "
                             f"{rules.FINAL_EVALUATIONS} (raise --budget-fe to >= {3 * per_iteration:.0f})")


def latent_elements(base_path: str) -> int:
    """D: the number of latent elements of the base model's samples (the clip scaling's D)."""
    from neighbor_grpo.training.parts import load_model

    return math.prod(load_model(base_path, "cpu", progress=False).latent_shape())


def compare(out: str | Path, budget_fe: float = 60000.0, lrs: tuple[float, ...] = (1e-4, 3e-4),
            methods: list[str] | None = None, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), evals_per_run: int = 24,
            eval_samples: int = 32, frozen_target: str | Path | None = None, equal_steps: int | None = None,
            ablation: str | None = None, device: str | None = None, base_path: str = "builtin:digits",
            overwrite: bool = False, progress: bool = True, command: str | None = None, workers: int = 1,
            grid: bool = True, throughput_iters: int = 6, throughput_warmup: int = 1,
            reference: str = REFERENCE_METHOD, x3: bool = True, tuning_seeds: tuple[int, ...] | None = None,
            bands: str | Path | None = None, max_lr_points: int | None = None, eval_sampler: str = "dpm8",
            parity_grid: bool = False, tuning_gold: str = "all", side_sampler: str | None = None,
            resume: bool = False) -> dict:
    """Run the comparison; write the results JSON, a markdown table, PNG plots and every run's final weights
    (`<stem>_models/`) next to `out`. The issue #23 protocol: `tuning_seeds` never reported, `bands` (a bands file)
    for the gold-free rule, `max_lr_points` to widen the lr grid until the choice is interior, `eval_sampler`
    'euler40', `parity_grid` for anchoring parity, CPS's scaled clip and the warm-up variants. `tuning_gold`
    'final': tuning runs score the gold only at the last rules.FINAL_EVALUATIONS evaluations (nothing else reads
    it); `side_sampler` 'none' skips the side sampler's evaluation (default: dpm8 beside any other headline).
    `resume`: continue from `<out stem>.partial.json`, reusing its finished runs (bench/resume.py)."""
    from neighbor_grpo.bench.grid import run_table
    from neighbor_grpo.bench.report import markdown_report, plot_report, summarize
    from neighbor_grpo.bench.workers import RunPool
    from neighbor_grpo.parallel.distributed import check_device
    from neighbor_grpo.bench.resume import ReusingPool, finished_runs, read_partial
    from neighbor_grpo.runs.ownership import check_file_outputs, check_folder_target, marker_kind, write_marker

    names = list(methods or MAIN_TABLE)
    seeds, lrs = [int(s) for s in seeds], [float(lr) for lr in lrs]
    check_arguments(budget_fe, seeds, lrs, evals_per_run, eval_samples, names, workers, throughput_iters,
                    throughput_warmup, reference)
    tuning_seeds = None if tuning_seeds is None else [int(s) for s in tuning_seeds]
    check_protocol(seeds, lrs, tuning_seeds, max_lr_points, eval_sampler, tuning_gold, side_sampler)
    side = side_sampler_steps(side_sampler, eval_sampler)
    from neighbor_grpo.bench.bands import bands_record

    band_file = bands_record(bands) if bands is not None else None
    table = {n: PAPER_SETTINGS[n] for n in names}
    if equal_steps is not None:
        if equal_steps < 1:  # 1 step: Neighbor GRPO only (the SDE baselines' last step is deterministic)
            raise ValueError(f"--equal-steps: expected >= 1 rollout steps, got {equal_steps}")
        table = {n: equal_steps_overrides(n, equal_steps) for n in names}
    if ablation is not None:  # Neighbor GRPO's variants, paired against the first (the defaults where listed)
        if ablation not in ABLATIONS:
            raise ValueError(f"--ablation: unknown {ablation!r}; choose from {list(ABLATIONS)}")
        table = {label: LIBRARY_DEFAULTS + extra for label, extra in ABLATIONS[ablation].items()}
        reference = next(iter(table))
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out {str(out)!r}: expected a .json file (the .md table and plots are written beside it)")
    check_file_outputs(compare_outputs(out), overwrite)  # only the files it names are ever replaced
    models_dir = out.parent / f"{out.stem}_models"
    partial_path = out.with_name(out.stem + ".partial.json")
    if resume and models_dir.exists():  # the interrupted comparison's own weights, reused where intact
        if not models_dir.is_dir() or marker_kind(models_dir) != "compare":
            raise ValueError(f"--resume: {str(models_dir)!r} was not made by ngrpo compare; give a new --out")
    else:
        check_folder_target(models_dir, overwrite, "--out")  # refused now, not after an hour of runs
    if resume and not partial_path.is_file():
        raise ValueError(f"--resume: {str(partial_path)!r} does not exist; nothing to continue (run without --resume)")
    frozen = read_frozen_target(frozen_target) if frozen_target else None
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, "--device")
    task = task_for_base(base_path)  # what is trained and scored: digits, or words (bench/tasks.py)
    common = [f"device={device}", *task.settings]
    points = rules.evaluation_points(budget_fe, evals_per_run)
    check_evaluations(table, points, common)
    base_path = resolve_base(base_path, progress)
    elements = latent_elements(base_path)
    if parity_grid:
        knobs = {row: protocol_grid(row, overrides, elements, iterations_in_budget(overrides, common, budget_fe))
                 for row, overrides in table.items()}
    else:
        knobs = {row: knob_grid(row, overrides, elements) for row, overrides in table.items()}
    knobs = {row: entries[:None if grid else 1] for row, entries in knobs.items()}
    ema = {row: REFERENCE_EMA[row] for row in table if row in REFERENCE_EMA}
    for folder in (out.parent, models_dir):
        if not folder.exists():
            folder.mkdir(parents=True)
            write_marker(folder, "compare")

    def log(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    finetune = load_config(None, common).optim.finetune
    header = {
        "command": command,
        "settings": {"device": device, "base": base_path, "latent_elements": elements, "budget_fe": budget_fe,
                     "lrs": lrs, "seeds": seeds, "methods": list(table), "overrides": table,
                     "knobs": {row: [{k: e[k] for k in ("label", "key", "value")} for e in entries]
                               for row, entries in knobs.items()},
                     "grid": grid, "x3": grid and x3, "reference_ema": ema, "equal_steps": equal_steps, "ablation": ablation,
                     "workers": workers, "threads_per_run": 1,
                     "evals_per_run": evals_per_run, "eval_samples_per_prompt": eval_samples, "task": task.name,
                     "train_prompts": list(task.train_prompts), "eval_prompts": list(task.eval_prompts),
                     "proxy": task.proxy["name"], "gold": task.gold["name"], "finetune": finetune,
                     "backward_factor": backward_factor(finetune), "cost_note": cost_note(finetune), "tuning_seeds": tuning_seeds or seeds[:1],
                     "tuning_seeds_reported": tuning_seeds is None, "max_lr_points": max_lr_points,
                     "parity_grid": parity_grid, "eval_sampler": {"name": eval_sampler,
                                                                  "solver_steps": eval_sampler_steps(eval_sampler)},
                     "side_sampler": None if side is None else {"name": side_sampler or "dpm8", "solver_steps": side},
                     "tuning_gold": {"scored_at": tuning_gold, "note": "tuning runs (seeds never reported) score the "
                                     "gold at every evaluation" if tuning_gold == "all" else "tuning runs (seeds never "
                                     f"reported) score the gold only at their last {rules.FINAL_EVALUATIONS} "
                                     "evaluations (the final value); earlier records hold null"},
                     "realism_reference": task.realism_note,
                     "base_evaluation": "the base model's held-out evaluation (iteration 0) and distance probe computed "
                                        "once per worker process and shared by every run with the same base and "
                                        "evaluation (bench.method_run.base_evaluation_key)"},
        "commit": git_commit(),
        "rules": {"final_evaluations": rules.FINAL_EVALUATIONS, "target_fraction": rules.TARGET_FRACTION,
                  "no_worse_margin": rules.NO_WORSE_MARGIN, "confidence": rules.CONFIDENCE,
                  "selection": _selection_rule(seeds, tuning_seeds, band_file, grid and x3, max_lr_points),
                  "bands": band_file, "time_to_target": "sustained crossing (headline), first crossing beside it",
                  "reference_method": reference},
        "eval_points": points,
    }

    reuse = finished_runs(read_partial(partial_path, header), knobs) if resume else {}

    def partial(state: dict) -> None:  # what is done so far survives an interrupted run
        atomic_write_text(partial_path, json.dumps({**header, **state}))

    context = {"budget_fe": budget_fe, "points": points, "base_path": base_path, "device": device,
               "task": task.name, "train_prompts": list(task.train_prompts), "eval_prompts": list(task.eval_prompts),
               "eval_samples": eval_samples, "common": common,
               "eval_sampler": eval_sampler_steps(eval_sampler),
               "side_sampler": side}
    with RunPool(workers, context) as workers_pool:
        pool = ReusingPool(workers_pool, reuse)
        measured = run_table(pool, table, knobs, lrs, seeds, grid and x3, ema, models_dir, log, partial,
                             tuning_seeds=tuning_seeds, bands=None if band_file is None else band_file["bands"],
                             max_lr_points=max_lr_points, tuning_gold=tuning_gold)
        results = {**header, **measured}
        if throughput_iters > 0:
            log(f"throughput: {len(table)} rows interleaved, {workers} single-thread worker(s), "
                f"{throughput_warmup} warm-up + {throughput_iters} timed iterations each")
            rows = {row: table[row] + measured["selection"][row]["chosen_overrides"]
                    + [f"optim.lr={measured['selection'][row]['chosen_lr']!r}"] for row in table}
            results["throughput"] = measure_throughput(pool, rows, workers, throughput_warmup, throughput_iters)
    if resume:
        results["resumed"] = {"from": str(partial_path), "runs_reused": pool.reused, "runs_in_partial": len(reuse),
                              "wall_clock_note": "wall_clock_s counts this invocation only; every run's run_s is "
                                                 "its own"}
    results.update(summarize(results, frozen))
    results["wall_clock_s"] = time.perf_counter() - started
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1min_before_after": [load_before, os.getloadavg()[0]]}
    plot_report(results, out.parent, out.stem)
    atomic_write_text(out.with_suffix(".md"), markdown_report(results) + "\n")
    atomic_write_text(out, json.dumps(results, indent=2))
    partial_path.unlink(missing_ok=True)
    return results


def _selection_rule(seeds: list[int], tuning_seeds: list[int] | None, band_file: dict | None, widen: bool,
                    max_lr_points: int | None) -> str:
    """The selection rule in words, as the results JSON records it."""
    on = f"tuning seeds {tuning_seeds} (never reported)" if tuning_seeds else f"seed {seeds[0]} (also reported)"
    rule = ("the gold-free rule: despiked held-out proxy area, the proxy counted as 0 from the first evaluation at "
            "which a monitor leaves its band (bands in rules.bands)" if band_file is not None
            else "highest area under the held-out proxy curve")
    text = f"lr x knob grid on {on}, {rule} (never the gold)"
    if widen:
        text += (f"; a chosen lr at an end of the lr grid adds the next x3 point at the chosen knob and re-selects, "
                 f"until interior or {max_lr_points} lrs" if max_lr_points else
                 "; a chosen lr at an end of the lr grid adds the next x3 point at the chosen knob, then re-selects")
    return text


def measure_throughput(pool, rows: dict[str, list[str]], workers: int, warmup: int, iters: int) -> dict:
    """Every row's median s/iter over the timed iterations of `workers` single-thread workers side by side."""
    pooled: dict[str, list[float]] = {name: [] for name in rows}

    def finished(job, seconds) -> list:
        for name, values in seconds.items():
            pooled[name].extend(values)
        return []

    jobs = [((0, k), {"kind": "throughput", "rows": rows, "offset": k, "warmup": warmup, "iters": iters, "order": k})
            for k in range(workers)]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    schedule(pool, jobs, finished)
    return {"s_per_iter": {name: statistics.median(values) for name, values in pooled.items()},
            "seconds_each": pooled, "workers": workers, "threads_per_worker": 1, "warmup": warmup,
            "iters_per_worker": iters, "wall_clock_s": time.perf_counter() - started,
            "load_average_1min_before_after": [load_before, os.getloadavg()[0]],  # how shared the machine was
            "method": "single-thread workers side by side, rows interleaved per iteration (rotating order), "
                      "median of every timed iteration"}
