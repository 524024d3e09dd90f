"""`ngrpo compare`'s schedule: per row, the tuning grid (lr x the method's knob) on the tuning seeds, selected by
the area under the held-out proxy curve (never the gold), or with monitor bands by the gold-free rule
(rules.select_gold_free); the lr grid widened at the chosen knob in x3 steps while the choice sits at an end (the
x3 rule: one step; issue #23: until interior, at most rules.MAX_LR_POINTS); then the reported seeds at the chosen
settings. The tuning seeds are reported too only where they are among the reported seeds (the old protocol: seed
0); the issue #23 protocol tunes on seeds never reported (100, 101). Tuning runs are scheduled before the reported
seeds', so the tuning finishes first."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.bench.workers import RunPool, schedule

GRID, X3, SEEDS = 0, 1, 2  # scheduling priorities: the tuning grid first


def proxy_auc(run: dict) -> float:
    return rules.area_under_curve([r["fe"] for r in run["curve"]], [r["proxy"] for r in run["curve"]])


def select(candidates: list[dict]) -> dict:
    """The candidate whose run has the highest area under the held-out proxy curve; ties: the smaller lr, then
    the knob listed first (the reference value)."""
    return max(candidates, key=lambda c: (proxy_auc(c["run"]), -c["lr"], -c["knob_index"]))


def x3_point(lr: float, lrs: list[float]) -> float | None:
    """The next point of the lr grid's x3 progression past the end `lr` sits at; None inside the grid."""
    low, high = min(lrs), max(lrs)
    if len(set(lrs)) < 2 or low < lr < high:
        return None
    return float(f"{(lr * 3 if lr == high else lr / 3):.3g}")


