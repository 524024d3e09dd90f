"""`ngrpo demo`: the built-in default end to end on a CPU — pretrain (or reuse), align, compare before/after."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Iterator

import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.runs.io import atomic_write_bytes, atomic_write_text
from neighbor_grpo.runs.ownership import check_folder_target, write_marker

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_THREADS = 2
"""torch intra-op threads of the demo: float sums are split over the threads, so the numbers (and the pretrained
models it builds) change in the last bits with the thread count; fixed, they depend only on torch and the CPU."""
TABLE_METRICS = [
    ("reward", "reward (p of prompted digit)", "higher"),
    ("accuracy", "prompt accuracy", "higher"),
    ("out_of_range", "pixels outside data range", "lower"),
    ("diversity", "within-prompt diversity", "keep"),
    ("realism_nn_dist", "distance to nearest real digit", "lower"),
]


def before_after_table(before: dict, after: dict) -> str:
    """A markdown table of held-out metrics before and after alignment."""
    lines = ["| metric (held-out seeds) | base | aligned | better is |", "|---|---|---|---|"]
    for key, label, better in TABLE_METRICS:
        if key in before and key in after:
            lines.append(f"| {label} | {before[key]:.4f} | {after[key]:.4f} | {better} |")
    return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block, the caller's restored afterwards."""
    if count < 1:
        raise ValueError(f"--threads: expected a thread count >= 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo, where platform.processor() is often empty)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def numeric_setup() -> dict:
    """What the demo's numbers depend on beyond the code and config: torch build, CPU kernels, thread count."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "processor": cpu_name(), "torch_threads": torch.get_num_threads()}


def run_demo(out: str | Path, overwrite: bool = False, overrides: list[str] | None = None, progress: bool = True,
             threads: int = DEMO_THREADS) -> dict:
    """The demo with `threads` torch threads (the caller's count is restored afterwards)."""
    with torch_threads(threads):
        return _run_demo(Path(out), overwrite, overrides, progress)


def _run_demo(out: Path, overwrite: bool, overrides: list[str] | None, progress: bool) -> dict:
    from neighbor_grpo.builtin.pretrain import ensure_base_model, ensure_classifier
    from neighbor_grpo.training.trainer import train

    started = time.perf_counter()
    check_folder_target(out, overwrite)  # refused before minutes of pretraining, not after
    config = load_config(DEMO_CONFIG, overrides)
    print("[1/3] reward model: digit classifier on scikit-learn's digits")
    classifier_dir, classifier_accuracy = ensure_classifier(progress=progress)
    print(f"      held-out accuracy {classifier_accuracy:.4f}  ({classifier_dir})")
    print("[2/3] base model: class-conditional flow matching, 40% of labels replaced at random")
    base_dir = ensure_base_model(progress=progress)
    print(f"      {base_dir}")
    print("[3/3] aligning with Neighbor GRPO")
    result = train(config, out, overwrite=overwrite, progress=progress)
    write_marker(out, "demo")
    for source, name in (("iter-000000.png", "grid_before.png"), (f"iter-{config.iterations:06d}.png", "grid_after.png")):
        atomic_write_bytes(out / name, (out / "samples" / source).read_bytes())
    table = before_after_table(result.eval_before, result.eval_after)
    seconds = time.perf_counter() - started
    summary = {"classifier_heldout_accuracy": classifier_accuracy, "base_prompt_accuracy": result.eval_before.get("accuracy"),
               "before": result.eval_before, "after": result.eval_after, "wall_clock_s": seconds,
               "train_s": result.seconds, "iterations": config.iterations, "setup": numeric_setup()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", f"# Demo: before/after (held-out seeds)\n\n{table}\n\n"
                      f"Reward classifier held-out accuracy: {classifier_accuracy:.4f}. "
                      f"Wall-clock: {seconds:.0f} s.\n")
    print()
    print(f"Reward classifier held-out accuracy: {classifier_accuracy:.4f}")
    print(f"Base model prompt accuracy:          {result.eval_before.get('accuracy', float('nan')):.4f}")
    print(table)
    print(f"\nRun folder: {out}  (grid_before.png, grid_after.png, reward_curve.png, metrics.csv, tensorboard/)")
    setup = summary["setup"]
    print(f"Wall-clock: {seconds:.0f} s  (torch {setup['torch']}, {setup['cpu_capability']} kernels, "
          f"{setup['torch_threads']} threads: the numbers depend on these)")
    return summary
