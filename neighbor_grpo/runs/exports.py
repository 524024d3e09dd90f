"""Checksums for exported model folders (a run's base/, best/, aligned/, the built-in base model), like those of
checkpoints: `manifest.json` holds the SHA-256 of every file, written last; loading a folder that has one verifies
it, so a changed or truncated weights file is a one-line error naming the file instead of a silently wrong model."""

from __future__ import annotations

import json
from pathlib import Path

from neighbor_grpo.runs.io import atomic_write_text, sha256_file

MANIFEST = "manifest.json"


class ExportDamaged(ValueError):
    """A file of an exported model folder is missing or differs from its recorded checksum."""


def write_manifest(folder: str | Path) -> None:
    """Record the SHA-256 of every file under `folder` (the export is complete when this is called)."""
    folder = Path(folder)
    files = {str(path.relative_to(folder)): sha256_file(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != MANIFEST and not path.name.startswith(".")}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_manifest(folder: str | Path) -> None:
    """Raise ExportDamaged naming the first file that is missing or changed; folders without a manifest (an
    older version's exports, diffusers folders) pass unchecked."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportDamaged(f"{folder / MANIFEST}: not a readable checksum manifest ({error})") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ExportDamaged(f"{path}: missing (listed in {MANIFEST}); the export is incomplete, re-export it")
        if sha256_file(path) != digest:
            raise ExportDamaged(f"{path}: checksum mismatch (the file changed after it was exported); restore it or "
                                "export the model again")
