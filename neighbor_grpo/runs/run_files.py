"""The files of a run folder: config.yaml and run.json written or checked, exports' iterations, and the folder
tidied to agree with the checkpoint a resume starts from."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from neighbor_grpo.config.train_config import TrainConfig, to_dict
from neighbor_grpo.parallel.distributed import Processes
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.runs.runfolder import RunFolderError

PREVIOUS_BEST = ".best-previous"  # the committed best/ export, kept until the next checkpoint commits a newer one


def run_metadata(config: TrainConfig) -> dict:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("neighbor_grpo", "diffusers", "peft", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "neighbor_grpo" else "neighbor-grpo")
        except Exception:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "command": sys.argv, "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def remove_tree(path: Path) -> None:
    """Rename aside, then delete: a kill half-way leaves a hidden .tmp-* folder, never a torn visible one."""
    if not path.exists():
        return
    aside = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def export_iteration(folder: Path) -> int | None:
    """The iteration an export folder (best/) was taken at, from its model.json; None if unknown."""
    try:
        value = json.loads((folder / "model.json").read_text()).get("iteration")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def tidy_for_resume(run: Path, start: int, counters: dict) -> None:
    """Make the run folder agree with the checkpoint the run resumes from (`start` iterations done): drop what a
    killed process left half-written or wrote after that checkpoint (it is replayed)."""
    for folder in (run, run / "samples", run / "base", run / "best", run / "aligned"):
        if folder.is_dir():
            for item in folder.glob(".*.tmp"):  # atomic_write temporaries
                item.unlink(missing_ok=True)
    for item in run.glob(".tmp-*"):  # half-built exports (.tmp-best, .tmp-aligned, .tmp-base, .tmp-old-*)
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    if start == 0:  # no checkpoint: start over; the logs of the killed attempt would repeat iteration 0
        (run / "metrics.csv").unlink(missing_ok=True)
        shutil.rmtree(run / "tensorboard", ignore_errors=True)
    for grid in (run / "samples").glob("iter-*.png"):
        if int(grid.stem.split("-")[1]) > start:
            grid.unlink(missing_ok=True)
    # best/ must be the export of counters["best_iteration"]: an export taken after the checkpoint is undone
    best, previous, wanted = run / "best", run / PREVIOUS_BEST, counters.get("best_iteration")
    if best.is_dir() and export_iteration(best) is None and wanted is not None:
        shutil.rmtree(previous, ignore_errors=True)  # an adapter that records no iteration: keep best/ as it is
        return
    if not (best.is_dir() and export_iteration(best) == wanted):
        remove_tree(best)
        if previous.is_dir() and export_iteration(previous) == wanted and wanted is not None:
            os.replace(previous, best)
        elif wanted is not None:  # lost (only after checkpoint corruption): the next better evaluation re-exports
            counters["best_heldout"], counters["best_iteration"] = -math.inf, None
    shutil.rmtree(previous, ignore_errors=True)


def prepare_run_folder(run: Path, config: TrainConfig, resume: bool, processes: Processes) -> bool:
    """Write config.yaml and run.json (resuming: keep them; resume.resume_config checks the config). Returns
    whether this is a resume after all."""
    if resume and not (run / "config.yaml").is_file():
        leftovers = sorted(p.name for p in run.iterdir() if p.name != ".lock")
        if leftovers:
            raise RunFolderError(f"--resume {str(run)!r}: not a run folder (no config.yaml; it holds "
                                 f"{leftovers[:5]})")
        resume = False  # killed before it wrote anything: this is a fresh start
    if resume:
        if not (run / "run.json").is_file():
            atomic_write_text(run / "run.json", json.dumps(run_metadata(config), indent=2))
    else:
        metadata = {**run_metadata(config), "processes": processes.world_size, "parallel": processes.strategy,
                    "exact_replay": True}  # false once a resume accepts a changed setting (resume.record_changes)
        atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        atomic_write_text(run / "run.json", json.dumps(metadata, indent=2))
    return resume
