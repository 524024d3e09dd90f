"""Atomic writes: on a full disk the error names the file, and nothing half-written is left."""

import os
import subprocess

import pytest

from neighbor_grpo.failures import one_line
from neighbor_grpo.io import atomic_write_bytes


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
