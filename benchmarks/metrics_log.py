"""Per-iteration cost of writing metrics.csv when the file already holds many rows.

    python benchmarks/metrics_log.py --rows 5000 --repeat 200 [--folder DIR] [--module path/to/logs.py]

Fills a metrics.csv with `--rows` rows of the trainer's columns (TensorBoard off), then times `--repeat` more
`MetricsLog.log` calls and prints the median and mean milliseconds per call. `--module` times another copy of
logs.py (e.g. `git show REV:neighbor_grpo/training/logs.py > /tmp/old_logs.py`) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

# the columns of a Neighbor GRPO training row (trainer.train_iteration + the loop's counters)
COLUMNS = ["reward_mean", "reward_std", "reward/digit_prob", "loss", "ratio_mean", "ratio_max_dev", "clip_fraction",
           "adv_clipped_share", "grad_norm", "approx_kl", "tau_mean", "ref_loss", "s_rollout", "s_reward", "s_train",
           "model_evals_rollout", "model_evals_train", "model_evals_per_iter", "s_per_iter", "skipped_updates_total"]


def metrics_log_class(module: str | None):
    if module is None:
        from neighbor_grpo.training.logs import MetricsLog

        return MetricsLog
    spec = importlib.util.spec_from_file_location("timed_logs", module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded.MetricsLog


def row(iteration: int) -> dict[str, float]:
    return {name: 0.123456789 * (iteration + index) for index, name in enumerate(COLUMNS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--folder", help="where to write (default: a temporary folder)")
    parser.add_argument("--module", help="a logs.py to time instead of neighbor_grpo.training.logs")
    args = parser.parse_args()
    MetricsLog = metrics_log_class(args.module)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        log = MetricsLog(Path(folder), tensorboard=False)
        log.log(0, {"heldout/reward": 0.5})
        for iteration in range(1, args.rows):  # filled with the class under test (the old one takes minutes here)
            log.rows.append({"iteration": iteration, **{k: f"{v:.6g}" for k, v in row(iteration).items()}})
        log.log(args.rows, row(args.rows))  # the new columns: one whole write of everything
        times = []
        for iteration in range(args.rows + 1, args.rows + 1 + args.repeat):
            tick = time.perf_counter()
            log.log(iteration, row(iteration))
            times.append((time.perf_counter() - tick) * 1e3)
        lines = (Path(folder) / "metrics.csv").read_text().count("\n")
    print(f"{args.module or 'neighbor_grpo.training.logs'}: {lines - 1} rows at the end; per log() call median "
          f"{statistics.median(times):.3f} ms, mean {statistics.mean(times):.3f} ms over {args.repeat} calls")


if __name__ == "__main__":
    main()
