"""Is the words gold's ranking of final models stable when the evaluation words are resampled? (issue #24, item 3)

Scores the base and every reported final model of a words comparison (its results JSON: each run's `model.path`) on
the held-out words with the comparison's own evaluation (the same noise seed, 40-step Euler ODE, --samples per word),
under the gold (Tesseract, `ocr_tesseract`) and the proxy (rapidocr, `ocr` recognize). Each model's score is its
mean over words; the ranking of the models by all 49 words is compared (Spearman) with their rankings by random
halves of the words (--halves splits, both halves of each), and half with half. With --samples equal to the
comparison's `eval_samples_per_prompt` each model's gold is also checked against its run's last evaluation (the
same images: they should agree to rounding). Refuses to run without Tesseract.

    python benchmarks/words_gold_stability.py --results benchmarks/results/words/main.json \
        --out benchmarks/results/words/gold_stability.json --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from neighbor_grpo.runs.io import atomic_write_text  # noqa: E402

_WORKER: dict = {}


def _init(base_path: str) -> None:
    from neighbor_grpo.bench.tasks import load_rewards, task_for_base

    torch.set_num_threads(1)
    task = task_for_base(base_path)
    proxy, gold = load_rewards(task, "cpu")
    _WORKER.update(task=task, proxy=proxy, gold=gold, base=base_path)


def per_word_scores(weights: str | None, samples: int) -> dict:
    """One model's held-out samples scored: per word, the mean gold and proxy reward and the share read exactly."""
    from neighbor_grpo.bench.method_run import final_model_images

    task = _WORKER["task"]
    started = time.perf_counter()
    prompts = list(task.eval_prompts)
    images = final_model_images(_WORKER["base"], weights, list(task.settings), prompts, samples)
    flat, flat_prompts = images.flatten(0, 1), [p for p in prompts for _ in range(samples)]
    gold = _WORKER["gold"](flat, flat_prompts).float().reshape(len(prompts), samples)
    rewards = _WORKER["proxy"]
    proxy = rewards.total(rewards.score(flat, flat_prompts)).float().reshape(len(prompts), samples)
    return {"gold": gold.mean(1).tolist(), "proxy": proxy.mean(1).tolist(),
            "gold_exact": (gold >= 1.0).float().mean(1).tolist(), "proxy_exact": (proxy >= 1.0).float().mean(1).tolist(),
            "seconds": time.perf_counter() - started}


def word_halves(words: int, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    generator = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        order = generator.permutation(words)
        splits.append((np.sort(order[:words // 2]), np.sort(order[words // 2:])))
    return splits


def stability(per_word: np.ndarray, halves: int) -> dict:
    """Spearman over models (rows of `per_word`, models x words): all words against each half, half against half."""
    from neighbor_grpo.rewards.gold_checks import spearman

    full = per_word.mean(1)
    against_full, between = [], []
    for first, second in word_halves(per_word.shape[1], halves):
        a, b = per_word[:, first].mean(1), per_word[:, second].mean(1)
        against_full += [spearman(full, a), spearman(full, b)]
        between.append(spearman(a, b))
    summary = lambda values: {"mean": float(np.mean(values)), "min": float(np.min(values)), "values": values}  # noqa: E731
    return {"spearman_full_vs_half": summary(against_full), "spearman_half_vs_half": summary(between)}


def recorded(results: Path) -> tuple[dict, dict[str, str], dict[str, float]]:
    """(results, {row/seed: weights path}, {row/seed: the run's last-evaluation gold}) of a words comparison;
    the models' reading and checks are gold_stability.recorded_models'."""
    from gold_stability import recorded_models

    _, models = recorded_models(results)
    saved = json.loads(results.read_text())
    if saved["settings"].get("task") != "words":
        raise ValueError(f"--results {str(results)!r}: task {saved['settings'].get('task')!r}; expected a words "
                         "comparison")
    try:
        last = {f"{row}/seed{seed}": run["curve"][-1]["gold"] for row, by_seed in saved["runs"].items()
                for seed, run in by_seed.items()}
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"--results {str(results)!r}: a run without its curve's gold ({error!r})") from None
    return saved, models, last


def main(argv: list[str] | None = None) -> dict:
    from neighbor_grpo.bench.tasks import require_tesseract

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="results JSON of a words comparison")
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out word and model")
    parser.add_argument("--halves", type=int, default=20, help="random half-splits of the held-out words")
    parser.add_argument("--workers", type=int, default=1, help="models scored in parallel, one thread each")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.samples < 1 or args.halves < 1 or args.workers < 1:
            raise ValueError("--samples, --halves and --workers: expected >= 1")
        saved, models, last = recorded(args.results)
        require_tesseract(progress=False)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    started = time.perf_counter()
    base = saved["settings"]["base"]
    names, weights = ["base", *models], [None, *models.values()]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init, initargs=(base,)) as pool:
        scored = {}
        for name, score in zip(names, pool.map(per_word_scores, weights, [args.samples] * len(names))):
            scored[name] = score
            print(f"{name}: gold {np.mean(score['gold']):.3f}, proxy {np.mean(score['proxy']):.3f} "
                  f"({score['seconds']:.0f} s)", file=sys.stderr, flush=True)
    gold = np.array([scored[n]["gold"] for n in names])
    result = {"command": "python benchmarks/words_gold_stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "source": str(args.results), "samples_per_word": args.samples, "sampler": "euler x40",
              "words": len(gold[0]), "halves": args.halves, "models": names,
              "gold": gold.mean(1).tolist(), "proxy": [float(np.mean(scored[n]["proxy"])) for n in names],
              "gold_exact": [float(np.mean(scored[n]["gold_exact"])) for n in names],
              "proxy_exact": [float(np.mean(scored[n]["proxy_exact"])) for n in names],
              "per_word": scored, **stability(gold, args.halves)}
    if args.samples == saved["settings"]["eval_samples_per_prompt"]:
        differences = [abs(float(gold[names.index(n)].mean()) - last[n]) for n in models]
        result["max_difference_to_the_runs_last_gold"] = max(differences)
    result["wall_clock_s"] = time.perf_counter() - started
    print(f"{len(names)} models (the base and {len(models)} final models), {result['words']} words; Spearman:")
    for key in ("spearman_full_vs_half", "spearman_half_vs_half"):
        print(f"  {key}: mean {result[key]['mean']:.3f}, min {result[key]['min']:.3f}")
    if "max_difference_to_the_runs_last_gold" in result:
        print(f"  largest difference to a run's last-evaluation gold: {result['max_difference_to_the_runs_last_gold']:.2e}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
