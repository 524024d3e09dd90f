"""What the tool may replace: folders it made (a marker, or exactly an older version's layout) and the files a
command names. Everything else a user has is refused, never deleted (docs/robustness.md, "What --overwrite
replaces")."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

MARKER = ".ngrpo-owned.json"
KINDS = ("run", "demo", "pretrain", "compare")

# What versions before the marker wrote, by kind: a folder without the marker is ours only if every entry is one
# of these (or a hidden temporary of ours) and its signature entries are there.
RUN_LAYOUT = {"config.yaml", "run.json", "checkpoints", "metrics.csv", "tensorboard", "reward_curve.png", "samples",
              "base", "best", "aligned", "eval_before.json", "eval_after.json", "wandb", ".lock", ".best-previous"}
LEGACY_LAYOUTS = {
    "run": (RUN_LAYOUT, {"config.yaml"}),
    "demo": (RUN_LAYOUT | {"grid_before.png", "grid_after.png", "summary.json", "summary.md"}, {"config.yaml"}),
    "pretrain": ({"base", "reward", ".lock"}, {"base", "reward"}),
}
# hidden temporaries the tool writes: .tmp-* folders (exports, checkpoints, deletions) and atomic-write files
_TEMPORARY = re.compile(r"^(\.tmp-.*|\..+\.[A-Za-z0-9_]+\.tmp)$")


class OwnershipError(RuntimeError):
    """A path the tool will not write to or replace; the message is one line naming it."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("neighbor-grpo")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


def write_marker(folder: Path, kind: str) -> None:
    from neighbor_grpo.runs.io import atomic_write_text

    assert kind in KINDS, kind
    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, "version": package_version()}) + "\n")


