"""`ngrpo compare`'s schedule: per row, the tuning grid (lr x the method's knob) on the first seed, selected by the
area under the held-out proxy curve (never the gold); the x3 rule (a chosen lr at an end of the lr grid adds the
next x3 point at the chosen knob, then re-selects); then the other seeds at the chosen settings. Grid runs are
scheduled before x3 runs, x3 runs before the other seeds', so the tuning finishes first."""

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


def run_table(pool: RunPool, table: dict[str, list[str]], knobs: dict[str, list[dict]], lrs: list[float],
              seeds: list[int], x3: bool, ema: dict[str, tuple], models_dir: Path | None,
              log: Callable[[str], None], partial: Callable[[dict], None]) -> dict:
    """Every run of the table; returns {"runs": {row: {seed: run}}, "selection": {row: ...}, "tuning_runs":
    {row: [seed-0 runs not chosen]}}. `knobs[row]` lists the knob's entries (compare_settings.knob_grid); `x3`
    turns the x3 rule on."""
    first, rest = seeds[0], seeds[1:]
    runs: dict[str, dict[str, dict]] = {row: {} for row in table}
    selection: dict[str, dict] = {}
    tuning: dict[str, list[dict]] = {row: [] for row in table}
    pending_grid = {row: len(lrs) * len(knobs[row]) for row in table}
    expected_x3 = {row: 1 if x3 and len(set(lrs)) > 1 else 0 for row in table}
    counter = {"order": 0, "done": 0, "seconds": []}
    started = time.perf_counter()

    def job(row: str, lr: float, knob_index: int, seed: int, phase: int) -> tuple[tuple, dict]:
        counter["order"] += 1
        knob = knobs[row][knob_index]
        name = f"{file_stem(row)}_lr{lr:g}_k{knob_index}_seed{seed}.safetensors"
        spec = {"row": row, "overrides": table[row] + knob["overrides"], "lr": lr, "knob": knob["label"],
                "knob_index": knob_index, "seed": seed, "ema": ema.get(row),
                "model_path": str(models_dir / name) if models_dir is not None else None}
        priority = (phase, seed if phase == SEEDS else 0, counter["order"])
        return priority, {"kind": "run", "spec": spec, "phase": phase, "order": counter["order"]}

    def total() -> int:
        return sum(len(lrs) * len(knobs[row]) + expected_x3[row] + len(rest) for row in table)

    def state() -> dict:
        return {"runs": runs, "selection": selection, "tuning_runs": tuning}

    def chosen(row: str, candidates: list[dict], extension: dict | None) -> list:
        # grid order, then the x3 point (not the order the workers finished them in)
        candidates = sorted(candidates, key=lambda c: (c["lr"] not in lrs, c["lr"], c["knob_index"]))
        best = select(candidates)
        knob = knobs[row][best["knob_index"]]
        selection[row] = {
            "rule": f"highest area under the held-out proxy curve, seed {first}",
            "knob": knob["key"], "chosen_lr": best["lr"], "chosen_knob": knob["label"],
            "chosen_overrides": knob["overrides"], "x3": extension,
            "candidates": [{"lr": c["lr"], "knob": knobs[row][c["knob_index"]]["label"],
                            "proxy_auc": proxy_auc(c["run"]), "final_proxy": c["run"]["curve"][-1]["proxy"]}
                           for c in candidates]}
        runs[row][str(first)] = best["run"]
        tuning[row] = [c["run"] for c in candidates if c is not best]
        return [job(row, best["lr"], best["knob_index"], seed, SEEDS) for seed in rest]

    candidates: dict[str, list[dict]] = {row: [] for row in table}

    def finished(job_: dict, run: dict) -> list:
        spec = job_["spec"]
        row = spec["row"]
        if len(run["curve"]) - 1 < rules.FINAL_EVALUATIONS:  # the final value needs 3 evaluations after the base
            raise ValueError(f"--budget-fe: {row} costs {run['fe_per_iter']:.0f} forward-equivalents per iteration, "
                             f"so the budget gives it {len(run['curve']) - 1} held-out evaluations; expected >= "
                             f"{rules.FINAL_EVALUATIONS} (raise --budget-fe to >= {3 * run['fe_per_iter']:.0f})")
        counter["done"] += 1
        counter["seconds"].append(run["run_s"])
        left = total() - counter["done"]
        eta = left * statistics.mean(counter["seconds"]) / pool.workers
        log(f"[{counter['done']}/{total()}] {row} lr={spec['lr']:g} {spec['knob']} seed={spec['seed']}: "
            f"{run['iterations']} it, final gold {run['curve'][-1]['gold']:.3f}, proxy {run['curve'][-1]['proxy']:.3f} "
            f"({run['run_s']:.0f} s; {time.perf_counter() - started:.0f} s so far, about {eta / 60:.1f} min left)")
        new: list = []
        if job_["phase"] == SEEDS:
            runs[row][str(spec["seed"])] = run
        else:
            candidates[row].append({"lr": spec["lr"], "knob_index": spec["knob_index"], "run": run})
            if job_["phase"] == GRID:
                pending_grid[row] -= 1
                if pending_grid[row] == 0:
                    best = select(candidates[row])
                    extra = x3_point(best["lr"], lrs) if x3 else None
                    if extra is None:
                        expected_x3[row] = 0
                        new = chosen(row, candidates[row], None)
                    else:
                        new = [job(row, extra, best["knob_index"], first, X3)]
            else:
                end = "top" if spec["lr"] > max(lrs) else "bottom"
                new = chosen(row, candidates[row], {"lr": spec["lr"], "knob": spec["knob"],
                                                    "reason": f"the grid's choice was at its {end} end"})
        partial(state())
        return new

    ready = [job(row, lr, k, first, GRID) for row in table for lr in lrs for k in range(len(knobs[row]))]
    schedule(pool, ready, finished)
    return state()
