"""Seconds per training iteration of every row of a comparison, measured after its runs on the same machine and
model: single-thread workers side by side, each building every row at its chosen settings and running them
interleaved iteration by iteration (rotating which goes first, each worker from another offset), so load from
other processes hits every method alike. The same interleaving as benchmarks/throughput.py (method_runs.
time_alternating), without its per-phase records. Wall-clock to target = iterations to target x the median here:
the s/iter logged during the runs themselves is noisier (the machine's load changes over an hour)."""

from __future__ import annotations

import statistics
import time

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.training.iteration import train_iteration
from neighbor_grpo.training.parts import build_training_parts, load_model, read_prompts


def time_rows(rows: dict[str, list[str]], context: dict, proxy, offset: int, warmup: int, iters: int) -> dict:
    """{row: [seconds of each timed iteration]}: `warmup` untimed rounds, then `iters` timed rounds over the rows,
    round r starting at row (offset + r) mod len(rows)."""
    built = {}
    for name, overrides in rows.items():
        config = load_config(None, context["common"] + overrides + ["seed=0"])
        adapter = load_model(context["base_path"], config.device, progress=False)
        prompts = list(context["train_prompts"]) if context.get("train_prompts") else read_prompts(config)
        built[name] = (config, adapter, build_training_parts(config, adapter), prompts, [0])
    names = list(rows)
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def step(name: str) -> float:
        config, adapter, parts, prompts, iteration = built[name]
        tick = time.perf_counter()
        train_iteration(config, adapter, proxy, parts.algorithm, parts.optimizer, parts.params, None,
                        parts.reference_velocity, prompts, iteration[0], lambda point: None, parts=parts)
        iteration[0] += 1
        return time.perf_counter() - tick

    for _ in range(warmup):
        for name in names:
            step(name)
    for round_index in range(iters):
        shift = (offset + round_index) % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(step(name))
    return seconds