def marker_kind(folder: Path) -> str | None:
    """The kind recorded in the folder's marker; None without a readable marker."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


# sub-folders whose entries follow a pattern: a checkpoint per iteration, a sample grid per evaluation
_SUBFOLDER_ENTRIES = {"checkpoints": re.compile(r"^iter-\d+$"), "samples": re.compile(r"^iter-\d+\.png$")}
# a comparison's folder: per results stem the JSON, its table, plots, partial results and final-models folder; the
# models folder holds one safetensors file per run
_COMPARE_ENTRY = re.compile(r"^.+(\.json|\.md|_curves\.png|_overoptimization\.png|_models)$")
_COMPARE_MODEL = re.compile(r"^.+_lr[^/]+_k\d+_seed-?\d+\.safetensors$")


def _fits(folder: Path, name: str, layout: set[str]) -> bool:
    """Is the entry `name` one that a folder of this layout holds (and, for a patterned sub-folder, only entries
    of that pattern)?"""
    if _TEMPORARY.match(name):
        return True
    if name not in layout:
        return False
    pattern = _SUBFOLDER_ENTRIES.get(name)
    if pattern is None or not (folder / name).is_dir():
        return True
    return all(pattern.match(p.name) or _TEMPORARY.match(p.name) for p in (folder / name).iterdir())


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """The entries of a folder of this kind that ngrpo did not write there (a user's notes, analyses, copies),
    sorted; [] when the folder holds only what ngrpo writes."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, ".lock"))
    if kind == "compare":
        return [n for n in names if not _fits_compare(folder, n)]
    return [n for n in names if not _fits(folder, n, LEGACY_LAYOUTS[kind][0])]


def _fits_compare(folder: Path, name: str) -> bool:
    if _TEMPORARY.match(name) or _COMPARE_MODEL.match(name):
        return True
    if not _COMPARE_ENTRY.match(name):
        return False
    return not (name.endswith("_models") and (folder / name).is_dir() and foreign_entries(folder / name, "compare"))


def legacy_kind(folder: Path) -> str | None:
    """The kind of an older version's folder (no marker) whose every entry that version wrote; else None."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} - {MARKER}
    for kind, (layout, signature) in LEGACY_LAYOUTS.items():
        if signature <= names and not foreign_entries(folder, kind):
            return kind
    return None


def replacement_refusal(path: Path, shown: str) -> str | None:
    """Why --overwrite may not replace this non-empty folder: it was not made by ngrpo, or it holds entries ngrpo
    did not write (a copied marker does not make a user's files ours); None when everything in it is ours."""
    kind = marker_kind(path)
    if kind is None:
        if legacy_kind(path) is not None:
            return None
        entries = visible_entries(path)
        return (f"{shown} was not made by ngrpo (no {MARKER}, and it holds {entries[:4]}"
                f"{' ...' if len(entries) > 4 else ''}); --overwrite replaces only folders ngrpo made: "
                "move those files or give a new folder")
    foreign = foreign_entries(path, kind)
    if not foreign:
        return None
    return (f"{shown} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} ngrpo did not write "
            f"{foreign[:6]}{' ...' if len(foreign) > 6 else ''}; --overwrite replaces only what ngrpo wrote "
            "(docs/robustness.md): move them out of the folder or give a new folder")


def visible_entries(folder: Path) -> list[str]:
    """What a folder holds besides a run-folder lock file (a folder holding only `.lock` counts as empty)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name != ".lock")


def _holds_git(folder: Path) -> bool:
    for _, dirs, files in os.walk(folder):
        if ".git" in dirs or ".git" in files:
            return True
    return False


def protected_reason(path: Path) -> str | None:
    """Why a folder may never be replaced whatever it holds: the working directory or one of its ancestors,
    $HOME, /, a mount point, a symbolic link, or a folder that holds a git repository."""
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    home = os.path.realpath(os.path.expanduser("~"))
    if Path(path).is_symlink():
        return "is a symbolic link"
    if real == Path("/"):
        return "is the root folder"
    if str(real) == home:
        return "is your home folder ($HOME)"
    if real == cwd or real in cwd.parents:
        return "is the working directory or one of its parents"
    if os.path.ismount(real):
        return "is a mount point"
    if real.is_dir() and _holds_git(real):
        return "holds a git repository (.git)"
    return None


def check_folder_target(path: str | Path, overwrite: bool, flag: str = "--out") -> bool:
    """May a new folder be made at `path` (replacing what is there)? Returns whether something is there to replace.
    Raises OwnershipError (one line) when not; nothing is written either way."""
    path = Path(path)
    shown = f"{flag} {str(path)!r}"
    _check_parents(path, flag)
    if not (path.exists() or path.is_symlink()):
        return False
    if not path.is_dir():
        raise OwnershipError(f"{shown} is a file, not a folder; give a new folder name")
    reason = protected_reason(path)
    if reason:
        raise OwnershipError(f"{shown} {reason}; the tool never replaces it: give a new folder, e.g. {flag} runs/NAME")
    entries = visible_entries(path)
    if not entries:
        return True
    if not overwrite:
        raise OwnershipError(f"{shown} is not empty; pass --resume to continue that run (train, compare) or "
                             "--overwrite to replace a folder this tool made")
    refusal = replacement_refusal(path, shown)
    if refusal:
        raise OwnershipError(refusal)
    return True


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a folder we can write in (caught before any work starts), outside the
    installed package (a run there would be lost with the next install, or shipped with the source)."""
    package = Path(__file__).resolve().parents[1]
    real = Path(os.path.realpath(path))
    if real == package or package in real.parents:
        raise OwnershipError(f"{flag} {str(path)!r} is inside the installed neighbor_grpo package ({package}); give "
                             f"a folder outside it, e.g. {flag} runs/NAME")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OwnershipError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".ngrpo-probe-"):
            pass
    except OSError as error:
        why = "it accepts no new files" if error.errno == errno.ENOENT else error.strerror  # /proc answers ENOENT
        raise OwnershipError(f"{flag} {str(path)!r}: cannot write in {str(parent)!r} ({why})") from None


def check_file_outputs(paths: list[Path], overwrite: bool, flag: str = "--out") -> None:
    """The files a command will write: refused when a folder is there, when one exists without --overwrite, or
    when their folder cannot be written. With --overwrite each is replaced atomically; nothing else is touched."""
    main = Path(paths[0])
    _check_parents(main, flag)
    for path in map(Path, paths):
        if path.is_dir():
            raise OwnershipError(f"{flag} {str(main)!r}: {str(path)!r} is a folder; expected a file path")
        if path.is_symlink() or (path.exists() and not path.is_file()):  # /dev/full, a FIFO, a link: never replaced
            raise OwnershipError(f"{flag} {str(main)!r}: {str(path)!r} is not a regular file; give a new file name")
    existing = [str(p) for p in map(Path, paths) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise OwnershipError(f"{flag} {str(main)!r}: {existing} exist(s); pass --overwrite to replace "
                             f"{'it' if len(existing) == 1 else 'them'} (only the files this command writes: "
                             f"{[Path(p).name for p in paths]})")
