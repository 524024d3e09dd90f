"""`ngrpo demo`: the built-in default end to end on a CPU — pretrain (or reuse), align, compare before/after."""

from __future__ import annotations

import json
import time
from pathlib import Path

from neighbor_grpo.config import load_config
from neighbor_grpo.io import atomic_write_bytes, atomic_write_text
from neighbor_grpo.ownership import check_folder_target, write_marker

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
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


def run_demo(out: str | Path, overwrite: bool = False, overrides: list[str] | None = None, progress: bool = True) -> dict:
    from neighbor_grpo.pretrain import ensure_base_model, ensure_classifier
    from neighbor_grpo.trainer import train

    started = time.perf_counter()
    out = Path(out)
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
               "train_s": result.seconds, "iterations": config.iterations}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", f"# Demo: before/after (held-out seeds)\n\n{table}\n\n"
                      f"Reward classifier held-out accuracy: {classifier_accuracy:.4f}. "
                      f"Wall-clock: {seconds:.0f} s.\n")
    print()
    print(f"Reward classifier held-out accuracy: {classifier_accuracy:.4f}")
    print(f"Base model prompt accuracy:          {result.eval_before.get('accuracy', float('nan')):.4f}")
    print(table)
    print(f"\nRun folder: {out}  (grid_before.png, grid_after.png, reward_curve.png, metrics.csv, tensorboard/)")
    print(f"Wall-clock: {seconds:.0f} s")
    return summary
