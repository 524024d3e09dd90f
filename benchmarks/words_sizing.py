"""CPU cost of the words comparison's parts, measured small, and the comparison's size estimated from them (issue #24).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/words_sizing.py --out benchmarks/results/words/sizing.json

One thread, `time.process_time` (CPU-seconds: what a quiet core gives, whatever else runs on the machine), on the
committed builtin:words base at the task's settings (bench/tasks.py: LoRA rank 8, the `ocr` recognize proxy):

- one training iteration of each first-table method at `--prompts` training words (the task trains on 8; the
  cost of 8 is extrapolated linearly from `--prompts`, and measured at 8 for `--calibrate` to check the
  extrapolation, which over-estimates where a larger batch is cheaper per sample);
- one held-out evaluation of the 49 held-out words x `--samples` with the headline sampler (euler40: sampling,
  the proxy, the monitors, the distance probe) and with the side sampler (dpm8: sampling and the proxy), and the
  distance probe's one-off set-up per run;
- the gold (Tesseract) per image, on those held-out samples (the tesseract program's CPU time included: it runs
  as a child process per image).

`--parts` measures the evaluation or the training alone; `--from` merges earlier measurement files (later ones win
per part) and prints the estimate of `--plan` (budget, evaluations per run, samples per word) choices.

`estimate` turns these into the CPU-seconds of a whole comparison (every run the grid makes, its evaluations and
the gold where it is scored) and the wall-clock on `--workers` single-thread workers. Not CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

FIRST_TABLE = ("neighbor_grpo", "flow_grpo", "dance_grpo", "mix_grpo_flash", "flow_grpo_cps", "dgpo")
TASK_PROMPTS = 8  # the words task's prompts per iteration (bench/tasks.py)


def cpu_seconds() -> float:
    """CPU-seconds of this process and of its finished child processes: pytesseract runs the tesseract program
    once per image, whose time `time.process_time` alone would not count."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def cpu(fn):
    """(result, CPU-seconds it took, its child processes' included)."""
    started = cpu_seconds()
    result = fn()
    return result, cpu_seconds() - started


def config_for(row: str, task, prompts: int, extra: list[str] = ()):
    from neighbor_grpo.bench.settings import PAPER_SETTINGS
    from neighbor_grpo.config.train_config import load_config

    return load_config(None, ["device=cpu", *task.settings, *PAPER_SETTINGS[row], f"prompts_per_iteration={prompts}",
                              "optim.lr=1e-3", "seed=0", *extra])


def fe_per_iteration(config) -> float:
    from neighbor_grpo.training.cost import config_schedule, schedule_forward_equivalents

    return schedule_forward_equivalents(config_schedule(config), config.optim.finetune)


def measure_iterations(row: str, task, base: str, proxy, prompts: int, iterations: int) -> dict:
    """CPU-seconds of each of `iterations` training iterations of `row` at `prompts` training words."""
    from neighbor_grpo.training.iteration import train_iteration
    from neighbor_grpo.training.parts import build_training_parts, load_model

    config = config_for(row, task, prompts)
    adapter = load_model(base, "cpu", progress=False)
    parts = build_training_parts(config, adapter)
    seconds = []
    for k in range(iterations):
        _, spent = cpu(lambda: train_iteration(config, adapter, proxy, parts.algorithm, parts.optimizer, parts.params,
                                               None, parts.reference_velocity, list(task.train_prompts), k,
                                               lambda point: None, parts=parts))
        seconds.append(spent)
    return {"prompts": prompts, "cpu_s": seconds, "fe_per_iteration": fe_per_iteration(config)}


