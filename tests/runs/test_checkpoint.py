"""neighbor_grpo/runs/checkpoint.py: pruning keeps the newest good checkpoints and never counts a torn one."""

from __future__ import annotations

import torch

from neighbor_grpo.runs.checkpoint import list_checkpoints, prune_checkpoints, verify_checkpoint, write_checkpoint


def three_checkpoints(folder, torn: int | None = None):
    """iter-1..3 written by the real writer; `torn`: that one loses a file afterwards (a crash, a disk error)."""
    for iteration in (1, 2, 3):
        path = write_checkpoint(folder, iteration, {"net": {"w": torch.full((3,), float(iteration))}},
                                {"iteration": iteration})
        if iteration == torn:
            (path / "net.safetensors").unlink()
    return {path.name: path for path in list_checkpoints(folder)}


def test_prune_keeps_the_newest_good_ones(tmp_path):
    paths = three_checkpoints(tmp_path)
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == sorted(paths)[1:]
    prune_checkpoints(tmp_path, 0)  # never the only good one
    assert [p.name for p in list_checkpoints(tmp_path)] == sorted(paths)[2:]


def test_a_torn_checkpoint_is_not_counted_as_kept(tmp_path):
    """iter-1 and iter-2 good, iter-3 torn, keep 1: iter-2 stays (the newest good one), iter-1 goes; the torn one
    is left for the resume's report, not counted."""
    paths = three_checkpoints(tmp_path, torn=3)
    assert not verify_checkpoint(paths[sorted(paths)[2]])
    prune_checkpoints(tmp_path, 1)
    left = [p.name for p in list_checkpoints(tmp_path)]
    assert left == sorted(paths)[1:]
    assert verify_checkpoint(tmp_path / left[0])


def test_prune_drops_half_written_temporaries(tmp_path):
    three_checkpoints(tmp_path)
    (tmp_path / ".tmp-iter-000004-123").mkdir()
    (tmp_path / ".tmp-old-iter-000001-123").write_text("half deleted")
    prune_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in list_checkpoints(tmp_path)]
    assert len(list_checkpoints(tmp_path)) == 3
