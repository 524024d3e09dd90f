"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, a manifest of checksums.

A checkpoint is a folder `checkpoints/iter-000020/` written under a temporary name and renamed into place,
so it either exists whole or not at all; a torn or corrupted one fails its checksums and is skipped.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neighbor_grpo.runs.io import atomic_write_text, fsync_dir, load_safetensors, save_safetensors, sha256_file

MANIFEST = "manifest.json"
PREFIX = "iter-"


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split torch's optimizer state_dict into tensors (safetensors) and plain JSON."""
    tensors, plain = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain["scalars"][f"{index}.{key}"] = value
    return tensors, plain


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(plain["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG: python, numpy, torch CPU (and CUDA when present)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = value
    py_state = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def write_checkpoint(folder: Path, iteration: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                     fault_hook=None) -> Path:
    """Write `tensors` (file stem -> tensors) and `state` (JSON) to checkpoints/iter-N atomically."""
    final = folder / f"{PREFIX}{iteration:06d}"
    tmp = folder / f".tmp-{PREFIX}{iteration:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {}
    for stem, group in tensors.items():
        save_safetensors(group, tmp / f"{stem}.safetensors")
        files[f"{stem}.safetensors"] = sha256_file(tmp / f"{stem}.safetensors")
        if fault_hook:
            fault_hook("checkpoint_file")
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    files["state.json"] = sha256_file(tmp / "state.json")
    atomic_write_text(tmp / MANIFEST, json.dumps({"iteration": iteration, "files": files}, indent=1))
    fsync_dir(tmp)
    if final.exists():  # a torn or stale one from a run that died; set aside first, so no torn folder is visible
        _discard(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    return final


def _discard(path: Path) -> None:
    """Rename to a hidden temporary name, then delete: a kill half-way never leaves a torn `iter-*` folder."""
    aside = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def verify_checkpoint(path: Path) -> bool:
    """True when the manifest exists and every file's checksum matches."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).is_file() and sha256_file(path / name) == digest
                   for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary ones are not listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def holds_finite_state(path: Path) -> bool:
    """True when the checkpoint's weights, optimizer state and EMA are all finite (read one tensor at a time)."""
    from safetensors import safe_open

    for stem in ("model", "optimizer", "ema"):
        if (path / f"{stem}.safetensors").is_file():
            with safe_open(str(path / f"{stem}.safetensors"), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        return False
    return True


def latest_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose checksums verify and whose weights and optimizer state are finite; the others
    are skipped with a warning (the trainer never writes non-finite ones; an older version could)."""
    for path in reversed(list_checkpoints(folder)):
        if not verify_checkpoint(path):
            warnings.warn(f"checkpoint {path} is torn or corrupted (checksum mismatch); skipping it")
        elif not holds_finite_state(path):
            warnings.warn(f"checkpoint {path} holds NaN/inf weights or optimizer state; skipping it")
        else:
            return path
    return None


def damaged_files(path: Path) -> tuple[list[str], list[str]]:
    """A checkpoint's (damaged, intact) files: missing or failing their checksum, and verifying."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} (missing or unreadable)"], sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    damaged, intact = [], []
    for name, digest in manifest.items():
        if not (path / name).is_file():
            damaged.append(f"{name} (missing)")
        elif sha256_file(path / name) != digest:
            damaged.append(f"{name} (checksum mismatch)")
        else:
            intact.append(name)
    return damaged, intact


class CheckpointsDamaged(ValueError):
    """Every checkpoint of a run fails verification: resuming would start over and overwrite them."""


def checkpoint_to_resume(folder: Path) -> Path | None:
    """The newest good checkpoint; None when there is none at all (the run starts over). Raises
    CheckpointsDamaged, naming what is damaged and what is intact, when checkpoints exist but none verifies."""
    latest = latest_good_checkpoint(folder)
    found = list_checkpoints(folder)
    if latest is not None or not found:
        return latest
    run = folder.parent
    report, intact = [], []
    for path in reversed(found):
        bad, good = damaged_files(path)
        report.append(f"{path.name}: {', '.join(bad)}")
        intact += [f"{path.name}/{name}" for name in good]
    exports = [f"{name}/" for name in ("aligned", "best", "base") if (run / name / "model.json").is_file()]
    raise CheckpointsDamaged(
        f"--resume {str(run)!r}: no checkpoint can be restored, every one is damaged ({'; '.join(report)}); still "
        f"intact: {', '.join(intact + exports) or 'nothing'}. Nothing was changed: restore the damaged files from a "
        "backup, or start a new run in another folder")


def read_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    manifest = json.loads((path / MANIFEST).read_text())
    tensors = {name[: -len(".safetensors")]: load_safetensors(path / name)
               for name in manifest["files"] if name.endswith(".safetensors")}
    return tensors, json.loads((path / "state.json").read_text())


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` good checkpoints; never delete the only good one; drop stale temporaries
    (half-written checkpoints and half-deleted ones of a process that was killed; the run folder's lock
    guarantees no other process is writing here)."""
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    good = [p for p in list_checkpoints(folder) if verify_checkpoint(p)]
    for path in good[:-max(1, keep)]:
        _discard(path)
