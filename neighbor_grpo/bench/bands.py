"""The gold-free monitors' bands, from the base model's own spread (issue #23).

On the base model's held-out samples (the evaluation's own prompts, sampler, seed and sample count), per prompt and
per sample: the within-prompt diversity (per pair of one prompt's images), the share of out-of-range pixels (per
image), the realism (distance to the nearest image of the task's realism reference, bench/tasks.py: a real digit of
split A, data the gold never reads, or a clean render of a training word; per image) and the prompt-swap distance
(how far the base model's velocity moves on a prompt's probe states when the prompt is swapped for another held-out
prompt: the distance monitor's own scale; per state and swap). `rules.bands_from_base_spread`
turns one of them into bands (UNIT, QUANTILE). The file is committed before any grid runs with it; a
comparison records its content, its path and the commit that last changed it (`bands_record`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.bench import tasks
from neighbor_grpo.bench.method_run import DistanceProbe
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.training.monitors import generate, nearest_real_distance, out_of_range_share, within_prompt_diversity


@torch.no_grad()
def prompt_swap_distance(adapter, probe: DistanceProbe, prompts: list[str]) -> list[list[float]]:
    """Per prompt p, per probe state of p and other prompt q: mean ||v(x, s, c_q) - v(x, s, c_p)||^2 per latent
    element: how far the base model's velocity moves when the digit asked for changes."""
    per_prompt = len(probe.states) // len(prompts)
    cond = adapter.encode_prompts(prompts)
    out = []
    for p in range(len(prompts)):
        part = slice(p * per_prompt, (p + 1) * per_prompt)
        states, sigmas, own = probe.states[part], probe.sigmas[part], probe.reference[part]
        moves = []
        for q in range(len(prompts)):
            if q != p:
                moved = adapter.velocity(states, sigmas, cond[q:q + 1].expand(per_prompt, *cond.shape[1:])).float()
                moves += (moved - own).pow(2).flatten(1).mean(dim=1).tolist()
        out.append(moves)
    return out


def base_spread(adapter, prompts: list[str], samples: int, seed: int, solver: str, steps: int, shift: float,
                realism_split: str = "A", realism_reference=tasks.split_a_digits) -> dict[str, dict[str, list]]:
    """Each monitor on the base model, per prompt (as the evaluation averages it) and per sample (each image,
    each pair of one prompt's images, each probe state and swapped prompt). Realism reads `realism_reference(
    adapter)` (the task's); `realism_split` "B" only to judge digits runs recorded before issue #23, whose realism
    read split B."""
    _, images = generate(adapter, prompts, samples, seed, solver, steps, shift)
    real = realism_reference(adapter) if realism_split == "A" else adapter.reference_images()
    probe = DistanceProbe(adapter, prompts, seed, shift)
    flat = images.clamp(0, 1).flatten(2)  # (P, S, pixels)
    pixels = flat.shape[-1]
    pairs = torch.cdist(flat, flat) / pixels ** 0.5
    off_diagonal = ~torch.eye(samples, dtype=torch.bool)
    swap = prompt_swap_distance(adapter, probe, prompts)
    nearest = torch.cdist(flat.flatten(0, 1), real.to(flat).flatten(1)).min(dim=1).values / pixels ** 0.5
    outside = ((images < -0.1) | (images > 1.1)).flatten(2).float().mean(dim=2)  # (P, S)
    return {
        "per_prompt": {"diversity": [within_prompt_diversity(images[p:p + 1]) for p in range(len(prompts))],
                       "out_of_range": [out_of_range_share(images[p]) for p in range(len(prompts))],
                       "realism": [nearest_real_distance(images[p], real) for p in range(len(prompts))],
                       "distance": [sum(v) / len(v) for v in swap]},
        "per_sample": {"diversity": pairs[:, off_diagonal].flatten().tolist(), "out_of_range": outside.flatten().tolist(),
                       "realism": nearest.tolist(), "distance": [v for values in swap for v in values]}}


UNIT, QUANTILE = "per_sample", 1.0  # the base model's worst sample; chosen on the recorded grids (docs/benchmarks.md)


