"""The planning table of docs/models.md and docs/planning.md for FLUX.2 [dev], FLUX.2 [klein] 4B / 9B and Z-Image:
LoRA and full fine-tune, 1 and 8 GPUs, H100 80 GB and H200 141 GB (139.8 GiB), Neighbor GRPO beside every baseline, each at the
resolution its peers train at (Flow-Factory's GRPO recipes: FLUX.2 [dev] 512 px, [klein] base 384 px, Z-Image-Turbo
512 px). Every plan from `neighbor_grpo.plan.planner.plan` (no weights, no GPU). Writes
benchmarks/results/plan_tables_flux2_zimage.json and .md (temporary names, then renamed).

Settings of every row: Neighbor GRPO at its defaults (G 12, B 4, 8 DPM-Solver++ steps, K 4), 8 prompts per
iteration, 300 iterations, PickScore in bf16, gradient checkpointing, one prompt per rollout chunk and micro-batch,
the text encoder off the GPU and the prompt cache in CPU memory (FLUX.2 [dev]'s Mistral Small 3.1 alone is 48 GB in
bf16); full fine-tunes on 8 GPUs shard with FSDP, LoRA runs replicate (DDP). CFG as the peers sample: [dev] its
guidance embedding (free), [klein] base true CFG 4 (every call twice), Z-Image-Turbo none.
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables_flux2_zimage.py
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

OUT = Path(__file__).resolve().parent / "results" / "plan_tables_flux2_zimage"
MODELS = {"z-image": (512, ["model.cfg_scale=1.0"]), "flux2-klein-4b": (384, ["model.cfg_scale=4.0"]),
          "flux2-klein-9b": (384, ["model.cfg_scale=4.0"]), "flux2-dev": (512, ["model.guidance=4.0"])}
GPUS = {"h100-80gb": "H100", "h200": "H200"}
COMMON = ["prompts_per_iteration=8", "iterations=300", "speed.gradient_checkpointing=true", "speed.micro_batch=1",
          "speed.rollout_chunk=1", "model.prompt_cache_on_cpu=true", "model.offload_text_encoders=true",
          "rewards=[{name: pickscore, kwargs: {dtype: bfloat16}}]"]


def row(model: str, finetune: str, gpus: int, gpu: str, tracer) -> dict:
    pixels, extra = MODELS[model]
    overrides = [f"model.path=arch:{model}", f"model.height={pixels}", f"model.width={pixels}",
                 f"optim.finetune={finetune}", *extra, *COMMON]
    if finetune == "full" and gpus > 1:
        overrides.append("speed.parallel=fsdp")
    result = plan(load_config(None, overrides), gpus=gpus, gpu=gpu, mfu=0.4, tracer=tracer)
    baselines = {r["method"]: r for r in result["baselines"]}
    return {"model": model, "finetune": finetune, "pixels": pixels, "gpus": gpus, "gpu": gpu, "overrides": overrides,
            "peak_gib": result["memory_gib"]["total"], "fits": result["fits"],
            "s_per_iter": result["seconds_per_iteration"],
            "baselines": {m: {"peak_gib": r["peak_gib"], "fits": r["fits"], "s_per_iter": r["seconds_per_iteration"]}
                          for m, r in baselines.items() if "error" not in r},
            "baseline_errors": {m: r["error"] for m, r in baselines.items() if "error" in r},
            "fit_options": [f"{o['option']} ({o['peak_gib']:.1f} GiB)" for o in result["fit_options"]]}


def markdown(rows: list[dict]) -> str:
    methods = sorted({m for r in rows for m in r["baselines"]})
    head = ["model", "fine-tune", "px", "GPU", "GPUs", "Neighbor GRPO peak GiB / GPU", "fits", "s/iter (40% MFU)",
            *(f"{m} s/iter" for m in methods), "what fits (if it does not)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["finetune"], str(r["pixels"]), GPUS[r["gpu"]], str(r["gpus"]), f"{r['peak_gib']:.1f}",
                 "yes" if r["fits"] else "no", f"{r['s_per_iter']:.1f}",
                 *(f"{r['baselines'][m]['s_per_iter']:.1f}" + ("" if r["baselines"][m]["fits"] else " (no fit)")
                   if m in r["baselines"] else "-" for m in methods),
                 "" if r["fits"] else "; ".join(r["fit_options"][:2]) or "nothing"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    started, rows = time.perf_counter(), []
    for model in MODELS:
        tracer = Tracer(resolve_model(f"arch:{model}", {}), stderr_progress)
        for finetune in ("lora", "full"):
            for gpu in GPUS:
                for gpus in (1, 8):
                    rows.append(row(model, finetune, gpus, gpu, tracer))
                    print(f"{model} {finetune} {gpu} x{gpus}: {rows[-1]['peak_gib']:.1f} GiB, "
                          f"{rows[-1]['s_per_iter']:.1f} s/iter", file=sys.stderr, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables_flux2_zimage.py",
              "mfu": 0.4, "seconds": time.perf_counter() - started, "rows": rows}
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", markdown(rows))):
        tmp = OUT.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, OUT.with_suffix(suffix))
    print(markdown(rows))


if __name__ == "__main__":
    main()
