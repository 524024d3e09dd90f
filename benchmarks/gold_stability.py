"""Is the gold's ranking of final models stable under resampling of its reference set, and does a second gold built
differently agree? (issue #23, item 7; neighbor_grpo.rewards.gold_stability)

Scores every final model of a comparison (its results JSON: each reported run's `model.path`), or, with --fresh,
25 small models trained here (FRESH: 5 methods x 5 (lr, seed) at a small budget, from improved to hacked), on the same held-out samples (10 digits x --samples, 40-step Euler ODE, the evaluation's
seed), under: the gold (split B), the gold rebuilt on --halves random half-splits of B (both halves of each), and
the soft-density gold. Prints and writes the Spearman figures.

    python benchmarks/gold_stability.py --results benchmarks/results/protocol/main.json --out ...   (to be run)
    python benchmarks/gold_stability.py --fresh --base builtin:digits-unet --out benchmarks/results/gold_stability.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from neighbor_grpo.runs.io import atomic_write_text  # noqa: E402

FRESH = {"methods": ["neighbor_grpo", "neighbor_grpo_defaults", "flow_grpo", "mix_grpo", "dgpo"],
         "lr_seed": [(1e-4, 0), (9e-4, 0), (3e-4, 0), (1e-4, 1), (3e-4, 1)], "budget_fe": 20000.0}


def fresh_models(base: str, folder: Path, log) -> dict[str, str]:
    """Train FRESH's runs (one thread, this process; a weights file already in `folder` is reused: runs are
    deterministic in their spec); {name: weights path}."""
    from neighbor_grpo.bench import rules
    from neighbor_grpo.bench.compare import resolve_base
    from neighbor_grpo.bench.method_run import load_rewards, run_method
    from neighbor_grpo.bench.settings import PAPER_SETTINGS

    base_path = resolve_base(base, progress=False)
    context = {"budget_fe": FRESH["budget_fe"], "points": rules.evaluation_points(FRESH["budget_fe"], 3),
               "base_path": base_path, "device": "cpu", "eval_prompts": [str(d) for d in range(10)], "eval_samples": 2,
               "common": ["device=cpu", "prompts_per_iteration=8"]}
    proxy, gold = load_rewards("cpu")
    models = {}
    for method in FRESH["methods"]:
        for lr, seed in FRESH["lr_seed"]:
            name = f"{method}_lr{lr:g}" + (f"_seed{seed}" if seed else "")
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                started = time.perf_counter()
                run_method({"overrides": PAPER_SETTINGS[method], "lr": lr, "seed": seed, "model_path": str(path)},
                           context, proxy, gold)
                log(f"{name}: trained in {time.perf_counter() - started:.0f} s")
            models[name] = str(path)
    return models


def recorded_models(results: Path) -> tuple[str, dict[str, str]]:
    """(base path, {row/seed: weights path}) of a results JSON's reported runs; a one-line error if absent."""
    try:
        saved = json.loads(results.read_text())
        models = {f"{row}/seed{seed}": run["model"]["path"] for row, by_seed in saved["runs"].items()
                  for seed, run in by_seed.items()}
        base = saved["settings"]["base"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--results {str(results)!r}: expected a results JSON of ngrpo compare with final models "
                         f"({error})") from None
    missing = [p for p in models.values() if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--results {str(results)!r}: {len(missing)} of {len(models)} final models are absent "
                         f"(first: {missing[0]})")
    return base, models


def model_samples(base_path: str, weights: str, samples: int) -> tuple[torch.Tensor, list[str]]:
    """The model's held-out samples (40-step Euler ODE, the evaluation's seed), clamped, with their prompts."""
    from neighbor_grpo.bench.method_run import final_model_images

    prompts = [str(d) for d in range(10)]
    images = final_model_images(base_path, weights, [], prompts, samples)
    return images.flatten(0, 1), [p for p in prompts for _ in range(samples)]


def main(argv: list[str] | None = None) -> dict:
    from neighbor_grpo.rewards.gold_stability import close_ranked, stability

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, help="results JSON of ngrpo compare whose final models to score")
    parser.add_argument("--fresh", action="store_true", help="train FRESH's small models instead")
    parser.add_argument("--base", default="builtin:digits-unet")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/gold_stability_models"))
    parser.add_argument("--samples", type=int, default=32, help="held-out samples per digit and model")
    parser.add_argument("--halves", type=int, default=5, help="random half-splits of split B")
    parser.add_argument("--close-min-gold", type=float, default=0.78,
                        help="the figures again among the models with gold >= this (close-ranked)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    try:
        if args.fresh:
            from neighbor_grpo.bench.compare import resolve_base

            args.models_dir.mkdir(parents=True, exist_ok=True)
            models, base_path = fresh_models(args.base, args.models_dir, log), resolve_base(args.base, False)
        elif args.results:
            base_path, models = recorded_models(args.results)
        else:
            parser.error("give --results RESULTS_JSON or --fresh")
    except ValueError as error:
        parser.error(str(error))
    images = {name: model_samples(base_path, path, args.samples) for name, path in models.items()}
    result = stability(images, halves=args.halves)
    result.update({"command": "python benchmarks/gold_stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "source": "fresh" if args.fresh else str(args.results), "fresh": FRESH if args.fresh else None,
                   "samples_per_digit": args.samples, "sampler": "euler x40", "wall_clock_s": time.perf_counter() - started})
    print(f"{len(models)} final models; Spearman over models:")
    print(f"  gold vs second gold (soft density, PCA + logistic): {result['spearman_full_vs_second_gold']:.3f}")
    for key in ("spearman_full_vs_half", "spearman_half_vs_half"):
        print(f"  {key}: mean {result[key]['mean']:.3f}, min {result[key]['min']:.3f}")
    try:
        close = result["close_ranked"] = close_ranked(result, args.close_min_gold)
        print(f"  among the {close['models']} models with gold >= {args.close_min_gold}: vs second gold "
              f"{close['spearman_full_vs_second_gold']:.3f}, vs halves {min(close['spearman_full_vs_half']):.3f}-"
              f"{max(close['spearman_full_vs_half']):.3f}, half vs half {min(close['spearman_half_vs_half']):.3f}-"
              f"{max(close['spearman_half_vs_half']):.3f}")
    except ValueError as error:
        print(f"  {error}")
    for name, full, second in zip(result["models"], result["full"], result["second_gold"]):
        print(f"  {name}: gold {full:.3f}, second gold {second:.3f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
