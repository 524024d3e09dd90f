"""Sample grid of a words comparison: the base and each method's final model (one reported seed) on the same
held-out words and the same noise as the comparison's evaluation (40-step Euler ODE), one row per model, labelled
with the run's final gold. Writes a PNG (and prints the rows).

    python benchmarks/words_grids.py --results benchmarks/results/words/main.json --seed 0 \
        --out docs/images/words_main_grid.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def rows_of(results: Path, seed: str) -> tuple[dict, list[tuple[str, str | None, float]]]:
    """(results, [(label, weights or None for the base, final gold)]); one-line errors."""
    from neighbor_grpo.bench import rules

    try:
        saved = json.loads(results.read_text())
        if saved["settings"]["task"] != "words":
            raise ValueError(f"task {saved['settings']['task']!r}; expected a words comparison")
        first = next(iter(saved["runs"].values()))[seed]
        base_gold = first["curve"][0]["gold"]
        rows = [("base", None, base_gold)]
        for row, by_seed in saved["runs"].items():
            run = by_seed[seed]
            final = sum(r["gold"] for r in run["curve"][-rules.FINAL_EVALUATIONS:]) / rules.FINAL_EVALUATIONS
            rows.append((row, run["model"]["path"], final))
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as error:
        raise ValueError(f"--results {str(results)!r}: expected a words comparison with seed {seed} ({error!r})") from None
    missing = [w for _, w, _ in rows if w is not None and not Path(w).is_file()]
    if missing:
        raise ValueError(f"--results {str(results)!r}: final model {missing[0]} is absent")
    return saved, rows


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neighbor_grpo.bench.method_run import final_model_images
    from neighbor_grpo.bench.tasks import task_for_base
    from neighbor_grpo.runs.io import atomic_write_bytes

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--seed", default="0", help="the reported seed whose final models are drawn")
    parser.add_argument("--words", type=int, default=12, help="the first N held-out words")
    parser.add_argument("--out", type=Path, required=True, help="PNG")
    args = parser.parse_args(argv)
    try:
        if args.out.suffix != ".png":
            raise ValueError(f"--out {str(args.out)!r}: expected a .png file")
        saved, rows = rows_of(args.results, args.seed)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    base = saved["settings"]["base"]
    task = task_for_base(base)
    prompts = list(task.eval_prompts)[:args.words]
    figure, axes = plt.subplots(len(rows), 1, figsize=(args.words * 1.1, len(rows) * 0.45 + 0.3), squeeze=False)
    for axis, (label, weights, gold) in zip(axes[:, 0], rows):
        images = final_model_images(base, weights, list(task.settings), prompts, 1)[:, 0]  # words x C x H x W
        strip = torch.cat([torch.nn.functional.pad(image, (2, 2, 1, 1), value=1.0) for image in images], dim=2)
        axis.imshow(strip.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_ylabel(f"{label}\ngold {gold:.3f}", rotation=0, ha="right", va="center", fontsize=8)
        print(f"{label}: final gold {gold:.3f}")
    axes[0, 0].set_title("held-out words: " + " ".join(p.split('"')[1] if '"' in p else p for p in prompts) +
                         f"  (seed {args.seed}, the evaluation's noise, 40-step Euler)", fontsize=8)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
