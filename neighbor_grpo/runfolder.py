"""A run folder: refused when it is in use or holds someone's work, locked with flock while a run uses it."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path


class RunFolderError(RuntimeError):
    pass


class RunFolder:
    """Holds an exclusive flock on <run>/.lock; the OS releases it when the process dies, so no stale locks."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if resume and overwrite:
            raise RunFolderError("choose either --resume or --overwrite, not both")
        if resume and not self.path.is_dir():
            raise RunFolderError(f"--resume {str(self.path)!r}: no such run folder")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run folder {str(self.path)!r} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip()
            self._handle.close()
            raise RunFolderError(f"run folder {str(self.path)!r} is in use by another running process"
                                 f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to finish or stop it "
                                 "(a killed process releases the lock by itself)") from None
        self._handle.truncate(0)  # who holds it, for the message above (the lock itself is the flock)
        self._handle.write(str(os.getpid()))
        self._handle.flush()
        existing = [p for p in self.path.iterdir() if p.name != ".lock"]
        if existing and not resume:
            if not overwrite:
                self.release()
                raise RunFolderError(f"run folder {str(self.path)!r} is not empty; pass --resume to continue that run "
                                     "or --overwrite to replace it")
            for item in existing:
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
