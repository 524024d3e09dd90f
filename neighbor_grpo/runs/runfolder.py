"""A run folder: refused when it is in use or holds someone's work, locked with flock while a run uses it.

A new folder is built beside its final place, in `PARENT/.NAME.new-PID`, and only `commit()` (called once
start-up has succeeded) puts it there: an old folder of ours is renamed to `PARENT/.NAME.old-PID`, the new one
renamed into place, then the old one deleted. A failed start-up therefore leaves the old folder as it was and no
half-made one. Leftovers of a killed process are cleaned (or put back) at the next start.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from neighbor_grpo.runs.io import fsync_dir
from neighbor_grpo.runs.ownership import (OwnershipError, check_folder_target, replacement_refusal, visible_entries,
                                          write_marker)


class RunFolderError(OwnershipError):
    pass


def _lock(folder: Path):
    """An exclusive, non-blocking flock on folder/.lock; the OS releases it when the process dies."""
    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise RunFolderError(f"run folder {str(folder)!r} is in use by another running process"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish or stop it "
                             "(a killed process releases the lock by itself)") from None
    if os.fstat(handle.fileno()).st_ino != os.stat(folder / ".lock").st_ino:  # the folder was replaced meanwhile
        handle.close()
        raise RunFolderError(f"run folder {str(folder)!r} was replaced by another process just now; try again")
    handle.truncate(0)  # who holds it, for the message above (the lock itself is the flock)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _unlock(handle) -> None:
    if handle is not None and not handle.closed:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _is_abandoned(folder: Path) -> bool:
    """A staging or set-aside folder whose process is gone: nobody holds its lock."""
    try:
        handle = _lock(folder)
    except RunFolderError:
        return False
    except OSError:
        return True  # no lock file can be made there: nobody holds one
    _unlock(handle)
    return True


def clean_leftovers(final: Path) -> None:
    """`.NAME.new-PID` of a dead process is a half-made folder: deleted. `.NAME.old-PID` is the previous folder
    set aside: put back when the new one never arrived, deleted when it did."""
    final = Path(os.path.abspath(final))
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(new|old)-\d+$")
    if not final.parent.is_dir():
        return
    leftovers = sorted(p for p in final.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink())
    for path in sorted(leftovers, key=lambda p: ".old-" in p.name):  # half-made ones first
        if not _is_abandoned(path):
            continue
        if ".old-" in path.name and not final.exists():
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


class RunFolder:
    """The folder a command writes into. `path` is where to write now (the staging folder until `commit()`)."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False, kind: str = "run"):
        self.final = Path(path)
        self.path = self.final
        self._staging = self._old_lock = self._handle = None
        self._replacing = False
        self._made_parents: list[Path] = []
        if resume and overwrite:
            raise RunFolderError("choose either --resume or --overwrite, not both")
        if resume:
            clean_leftovers(self.final)  # a run set aside by a process killed while replacing it is put back
            if not self.final.is_dir():
                raise RunFolderError(f"--resume {str(self.final)!r}: no such run folder")
            self._handle = _lock(self.final)
            return
        clean_leftovers(self.final)
        self._replacing = check_folder_target(self.final, overwrite)
        if self._replacing:  # the old folder stays locked until it is replaced: no run or resume starts in it meanwhile
            self._old_lock = _lock(self.final)
        try:
            absolute = Path(os.path.abspath(self.final))
            missing = absolute.parent
            while not missing.exists():
                self._made_parents.append(missing)
                missing = missing.parent
            absolute.parent.mkdir(parents=True, exist_ok=True)
            self._staging = absolute.parent / f".{absolute.name}.new-{os.getpid()}"
            shutil.rmtree(self._staging, ignore_errors=True)  # ours: this pid's earlier attempt in this process
            self._staging.mkdir()
            self._handle = _lock(self._staging)
            write_marker(self._staging, kind)
        except BaseException:
            self._discard_staging()
            raise
        self.path = self._staging

    def commit(self) -> Path:
        """Put the new folder in its place (after start-up succeeded); returns the final path. Idempotent."""
        if self._staging is None:
            return self.path
        absolute = Path(os.path.abspath(self.final))
        old = absolute.parent / f".{absolute.name}.old-{os.getpid()}"
        replacing = self._replacing and absolute.exists()
        if replacing:
            if visible_entries(absolute) and replacement_refusal(absolute, "--out"):
                raise RunFolderError(f"--out {str(self.final)!r}: files appeared in it during start-up "
                                     f"({visible_entries(absolute)[:4]}); it was left as it is")
            os.replace(absolute, old)
        try:
            os.replace(self._staging, absolute)
        except OSError as error:
            if replacing:
                os.replace(old, absolute)
            raise RunFolderError(f"--out {str(self.final)!r}: could not put the new folder in place "
                                 f"({error.strerror}); the old one is unchanged") from None
        self._staging, self._made_parents, self.path = None, [], self.final
        fsync_dir(absolute.parent)
        if replacing:
            shutil.rmtree(old, ignore_errors=True)
        _unlock(self._old_lock)
        return self.final

    def _discard_staging(self) -> None:
        """A start-up that failed: the half-made folder goes, with any parent folders made for it."""
        if self._staging is not None:
            _unlock(self._handle)
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            for parent in self._made_parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
        _unlock(self._old_lock)

    def release(self) -> None:
        self._discard_staging()
        _unlock(self._handle)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