def write_bands(base: str, out: str | Path, samples: int = 16, solver: str = "euler", steps: int = 40,
                seed: int | None = None, overwrite: bool = False, realism_split: str = "A", unit: str = UNIT,
                quantile: float = QUANTILE) -> dict:
    """Measure the base model's spread and write the bands file (JSON) that comparisons read with --bands."""
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.training.parts import load_model, model_shift

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r}: exists; pass --overwrite to replace it")
    if base.startswith("builtin:") and base not in tasks.BASES:
        raise ValueError(f"--base {base!r}: unknown built-in model; expected one of {', '.join(tasks.BASES)} or a "
                         f"model folder")
    task = tasks.task_for_base(base)
    if realism_split not in ("A", "B") or (realism_split == "B" and task.name != "digits"):
        raise ValueError(f"--realism-split: expected A{' or B' if task.name == 'digits' else ''} (B: the digits "
                         f"gold's own split, for old digits runs only), got {realism_split!r}")
    base_path = task.resolve_base(base, False)
    config = load_config(None, ["device=cpu"])
    adapter = load_model(base_path, "cpu", progress=False)
    shift = model_shift(config, adapter)
    seed = config.eval.seed if seed is None else seed
    prompts = list(task.eval_prompts)
    spread = base_spread(adapter, prompts, samples, seed, solver, steps, shift, realism_split, task.realism_reference)
    if unit not in spread:
        raise ValueError(f"--unit: expected per_prompt or per_sample, got {unit!r}")
    record = {"base": base, "task": task.name, "bands": rules.bands_from_base_spread(spread[unit], quantile), "unit": unit,
              "quantile": quantile, "per_prompt": spread["per_prompt"],
              "per_sample_quantiles_01_05_50_95_99": {
                  name: [float(v) for v in np.quantile(values, [0.01, 0.05, 0.5, 0.95, 0.99])]
                  for name, values in spread["per_sample"].items()},
              "per_sample": {name: [round(float(v), 7) for v in values] for name, values in spread["per_sample"].items()},
              "prompts": prompts, "samples_per_prompt": samples, "eval_seed": seed, "solver": solver,
              "steps": steps, "shift": shift, "realism_split": realism_split,
              "rule": f"each monitor bounded on its harmful side (rules.MONITOR_HARM) by the {quantile} quantile "
                      f"toward harm of the base model's values {unit.replace('_', ' ')}; realism against "
                      + (task.realism_note if task.name != "digits" else f"split {realism_split}"
                         + (" (the gold reads only split B)" if realism_split == "A" else
                            " (the gold's own data: only to judge runs recorded before issue #23, whose realism read B)"))}
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    return record


def read_bands(path: str | Path) -> dict:
    """The bands of a bands file, checked: {monitor: [low, high]} for monitors of rules.MONITOR_HARM."""
    try:
        record = json.loads(Path(path).read_text())
        bands = record["bands"]
        for name, band in bands.items():
            if name not in rules.MONITOR_HARM or len(band) != 2:
                raise ValueError(f"monitor {name!r} with band {band!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--bands {str(path)!r}: expected a bands file of `python -m neighbor_grpo.bench.bands` "
                         f"({error})") from None
    return record


def bands_record(path: str | Path) -> dict:
    """What a results JSON records of its bands: the content, the path, and the commit that last changed the file
    (None when it is not committed: the bands must be fixed before the grids that use them)."""
    record = read_bands(path)
    path = Path(path)
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", path.name], cwd=path.parent,
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
        dirty = commit is None or subprocess.run(["git", "status", "--porcelain", "--", path.name], cwd=path.parent,
                                                 capture_output=True, text=True, timeout=30).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, True
    return {"path": str(path), "commit": commit, "changed_since_commit": dirty, **record}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="measure the base model's spread; write the monitors' bands")
    parser.add_argument("--base", default="builtin:digits-unet",
                        help="builtin:NAME (digits, digits-unet, digits-reflow, words) or a model folder")
    parser.add_argument("--out", required=True, help="bands JSON to write")
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt (the evaluation's)")
    parser.add_argument("--solver", default="euler", help="the evaluation's sampler (headline: 40-step Euler)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--realism-split", default="A", help="A (default); B only to judge old recorded runs")
    parser.add_argument("--unit", default=UNIT, help="per_sample (default) or per_prompt: whose spread sets a band")
    parser.add_argument("--quantile", type=float, default=QUANTILE, help="toward harm; 1.0: the base's worst")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        print(json.dumps(write_bands(args.base, args.out, args.samples, args.solver, args.steps,
                                     overwrite=args.overwrite, realism_split=args.realism_split, unit=args.unit,
                                     quantile=args.quantile)["bands"], indent=2))
    except ValueError as error:
        parser.error(str(error))