def measure_evaluation(task, base: str, proxy, gold, samples: int) -> dict:
    """One held-out evaluation's parts on the 49 held-out words x `samples`, and the gold per image."""
    from neighbor_grpo.bench.compare import EVAL_SAMPLERS
    from neighbor_grpo.bench.method_run import DistanceProbe
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.monitors import evaluate, nearest_real_distance
    from neighbor_grpo.training.parts import load_model, model_shift

    adapter = load_model(base, "cpu", progress=False)
    shift = model_shift(load_config(None, ["device=cpu"]), adapter)
    prompts, seed = list(task.eval_prompts), 0
    reference, reference_s = cpu(lambda: task.realism_reference(adapter))  # once per worker
    probe, probe_setup_s = cpu(lambda: DistanceProbe(adapter, prompts, seed, shift))
    (_, images), euler_s = cpu(lambda: evaluate(adapter, proxy, prompts, samples, seed, *EVAL_SAMPLERS["euler40"], shift))
    flat = images.flatten(0, 1).clamp(0, 1)
    _, realism_s = cpu(lambda: nearest_real_distance(flat, reference))
    _, probe_s = cpu(lambda: probe(adapter))
    _, dpm8_s = cpu(lambda: evaluate(adapter, proxy, prompts, samples, seed, *EVAL_SAMPLERS["dpm8"], shift))
    flat_prompts = [p for p in prompts for _ in range(samples)]
    scores, gold_s = cpu(lambda: gold(flat, flat_prompts))
    return {"words": len(prompts), "samples_per_word": samples, "images": len(flat_prompts),
            "euler40_sample_proxy_monitors_s": euler_s, "realism_s": realism_s, "probe_s": probe_s,
            "dpm8_sample_proxy_s": dpm8_s, "probe_setup_s": probe_setup_s, "realism_reference_s": reference_s,
            "gold_s": gold_s, "gold_s_per_image": gold_s / len(flat_prompts),
            "gold_mean_on_these_samples": float(scores.float().mean())}


def evaluations_of(points: list[float], fe_per_iter: float) -> int:
    """Held-out evaluations of a run: the base model's and one per distinct iteration boundary past the points."""
    return 1 + len({math.ceil(p / fe_per_iter - 1e-9) for p in points})