def file_stem(row: str) -> str:
    """A row's name as a file-name part (ablation labels hold spaces, '+' and ',')."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", row).strip("_")


def _scores(candidates: list[dict], bands: dict | None) -> tuple[dict, list[dict]]:
    """(best, every candidate with its score): the gold-free rule with bands, else the mean proxy area over the
    tuning seeds (the rule of the tables before issue #23; with one seed exactly `select`)."""
    if bands is not None:
        picked = rules.select_gold_free(candidates, bands)
        return picked["best"], picked["scored"]
    scored = [{**c, "score": sum(proxy_auc(r) for r in c["runs"]) / len(c["runs"])} for c in candidates]
    return max(scored, key=lambda c: (c["score"], -c["lr"], -c["knob_index"])), scored


def run_table(pool: RunPool, table: dict[str, list[str]], knobs: dict[str, list[dict]], lrs: list[float],
              seeds: list[int], x3: bool, ema: dict[str, tuple], models_dir: Path | None,
              log: Callable[[str], None], partial: Callable[[dict], None], tuning_seeds: list[int] | None = None,
              bands: dict | None = None, max_lr_points: int | None = None, tuning_gold: str = "all") -> dict:
    """Every run of the table; returns {"runs": {row: {seed: run}}, "selection": {row: ...}, "tuning_runs":
    {row: [tuning runs not reported]}}. `knobs[row]` lists the knob's entries (settings.knob_grid); `x3` turns the
    widening on: one x3 step, or up to `max_lr_points` lrs; `tuning_seeds` default to the first reported seed;
    `bands` ({monitor: [low, high]}) selects by the gold-free rule; `tuning_gold` "final": runs on a tuning seed
    that is never reported score the gold only at their last rules.FINAL_EVALUATIONS evaluations (method_run)."""
    tuning_seeds = list(tuning_seeds) if tuning_seeds else [seeds[0]]
    rest = [s for s in seeds if s not in tuning_seeds]
    grid_size = len(set(lrs))
    limit = (max_lr_points or grid_size + 1) if x3 else grid_size
    runs: dict[str, dict[str, dict]] = {row: {} for row in table}
    selection: dict[str, dict] = {}
    tuning: dict[str, list[dict]] = {row: [] for row in table}
    candidates: dict[str, dict[tuple, dict]] = {row: {} for row in table}
    pending = {row: grid_size * len(knobs[row]) * len(tuning_seeds) for row in table}
    extensions: dict[str, list[dict]] = {row: [] for row in table}
    counter = {"order": 0, "done": 0, "seconds": [], "expected": sum(pending.values()) + len(table) * len(rest)}
    completed: list[dict] = []  # every finished run, for the partial JSON (compare --resume reuses them)
    started = time.perf_counter()

    def job(row: str, lr: float, knob_index: int, seed: int, phase: int) -> tuple[tuple, dict]:
        counter["order"] += 1
        knob = knobs[row][knob_index]
        name = f"{file_stem(row)}_lr{lr:g}_k{knob_index}_seed{seed}.safetensors"
        spec = {"row": row, "overrides": table[row] + knob["overrides"], "lr": lr, "knob": knob["label"],
                "knob_index": knob_index, "seed": seed, "ema": ema.get(row),
                "gold_at": "final" if tuning_gold == "final" and seed not in seeds else "all",
                "model_path": str(models_dir / name) if models_dir is not None else None}
        priority = (phase, seed if phase == SEEDS else 0, counter["order"])
        return priority, {"kind": "run", "spec": spec, "phase": phase, "order": counter["order"]}

    def state() -> dict:
        return {"runs": runs, "selection": selection, "tuning_runs": tuning}

    def finish_row(row: str, best: dict, scored: list[dict]) -> list:
        tried = sorted({c["lr"] for c in scored})
        knob = knobs[row][best["knob_index"]]
        rule = (f"gold-free: monitored proxy area (rules.select_gold_free; a monitor's exit counts when sustained, "
                f"rules.band_exit), mean over tuning seeds {tuning_seeds}"
                if bands is not None else f"highest area under the held-out proxy curve, seed(s) {tuning_seeds}")
        ordered = sorted(scored, key=lambda c: (c["lr"] not in lrs, c["lr"], c["knob_index"]))
        selection[row] = {
            "rule": rule, "tuning_seeds": tuning_seeds, "knob": knob["key"], "chosen_lr": best["lr"],
            "chosen_knob": knob["label"], "chosen_overrides": knob["overrides"],
            "x3": extensions[row][0] if extensions[row] else None, "widened": extensions[row], "lrs_tried": tried,
            "at_grid_end": rules.at_grid_end(tried, best["lr"]),
            "candidates": [{"lr": c["lr"], "knob": knobs[row][c["knob_index"]]["label"], "score": c["score"],
                            "proxy_auc": sum(proxy_auc(r) for r in c["runs"]) / len(c["runs"]),
                            "final_proxy": c["runs"][0]["curve"][-1]["proxy"],
                            **{k: c[k] for k in ("band_exit_fe", "first_band_exit_fe") if k in c}}
                           for c in ordered]}
        for c in scored:
            for run in c["runs"]:
                if c is best and run["seed"] in seeds:
                    runs[row][str(run["seed"])] = run
                else:
                    tuning[row].append(run)
        return [job(row, best["lr"], best["knob_index"], seed, SEEDS) for seed in rest]

    def finished(job_: dict, run: dict) -> list:
        spec = job_["spec"]
        row = spec["row"]
        if len(run["curve"]) - 1 < rules.FINAL_EVALUATIONS:  # the final value needs 3 evaluations after the base
            raise ValueError(f"--budget-fe: {row} costs {run['fe_per_iter']:.0f} forward-equivalents per iteration, "
                             f"so the budget gives it {len(run['curve']) - 1} held-out evaluations; expected >= "
                             f"{rules.FINAL_EVALUATIONS} (raise --budget-fe to >= {3 * run['fe_per_iter']:.0f})")
        counter["done"] += 1
        counter["seconds"].append(run["run_s"])
        completed.append({"row": row, "knob_index": spec["knob_index"], "run": run})
        left = max(counter["expected"] - counter["done"], 0)
        eta = left * statistics.mean(counter["seconds"]) / pool.workers
        log(f"[{counter['done']}/{counter['expected']}] {row} lr={spec['lr']:g} {spec['knob']} seed={spec['seed']}: "
            f"{run['iterations']} it, final gold {run['curve'][-1]['gold']:.3f}, proxy {run['curve'][-1]['proxy']:.3f} "
            f"({run['run_s']:.0f} s; {time.perf_counter() - started:.0f} s so far, about {eta / 60:.1f} min left)")
        new: list = []
        if job_["phase"] == SEEDS:
            runs[row][str(spec["seed"])] = run
        else:
            key = (spec["lr"], spec["knob_index"])
            candidates[row].setdefault(key, {"lr": spec["lr"], "knob_index": spec["knob_index"], "runs": []})
            candidates[row][key]["runs"].append(run)
            pending[row] -= 1
            if pending[row] == 0:
                listed = [{**c, "runs": sorted(c["runs"], key=lambda r: tuning_seeds.index(r["seed"]))}
                          for c in candidates[row].values()]
                best, scored = _scores(listed, bands)
                tried = {c["lr"] for c in listed}
                extra = rules.widen_lrs(sorted(tried), best["lr"], max_points=limit) if x3 else None
                if extra is None or extra in tried:
                    new = finish_row(row, best, scored)
                else:
                    end = "top" if extra > best["lr"] else "bottom"
                    extensions[row].append({"lr": extra, "knob": knobs[row][best["knob_index"]]["label"],
                                            "reason": f"the choice was at the {end} end of {sorted(tried)}"})
                    pending[row] = len(tuning_seeds)
                    counter["expected"] += len(tuning_seeds)
                    new = [job(row, extra, best["knob_index"], seed, X3) for seed in tuning_seeds]
        partial({**state(), "finished_runs": completed})
        return new

    ready = [job(row, lr, k, seed, GRID) for row in table for lr in lrs for k in range(len(knobs[row]))
             for seed in tuning_seeds]
    schedule(pool, ready, finished)
    return state()
