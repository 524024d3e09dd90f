"""Files that are never half-written: write to a temporary name in the same folder, fsync, then rename."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new hidden file beside `name`, created like open() creates one: mode 0666 less the umask (mkstemp would
    make it 0600 whatever the umask, and the rename would carry that mode to the output)."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: could not create a temporary file for {name!r}")


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.filename is None and error.strerror:  # a full disk: name the file
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors file written atomically (no pickle anywhere)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


__all__ = ["fsync_dir", "atomic_write_bytes", "atomic_write_text", "save_safetensors", "load_safetensors", "sha256_file", "save_file"]