def estimate(measured: dict, budget_fe: float, evals_per_run: int, eval_samples: int, workers: int = 2,
             lrs: int = 2, tuning_seeds: int = 2, seeds: int = 5, widened_lrs: int = 1, tuning_gold: str = "final",
             side_sampler: bool = False, throughput_iterations: int = 0, shared_base: bool = False,
             prompts: int = TASK_PROMPTS) -> dict:
    """CPU-seconds and wall-clock of the comparison from the measured parts: per row, every tuning run (the lr grid
    x the protocol's candidates x the tuning seeds, `widened_lrs` x3 points added at the chosen candidate) and the
    reported seeds, each trained to the budget and evaluated at the evaluation points (the gold at every
    evaluation of a reported run; of a tuning run at the last 3 with `tuning_gold` final). `shared_base`: the base
    model's evaluation (its gold too) and the probe's set-up once per worker, not once per run (ngrpo compare since
    issue #24's sizing: bench.method_run.base_evaluation). `prompts`: training words per iteration (the cost of an
    iteration scales with its forward-equivalents: measured at 8 words)."""
    from neighbor_grpo.bench import rules
    from neighbor_grpo.bench.settings import protocol_grid
    from neighbor_grpo.bench.tasks import TASKS

    task = TASKS["words"]()
    ev = measured["evaluation"]
    per_sample = eval_samples / ev["samples_per_word"]
    evaluation_s = (ev["euler40_sample_proxy_monitors_s"] + ev["realism_s"]) * per_sample + ev["probe_s"]
    if side_sampler:
        evaluation_s += ev["dpm8_sample_proxy_s"] * per_sample
    gold_s = ev["gold_s_per_image"] * ev["words"] * eval_samples * (2 if side_sampler else 1)
    points = rules.evaluation_points(budget_fe, evals_per_run)
    rows, total = {}, 0.0
    for row, m in measured["methods"].items():
        config = config_for(row, task, prompts)
        fe = fe_per_iteration(config)
        iterations = max(1, math.ceil(budget_fe / fe))
        candidates = len(protocol_grid(row, config_overrides(row, task), measured["latent_elements"], iterations))
        iter_s = m["iteration_cpu_s_at_8"] * fe / fe_per_iteration(config_for(row, task, TASK_PROMPTS))
        evaluations = evaluations_of(points, fe)
        own = 0 if shared_base else 1  # the base's evaluation and the probe's set-up in each run
        setup_s = own * ev["probe_setup_s"]
        reported_run = iterations * iter_s + (evaluations - 1 + own) * (evaluation_s + gold_s) + setup_s
        gold_evaluations = evaluations if tuning_gold == "all" else min(rules.FINAL_EVALUATIONS, evaluations)
        gold_evaluations -= (1 - own) * (gold_evaluations == evaluations)
        tuning_run = iterations * iter_s + (evaluations - 1 + own) * evaluation_s + gold_evaluations * gold_s + setup_s
        tuning_runs = (lrs * candidates + widened_lrs) * tuning_seeds
        row_s = tuning_runs * tuning_run + seeds * reported_run + throughput_iterations * iter_s * workers
        rows[row] = {"fe_per_iteration": fe, "iterations": iterations, "evaluations": evaluations,
                     "candidates": candidates, "tuning_runs": tuning_runs, "reported_runs": seeds,
                     "iteration_cpu_s": iter_s, "tuning_run_cpu_s": tuning_run, "reported_run_cpu_s": reported_run,
                     "row_cpu_s": row_s}
        total += row_s
    if shared_base:  # once per worker: the probe, the base's evaluation and its gold
        total += workers * (ev["probe_setup_s"] + evaluation_s + gold_s)
    runs = sum(r["tuning_runs"] + r["reported_runs"] for r in rows.values())
    return {"budget_fe": budget_fe, "evals_per_run": evals_per_run, "eval_samples": eval_samples, "workers": workers,
            "tuning_gold": tuning_gold, "side_sampler": side_sampler, "widened_lrs": widened_lrs,
            "tuning_seeds": tuning_seeds, "throughput_iterations": throughput_iterations, "shared_base": shared_base,
            "prompts_per_iteration": prompts,
            "evaluation_cpu_s": evaluation_s, "gold_cpu_s_per_evaluation": gold_s, "runs": runs, "rows": rows,
            "total_cpu_s": total, "wall_clock_h": total / workers / 3600}


def config_overrides(row: str, task) -> list[str]:
    from neighbor_grpo.bench.settings import PAPER_SETTINGS

    return ["device=cpu", *task.settings, *PAPER_SETTINGS[row]]


def merged(paths: list[str]) -> dict:
    """Measurement files merged: each part (the evaluation, each method) from the last file that holds it."""
    out = {"methods": {}, "from": []}
    for path in paths:
        record = json.loads(Path(path).read_text())
        out["from"].append({"path": path, "command": record["command"], "clock": record["clock"]})
        out["latent_elements"] = record["latent_elements"]
        if "evaluation" in record:
            out["evaluation"] = record["evaluation"]
        out["methods"].update(record["methods"])
    return out


