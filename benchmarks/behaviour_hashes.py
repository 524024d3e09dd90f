"""Fingerprints of the trainer's behaviour, to show that a refactor changed nothing.

Runs, with one torch thread, the demo, a 5-iteration DanceGRPO run and a 2-process DDP run (gloo), and prints
the sha256 of each run's `aligned/model.safetensors` and of its `metrics.csv` without the timing columns. With
`--resume-from CHECKPOINT_RUN` it also resumes a copy of a run stopped part-way (possibly written by older code)
and hashes the result, which must equal the uninterrupted run's.

    python benchmarks/behaviour_hashes.py --work /tmp/hashes --out before.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TIMING_COLUMNS = {"s_per_iter"}
DANCE = ["algorithm=dance_grpo", "iterations=5", "prompts_per_iteration=2", "eval.every=5", "eval.samples_per_prompt=4",
         "checkpoint_every=3", "keep_checkpoints=5"]
DDP = ["iterations=3", "prompts_per_iteration=2", "eval.every=3", "eval.samples_per_prompt=4",
       "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics_hash(path: Path) -> str:
    """metrics.csv without its timing columns (they differ run to run)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    keys = [k for k in rows[0] if k not in TIMING_COLUMNS]
    text = "\n".join(",".join(row.get(k) or "" for k in keys) for row in rows)
    return hashlib.sha256(",".join(keys).encode() + b"\n" + text.encode()).hexdigest()


def run(command: list[str], env: dict) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def fingerprint(folder: Path) -> dict:
    return {"aligned": sha256(folder / "aligned" / "model.safetensors"), "metrics": metrics_hash(folder / "metrics.csv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a scratch folder for the runs (emptied first)")
    parser.add_argument("--out", required=True, help="JSON file for the hashes")
    parser.add_argument("--resume-from", help="a 5-iteration DanceGRPO run folder of this script (possibly written by "
                        "older code): a copy is cut back to its checkpoint after 3 iterations and resumed")
    parser.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ngrpo = [sys.executable, "-m", "neighbor_grpo.cli"]
    hashes = {}
    run([*ngrpo, "demo", "--out", str(work / "demo"), "--no-progress"], env)
    hashes["demo"] = fingerprint(work / "demo")
    run([*ngrpo, "train", *DANCE, "--out", str(work / "dance"), "--no-progress"], env)
    hashes["dance_grpo"] = fingerprint(work / "dance")
    if args.resume_from:  # as if stopped after 3 iterations: the checkpoints after iteration 3 removed
        resumed = work / "dance_resumed"
        shutil.copytree(args.resume_from, resumed)
        for late in sorted((resumed / "checkpoints").glob("iter-*")):
            if int(late.name.split("-")[1]) > 3:
                shutil.rmtree(late)
        run([*ngrpo, "train", "--resume", str(resumed), "--no-progress"], env)
        hashes["dance_grpo_resumed"] = fingerprint(resumed)
    if not args.skip_ddp:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    "-m", "neighbor_grpo.cli"]
        run([*torchrun, "train", *DDP, "--out", str(work / "ddp"), "--no-progress"], env)
        hashes["ddp_2_processes"] = fingerprint(work / "ddp")
    Path(args.out).write_text(json.dumps(hashes, indent=2) + "\n")
    print(json.dumps(hashes, indent=2))


if __name__ == "__main__":
    main()
