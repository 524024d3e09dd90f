"""neighbor_grpo/runs/io.py: atomic writes leave whole files with the permissions a plain open() would give; on a full
disk the error names the file, and nothing half-written is left."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

from neighbor_grpo.cli.failures import one_line
from neighbor_grpo.runs.io import atomic_write_bytes, atomic_write_text, load_safetensors, save_safetensors


@pytest.fixture
def umask():
    """Set the process umask for one test, restore the caller's afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as handle:  # what the user's own tools would create
        handle.write("x")
    atomic_write_text(tmp_path / "run" / "metrics.csv", "a,b\n1,2\n")
    save_safetensors({"w": torch.ones(2)}, tmp_path / "run" / "model.safetensors")
    expected = 0o666 & ~mask
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "run" / "metrics.csv") == expected
    assert mode(tmp_path / "run" / "model.safetensors") == expected
    assert torch.equal(load_safetensors(tmp_path / "run" / "model.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.csv", "model.safetensors"]  # no temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def failing(handle):
        handle.write(b"half")
        raise OSError("disk full")

    from neighbor_grpo.runs.io import _atomic_replace

    with pytest.raises(OSError, match="disk full"):
        _atomic_replace(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs the privilege to mount; skipped without it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_names_the_file_and_leaves_the_old_version(tiny_disk):
    target = tiny_disk / "metrics.csv"
    atomic_write_bytes(target, b"old")
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"0" * 200_000)
    assert caught.value.filename == str(target)
    assert one_line(caught.value) == (1, f"cannot use {str(target)!r}: No space left on device (the disk is full)")
    assert target.read_bytes() == b"old" and os.listdir(tiny_disk) == ["metrics.csv"]  # no temporary left
