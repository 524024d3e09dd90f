"""Validity of the digits gold (issue 14, item 1): every pre-registered check, recorded with its threshold.

    python benchmarks/gold_validation.py --out benchmarks/results/gold_validation.json \
        --plot docs/images/gold_hack_run.png --run-dir runs/gold-hack

Checks (neighbor_grpo/rewards/gold_checks.py): gold_class accuracy on split A (never seen by the gold), share of
A's real digits that pass `typical`, Spearman(proxy, gold) on the base model's samples, and the pre-registered hack
run - exactly

    ngrpo train neighbor_grpo.ref_beta=0 optim.lr=1e-3 iterations=150 seed=0 \
        'eval.monitor_rewards=[{name: digit_gold}]' --out RUN

- whose final held-out proxy minus gold must be >= 0.3. The plot shows held-out proxy, gold and its two factors
against the iteration. A failed check is reported as failed ("the gold does not discriminate"); nothing is tuned.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.builtin.pretrain import ensure_base_model, ensure_classifier
from neighbor_grpo.rewards import gold_checks
from neighbor_grpo.rewards.gold import ensure_gold, load_gold
from neighbor_grpo.training.trainer import train

HACK_OVERRIDES = ["neighbor_grpo.ref_beta=0", "optim.lr=1e-3", "iterations=150", "seed=0",
                  "eval.monitor_rewards=[{name: digit_gold}]"]
CURVES = {"proxy": "heldout/reward_digit_prob", "gold": "heldout/monitor/digit_gold",
          "gold_class": "heldout/monitor/digit_gold/gold_class", "typical": "heldout/monitor/digit_gold/typical"}


def read_curves(run: Path) -> dict[str, list[float]]:
    """Held-out proxy and gold per evaluated iteration, from the run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(CURVES["proxy"]) not in ("", None)]
    curves = {"iteration": [int(row["iteration"]) for row in rows]}
    curves.update({name: [float(row[column]) for row in rows] for name, column in CURVES.items()})
    return curves


def hack_run(run: Path, device: str) -> tuple[dict[str, list[float]], float]:
    config = load_config(None, HACK_OVERRIDES + [f"device={device}"])
    started = time.perf_counter()
    train(config, run, overwrite=True, progress=False)
    return read_curves(run), time.perf_counter() - started


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = {"proxy": ("C0", "-", "proxy: digit_prob"), "gold": ("C3", "-", "gold = gold_class x typical"),
              "gold_class": ("C3", ":", "gold_class"), "typical": ("C2", "--", "typical")}
    for name, (color, style, label) in styles.items():
        ax.plot(curves["iteration"], curves[name], style, color=color, label=label, lw=2 if style == "-" else 1.2)
    ax.set(xlabel="iteration", ylabel="held-out mean (160 samples)", ylim=(0, 1.02),
           title="Pre-registered hack run: ref_beta=0, lr=1e-3, seed 0")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gold_validation.json")
    parser.add_argument("--plot", default="docs/images/gold_hack_run.png")
    parser.add_argument("--run-dir", default="runs/gold-hack", help="where the hack run is written (overwritten)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    gold_folder = ensure_gold()
    gold = load_gold(gold_folder)
    base_dir, (classifier_dir, _) = ensure_base_model(progress=False), ensure_classifier(progress=False)
    base = gold_checks.proxy_and_gold_on_base(base_dir, classifier_dir, gold)
    curves, hack_s = hack_run(Path(args.run_dir), args.device)
    values = {
        "gold_class_accuracy_on_a": gold_checks.gold_class_accuracy_on_a(gold),
        "typical_share_on_a": gold_checks.typical_share_on_a(gold),
        "spearman_proxy_gold_base": gold_checks.spearman(base["proxy"], base["gold"]),
        "hack_proxy_minus_gold": curves["proxy"][-1] - curves["gold"][-1],
    }
    checks = {name: {"value": value, "threshold": gold_checks.THRESHOLDS[name],
                     "passed": value >= gold_checks.THRESHOLDS[name]} for name, value in values.items()}
    result = {
        "command": "python benchmarks/gold_validation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "hack_run_command": "ngrpo train " + " ".join(f"'{o}'" if " " in o else o for o in HACK_OVERRIDES) + " --out RUN",
        "all_passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "gold": json.loads((gold_folder / "gold.json").read_text()),
        "base_model_samples": {**gold_checks.SPEARMAN_SAMPLES,
                               "means": {k: float(v.mean()) for k, v in base.items()},
                               "spearman_proxy_gold_class": gold_checks.spearman(base["proxy"], base["gold_class"])},
        "hack_run": {"curves": curves, "wall_clock_s": hack_s, "device": args.device,
                     "final": {k: v[-1] for k, v in curves.items() if k != "iteration"}},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot(curves, Path(args.plot))
    print(json.dumps({"checks": checks, "hack_run_s": round(hack_s, 1)}, indent=2))
    return result


if __name__ == "__main__":
    main()
