"""The planning tables of docs/planning.md: FLUX.1-dev and SD3.5-medium, LoRA and full fine-tune, 512 and 720 px, on
1, 8 and 32 H100s, every plan from `neighbor_grpo.plan.planner.plan` (no weights, no GPU). Writes
benchmarks/results/plan_tables.json and .md (temporary names, then renamed).

Settings of every row (the paper's, where it states them: docs/planning.md): Neighbor GRPO at its defaults (G 12,
B 4, 8 DPM-Solver++ steps, K 4), 32 prompts per iteration (one per GPU on the paper's 32 GPUs; the paper does not
state its batch), 300 iterations, rewards HPSv2.1 + PickScore + ImageReward in bf16, gradient checkpointing, one
prompt per rollout chunk and per micro-batch, the prompt cache in CPU memory; full fine-tunes on several GPUs
shard with FSDP, LoRA runs replicate (DDP).
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.planner import Tracer, plan, stderr_progress

OUT = Path(__file__).resolve().parent / "results" / "plan_tables"
MODELS = ("flux-dev", "sd35-medium")
COMMON = ["prompts_per_iteration=32", "iterations=300", "speed.gradient_checkpointing=true", "speed.micro_batch=1",
          "speed.rollout_chunk=1", "model.prompt_cache_on_cpu=true",
          "rewards=[{name: hpsv2, kwargs: {dtype: bfloat16}}, {name: pickscore, kwargs: {dtype: bfloat16}}, "
          "{name: image_reward, kwargs: {dtype: bfloat16}}]"]


def row(model: str, finetune: str, pixels: int, gpus: int, tracer) -> dict:
    overrides = [f"model.path=arch:{model}", f"model.height={pixels}", f"model.width={pixels}",
                 f"optim.finetune={finetune}", *COMMON]
    if finetune == "full" and gpus > 1:
        overrides.append("speed.parallel=fsdp")
    result = plan(load_config(None, overrides), gpus=gpus, gpu="h100-80gb", mfu=0.4, tracer=tracer)
    dance = next(r for r in result["baselines"] if r["method"] == "dance_grpo")
    return {"model": model, "finetune": finetune, "pixels": pixels, "gpus": gpus, "overrides": overrides,
            "peak_gib": result["memory_gib"]["total"], "fits": result["fits"],
            "s_per_iter": result["seconds_per_iteration"], "dance_s_per_iter": dance["seconds_per_iteration"],
            "dance_over_neighbor": dance["cost_ratio_vs_neighbor_grpo"],
            "fe_per_sample": result["forward_equivalents_per_sample"], "memory_gib": result["memory_gib"],
            "fit_options": [f"{o['option']} ({o['peak_gib']:.1f} GiB)" for o in result["fit_options"]]}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | fine-tune | px | GPUs | peak GiB / GPU | fits 80 GB | s/iter (40% MFU) | DanceGRPO s/iter | "
             "DanceGRPO / Neighbor GRPO | FE / sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['finetune']} | {r['pixels']} | {r['gpus']} | {r['peak_gib']:.1f} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['s_per_iter']:.1f} | {r['dance_s_per_iter']:.1f} | "
                     f"{r['dance_over_neighbor']:.2f}x | {r['fe_per_sample']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    started, rows = time.perf_counter(), []
    for model in MODELS:
        tracer = Tracer(resolve_model(f"arch:{model}", {}), stderr_progress)
        for finetune in ("lora", "full"):
            for pixels in (512, 720):
                for gpus in (1, 8, 32):
                    rows.append(row(model, finetune, pixels, gpus, tracer))
                    print(f"{model} {finetune} {pixels} px {gpus} GPUs: {rows[-1]['peak_gib']:.1f} GiB, "
                          f"{rows[-1]['s_per_iter']:.1f} s/iter", file=sys.stderr, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables.py", "gpu": "h100-80gb",
              "mfu": 0.4, "seconds": time.perf_counter() - started, "rows": rows}
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", markdown(rows))):
        tmp = OUT.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, OUT.with_suffix(suffix))
    print(markdown(rows))


if __name__ == "__main__":
    main()