def plan_choice(text: str) -> tuple[float, int, int]:
    budget, evals, samples = text.split(":")
    return float(budget), int(evals), int(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON to write")
    parser.add_argument("--parts", nargs="+", default=["evaluation", "training"], choices=["evaluation", "training"])
    parser.add_argument("--methods", nargs="+", default=list(FIRST_TABLE))
    parser.add_argument("--prompts", type=int, default=1, help="training words per measured iteration")
    parser.add_argument("--iterations", type=int, default=2, help="measured iterations per method (the last is used)")
    parser.add_argument("--calibrate", nargs="*", default=["neighbor_grpo"],
                        help="methods also measured at the task's 8 words (one iteration after one at --prompts)")
    parser.add_argument("--samples", type=int, default=2, help="held-out samples per word of the measured evaluation")
    parser.add_argument("--from", dest="sources", nargs="+", metavar="JSON",
                        help="measure nothing: merge these measurement files and estimate --plan")
    parser.add_argument("--plan", nargs="+", type=plan_choice, default=[(40000.0, 4, 2)],
                        metavar="BUDGET:EVALS:SAMPLES", help="choices to estimate (--budget-fe, --evals-per-run, "
                                                             "--eval-samples)")
    parser.add_argument("--widened-lrs", type=int, default=1, help="x3 points added per row (0 to 4)")
    parser.add_argument("--tuning-seeds", type=int, default=2, help="how many tuning seeds (the protocol's: 2)")
    parser.add_argument("--tuning-gold", default="final", choices=["all", "final"], help="as ngrpo compare's")
    parser.add_argument("--side-sampler", action="store_true", help="with the dpm8 side evaluation (and its gold)")
    parser.add_argument("--own-base-evaluation", action="store_true",
                        help="each run evaluates the base and sets up the probe itself (ngrpo compare before the "
                             "shared base evaluation)")
    parser.add_argument("--prompts-per-iteration", type=int, default=TASK_PROMPTS,
                        help="training words per iteration (the words task's)")
    parser.add_argument("--throughput-iterations", type=int, default=3,
                        help="iterations per row and worker of the throughput measurement (warm-up included)")
    args = parser.parse_args(argv)
    from neighbor_grpo.runs.io import atomic_write_text

    command = "python benchmarks/words_sizing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.sources:
        measured = merged(args.sources)
        result = {"command": command, "measured": measured, "estimates": [
            estimate(measured, budget, evals, samples, widened_lrs=args.widened_lrs, tuning_seeds=args.tuning_seeds,
                     throughput_iterations=args.throughput_iterations, tuning_gold=args.tuning_gold,
                     side_sampler=args.side_sampler, shared_base=not args.own_base_evaluation,
                     prompts=args.prompts_per_iteration)
            for budget, evals, samples in args.plan]}
        for e in result["estimates"]:
            print(f"budget {e['budget_fe']:g} FE, {e['evals_per_run']} evaluations x {e['eval_samples']} samples, "
                  f"{e['prompts_per_iteration']} words per iteration, base evaluation "
                  f"{'shared' if e['shared_base'] else 'per run'}, "
                  f"{e['tuning_seeds']} tuning seed(s), tuning gold {e['tuning_gold']}, side sampler "
                  f"{'dpm8' if e['side_sampler'] else 'none'}: "
                  f"{e['runs']} runs, {e['total_cpu_s']:.0f} CPU-s, {e['wall_clock_h']:.2f} h on {e['workers']} "
                  f"workers", flush=True)
    else:
        result = measure(command, args)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return result


def measure(command: str, args) -> dict:
    from neighbor_grpo.bench import tasks
    from neighbor_grpo.bench.compare import latent_elements

    torch.set_num_threads(1)
    task = tasks.TASKS["words"]()
    task.check_rewards(False)  # Tesseract, or one line naming what to install
    base = task.resolve_base("builtin:words", False)
    proxy, gold = tasks.load_rewards(task, "cpu")
    result = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "clock": "time.process_time + finished children's CPU (os.times)",
              "latent_elements": latent_elements(base), "methods": {}}
    if "evaluation" in args.parts:
        result["evaluation"] = measure_evaluation(task, base, proxy, gold, args.samples)
        print(json.dumps(result["evaluation"], indent=1), flush=True)
    for row in args.methods if "training" in args.parts else []:
        measured = measure_iterations(row, task, base, proxy, args.prompts, args.iterations)
        measured["iteration_cpu_s_at_8"] = measured["cpu_s"][-1] * TASK_PROMPTS / args.prompts
        measured["extrapolated_from"] = args.prompts
        if row in args.calibrate and args.prompts != TASK_PROMPTS:
            at_8 = measure_iterations(row, task, base, proxy, TASK_PROMPTS, 1)
            measured["measured_at_8"] = at_8["cpu_s"][-1]
        result["methods"][row] = measured
        print(row, json.dumps(measured), flush=True)
    return result


if __name__ == "__main__":
    main()
