"""neighbor_grpo/builtin/demo.py: the demo runs with a fixed torch thread count (its numbers depend on it) and gives the
caller's count back; the summary records what the numbers depend on."""

from __future__ import annotations

import json

import pytest
import torch

from neighbor_grpo.cli import build_parser
from neighbor_grpo.builtin.demo import DEMO_THREADS, run_demo, torch_threads

# a 1-iteration demo on the cached built-in models: seconds, not the full 200 iterations
QUICK = ["iterations=1", "prompts_per_iteration=2", "neighbor_grpo.group_size=4", "neighbor_grpo.num_anchors=2",
         "neighbor_grpo.rollout_steps=2", "eval.samples_per_prompt=2", "eval.steps=2"]


def test_the_demo_runs_with_the_threads_asked_for_and_restores_the_callers(builtin_models, tmp_path, capsys):
    previous = torch.get_num_threads()
    wanted = 3 if previous != 3 else 1
    summary = run_demo(tmp_path / "demo", overrides=QUICK, progress=False, threads=wanted)
    assert torch.get_num_threads() == previous
    assert summary["setup"]["torch_threads"] == wanted  # read inside the run
    assert summary["setup"]["torch"] == torch.__version__
    assert summary["setup"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["setup"] == summary["setup"]
    assert f"{wanted} threads" in capsys.readouterr().out
    for name in ("grid_before.png", "grid_after.png", "reward_curve.png", "summary.md"):
        assert (tmp_path / "demo" / name).is_file(), name


def test_thread_count_is_restored_after_an_error_and_must_be_positive():
    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(previous + 1):
            assert torch.get_num_threads() == previous + 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == previous
    with pytest.raises(ValueError, match="--threads: expected a thread count >= 1, got 0"):
        with torch_threads(0):
            pass


def test_the_cli_default_is_the_demos_fixed_count():
    args = build_parser().parse_args(["demo", "--out", "x"])
    assert args.threads == DEMO_THREADS == 2
    assert build_parser().parse_args(["demo", "--out", "x", "--threads", "1"]).threads == 1
