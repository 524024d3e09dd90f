"""Spike: build the real transformer and text-encoder architectures on the meta device (no memory, no download)
and count their parameters. Run: PYTHONPATH=$PWD python benchmarks/planner_spike/meta_params.py"""
import time

import torch

from neighbor_grpo.plan.architectures import COMPONENTS, build_on_meta, parameter_count

for name in COMPONENTS:
    start = time.perf_counter()
    model = build_on_meta(name)
    assert all(p.is_meta for p in model.parameters())
    print(f"{name:22s} {parameter_count(model) / 1e9:8.4f} B params, built on meta in {time.perf_counter() - start:.2f} s")
