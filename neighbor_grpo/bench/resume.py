"""`ngrpo compare --resume`: an interrupted comparison continued from its `.partial.json`. A run is a function of
its spec alone (one torch thread, seeded; tests/bench/test_base_evaluation.py checks that a run is bitwise the same
in another worker process), so a finished run is reused rather than recomputed, and the schedule, the selection and
the widening replay on the same numbers. Reuse needs the same settings, evaluation points and rules, and the run's
saved final weights still there with the sha256 the run recorded; anything else runs again."""

from __future__ import annotations

import json
from concurrent.futures import Future
from pathlib import Path

from neighbor_grpo.runs.io import sha256_file

CHECKED = ("settings", "eval_points", "rules")  # what must match; the command and the commit may differ


def run_key(row: str, lr: float, knob_index: int, seed: int) -> tuple:
    return row, float(f"{float(lr):.6g}"), int(knob_index), int(seed)


def read_partial(path: Path, header: dict) -> dict:
    """The partial JSON at `path`, refused (one line naming the file and the first difference) when its settings,
    evaluation points or rules are not this comparison's."""
    if not path.is_file():
        raise ValueError(f"--resume: {str(path)!r} does not exist; nothing to continue (run without --resume)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: {str(path)!r} is not a readable results JSON ({error})") from None
    expected = json.loads(json.dumps({k: header[k] for k in CHECKED}))  # tuples and floats as the file holds them
    missing = [part for part in CHECKED if not isinstance(saved, dict) or part not in saved]
    if missing:
        raise ValueError(f"--resume: {str(path)!r} has no {missing[0]!r}; expected the .partial.json of ngrpo compare")
    for part in CHECKED:
        theirs, ours = saved[part], expected[part]
        if theirs != ours:
            keys = sorted(set(theirs) | set(ours)) if isinstance(ours, dict) and isinstance(theirs, dict) else [None]
            first = next((k for k in keys if k is None or theirs.get(k) != ours.get(k)), None)
            where = part if first is None else f"{part}.{first}"
            shown = (theirs, ours) if first is None else (theirs.get(first), ours.get(first))
            raise ValueError(f"--resume: {str(path)!r} was made with other {where} ({shown[0]!r}; this command: "
                             f"{shown[1]!r}); give the same arguments, or a new --out")
    return saved


def finished_runs(saved: dict, knobs: dict[str, list[dict]]) -> dict[tuple, dict]:
    """{run_key: run} of every run the partial holds: its `finished_runs` list, or (partials written before that list
    existed) the runs of rows whose tuning had finished, found by their knob label."""
    found: dict[tuple, dict] = {}
    for entry in saved.get("finished_runs", []):
        run = entry["run"]
        found[run_key(entry["row"], run["lr"], entry["knob_index"], run["seed"])] = run
    groups = [(row, run) for row, by_seed in saved.get("runs", {}).items() for run in by_seed.values()]
    groups += [(row, run) for row, listed in saved.get("tuning_runs", {}).items() for run in listed]
    for row, run in groups:
        labels = [entry["label"] for entry in knobs.get(row, [])]
        if run.get("knob") in labels:
            found.setdefault(run_key(row, run["lr"], labels.index(run["knob"]), run["seed"]), run)
    return found


class ReusingPool:
    """A RunPool whose `submit` answers a run job from the finished runs when the run's saved weights are intact;
    everything else goes to the pool."""

    def __init__(self, pool, finished: dict[tuple, dict]):
        self.pool, self.finished, self.reused = pool, finished, 0
        self.workers = pool.workers

    def submit(self, job: dict) -> Future:
        run = self._reusable(job)
        if run is None:
            return self.pool.submit(job)
        self.reused += 1
        future: Future = Future()
        future.set_result(run)
        return future

    def _reusable(self, job: dict) -> dict | None:
        if job.get("kind") != "run":
            return None
        spec = job["spec"]
        run = self.finished.get(run_key(spec["row"], spec["lr"], spec["knob_index"], spec["seed"]))
        if run is None or not spec.get("model_path"):
            return run
        path = Path(spec["model_path"])
        if not path.is_file() or "model" not in run or sha256_file(path) != run["model"]["sha256"]:
            return None  # its weights are gone or changed: the run is recomputed (and its file rewritten)
        return {**run, "model": {**run["model"], "path": str(path)}}
