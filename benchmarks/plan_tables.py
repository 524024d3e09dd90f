"""The planning tables of docs/planning.md (and docs/models.md), one loop over several model lists: every plan from
`neighbor_grpo.plan.planner.plan` (no weights, no GPU). Each table writes benchmarks/results/<its name>.json and .md
(temporary names, then renamed).

Tables (`python benchmarks/plan_tables.py [NAME ...]`, default all):
- `plan_tables`: FLUX.1-dev and SD3.5-medium, LoRA and full fine-tune, 512 and 720 px, on 1, 8 and 32 H100s, at
  the paper's settings where it states them: 32 prompts per iteration (one per GPU on the paper's 32 GPUs; the
  paper does not state its batch), rewards HPSv2.1 + PickScore + ImageReward in bf16; DanceGRPO beside Neighbor GRPO.
- `plan_tables_flux2_zimage`: FLUX.2 [dev], [klein] 4B / 9B and Z-Image, each at the resolution its peers train at
  (Flow-Factory's GRPO recipes: [dev] 512 px, [klein] base 384 px, Z-Image-Turbo 512 px) with their guidance ([dev]
  its guidance embedding, [klein] base true CFG 4, Z-Image-Turbo none).
- `plan_tables_qwen_kontext_wan`: Qwen-Image (512 px, true CFG 4 with its negative prompt, as its model card
  samples; captions at 256 tokens), FLUX.1 Kontext [dev] (512 px, its guidance embedding 2.5; the source image is
  as many tokens again), and Wan2.1-T2V-1.3B, Wan2.2-T2V-A14B (two experts, one per step) at 33 frames of 480 x 832
  and Wan2.2-TI2V-5B at 33 frames of 704 x 1280 (its 16x VAE), all three with CFG 5 (Wan's default guidance).
- `plan_tables_qwen_image_edit`: Qwen-Image-Edit, -2509 and -2511 (512 px output, true CFG 4 with its negative prompt
  " " as the model cards sample; captions at 256 tokens), each source image at the output's aspect ratio, which the
  pipelines bring to ~1024 x 1024 (4096 source tokens after the 1024 noisy ones) and Qwen2.5-VL reads beside the
  caption (Edit: 1369 image tokens of its ~1 MP copy; -2509/-2511: 196 of a ~384 x 384 copy).
The last three: 8 prompts per iteration, PickScore in bf16 (a video's frames each scored), the text encoders off the
GPU, H100 80 GB and H200 141 GB, 1 and 8 GPUs, every baseline of `ngrpo compare`'s paper settings beside Neighbor GRPO.
Every row: 40% MFU, Neighbor GRPO at its defaults (G 12, B 4, 8 DPM-Solver++ steps, K 4), 300 iterations, gradient
checkpointing, one prompt per rollout chunk and per micro-batch, the prompt cache in CPU memory; full fine-tunes
on several GPUs shard with FSDP, LoRA runs replicate (DDP).
`models-table` (no planning): rewrites the planned-memory columns of docs/models.md's table of every model from these
tables' recorded JSONs (`MODELS_TABLE` says which row of which table; tests/benchmarks/test_models_table_memory.py
checks that the docs and the JSONs agree).
Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables.py [NAME ...] [--models MODEL,...]
(`--models`: only those models' rows, as parts that are merged into the table when the last one is written: run
parts side by side on a machine with idle cores.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.plan.models import resolve_model
from neighbor_grpo.plan.planner import Tracer, plan, stderr_progress

RESULTS = Path(__file__).resolve().parent / "results"
GPU_NAMES = {"h100-80gb": "H100", "h200": "H200"}
BASE = ["iterations=300", "speed.gradient_checkpointing=true", "speed.micro_batch=1", "speed.rollout_chunk=1",
        "model.prompt_cache_on_cpu=true"]
PEERS = [*BASE, "prompts_per_iteration=8", "model.offload_text_encoders=true",
         "rewards=[{name: pickscore, kwargs: {dtype: bfloat16}}]"]


@dataclass(frozen=True)
class Variant:
    """One model at one size: its rows are every fine-tune x GPU kind x GPU count of its table."""

    model: str
    height: int
    width: int
    overrides: tuple = ()
    frames: int = 0  # a video's frame count (model.num_frames); 0 for images


@dataclass(frozen=True)
class Table:
    variants: tuple
    common: tuple
    gpu_counts: tuple = (1, 8)
    gpu_kinds: tuple = ("h100-80gb", "h200")
    columns: str = "every baseline"  # or "dance" (the FLUX.1 / SD3 table's DanceGRPO columns)


def square(model: str, pixels: int, *overrides: str) -> Variant:
    return Variant(model, pixels, pixels, overrides)


TABLES = {
    "plan_tables": Table(
        tuple(square(m, px) for m in ("flux-dev", "sd35-medium") for px in (512, 720)),
        (*BASE, "prompts_per_iteration=32",
         "rewards=[{name: hpsv2, kwargs: {dtype: bfloat16}}, {name: pickscore, kwargs: {dtype: bfloat16}}, "
         "{name: image_reward, kwargs: {dtype: bfloat16}}]"),
        gpu_counts=(1, 8, 32), gpu_kinds=("h100-80gb",), columns="dance"),
    "plan_tables_flux2_zimage": Table(
        (square("z-image", 512, "model.cfg_scale=1.0"), square("flux2-klein-4b", 384, "model.cfg_scale=4.0"),
         square("flux2-klein-9b", 384, "model.cfg_scale=4.0"), square("flux2-dev", 512, "model.guidance=4.0")),
        tuple(PEERS)),
    "plan_tables_qwen_kontext_wan": Table(
        (square("qwen-image", 512, "model.cfg_scale=4.0", "model.negative_prompt=' '", "model.max_sequence_length=256"),
         square("flux-kontext-dev", 512, "model.guidance=2.5"),
         *(Variant(model, height, width, ("model.cfg_scale=5.0",), 33)
           for model, height, width in (("wan21-t2v-1.3b", 480, 832), ("wan22-ti2v-5b", 704, 1280),
                                        ("wan22-t2v-a14b", 480, 832)))),
        tuple(PEERS)),
    "plan_tables_qwen_image_edit": Table(
        tuple(square(model, 512, "model.cfg_scale=4.0", "model.negative_prompt=' '", "model.max_sequence_length=256")
              for model in ("qwen-image-edit", "qwen-image-edit-2509", "qwen-image-edit-2511")),
        tuple(PEERS)),
}


# docs/models.md's table of every model: its row's first cell -> (plan table, model, size) of the recorded rows its
# planned-memory columns show (Neighbor GRPO at its defaults on H100s, the table's own settings); rows not listed
# have no recorded plan
MODELS_TABLE = {
    "FLUX.1 [dev]": ("plan_tables", "flux-dev", "512"),
    "SD3 / SD3.5": ("plan_tables", "sd35-medium", "512"),
    "Qwen-Image": ("plan_tables_qwen_kontext_wan", "qwen-image", "512"),
    "Qwen-Image-Edit": ("plan_tables_qwen_image_edit", "qwen-image-edit", "512"),
    "Qwen-Image-Edit-Plus (2509, 2511)": ("plan_tables_qwen_image_edit", "qwen-image-edit-2511", "512"),
    "FLUX.1 Kontext [dev]": ("plan_tables_qwen_kontext_wan", "flux-kontext-dev", "512"),
    "FLUX.2 [dev]": ("plan_tables_flux2_zimage", "flux2-dev", "512"),
    "FLUX.2 [klein] 4B": ("plan_tables_flux2_zimage", "flux2-klein-4b", "384"),
    "FLUX.2 [klein] 9B": ("plan_tables_flux2_zimage", "flux2-klein-9b", "384"),
    "Z-Image (-Turbo)": ("plan_tables_flux2_zimage", "z-image", "512"),
    "Wan 2.1 T2V 1.3B": ("plan_tables_qwen_kontext_wan", "wan21-t2v-1.3b", "33 x 480x832"),
    "Wan 2.2 T2V A14B": ("plan_tables_qwen_kontext_wan", "wan22-t2v-a14b", "33 x 480x832"),
    "Wan 2.2 TI2V-5B": ("plan_tables_qwen_kontext_wan", "wan22-ti2v-5b", "33 x 704x1280"),
}
MEMORY_COLUMNS = (("lora", 1), ("lora", 8), ("full", 1), ("full", 8))  # then the column naming the plan
DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
MARKER = "<!-- models-table -->"  # the table follows this line in docs/models.md


def recorded_peak(table: str, model: str, pixels: str, finetune: str, gpus: int) -> tuple[float, bool]:
    """(peak GiB per GPU, fits) of Neighbor GRPO's recorded row on H100s."""
    record = json.loads((RESULTS / f"{table}.json").read_text())
    for r in record["rows"]:
        if (r["model"], str(r["pixels"]), r["finetune"], r["gpus"], r.get("gpu", record.get("gpu"))) == (
                model, pixels, finetune, gpus, "h100-80gb"):
            return r["peak_gib"], r["fits"]
    raise SystemExit(f"plan_tables.py: {table}.json has no row for {model} {pixels} {finetune} on {gpus} H100s")


def memory_cells(key: str) -> list[str]:
    if key not in MODELS_TABLE:
        return ["no recorded plan"] * len(MEMORY_COLUMNS) + ["-"]
    table, model, pixels = MODELS_TABLE[key]
    if not (RESULTS / f"{table}.json").is_file():  # tests/benchmarks/test_models_table_memory.py fails on these
        print(f"plan_tables.py: {table}.json not recorded yet; {key!r} gets no memory figures", file=sys.stderr)
        return ["not recorded"] * len(MEMORY_COLUMNS) + [f"`{model}`, {pixels} px, `{table}`"]
    cells = []
    for finetune, gpus in MEMORY_COLUMNS:
        peak, fits = recorded_peak(table, model, pixels, finetune, gpus)
        cells.append(f"{peak:.1f}" + ("" if fits else " (no fit)"))
    return cells + [f"`{model}`, {pixels} px, `{table}`"]


def models_table() -> str:
    """docs/models.md with the planned-memory cells of its table of every model regenerated (temp file, renamed)."""
    lines = DOCS.read_text().split("\n")
    start = lines.index(MARKER) + 3  # the marker, the header, the separator
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    for i in range(start, end):
        cells = [c.strip() for c in lines[i].strip().strip("|").split(" | ")]
        cells[-len(MEMORY_COLUMNS) - 1:] = memory_cells(cells[0])
        lines[i] = "| " + " | ".join(cells) + " |"
    tmp = DOCS.with_name(DOCS.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, DOCS)
    return "\n".join(lines[start - 2:end]) + "\n"


def row(variant: Variant, table: Table, finetune: str, gpus: int, gpu: str, tracers: dict) -> dict:
    overrides = [f"model.path=arch:{variant.model}", f"model.height={variant.height}", f"model.width={variant.width}",
                 f"optim.finetune={finetune}", *variant.overrides, *table.common]
    if variant.frames:
        overrides.append(f"model.num_frames={variant.frames}")
    if finetune == "full" and gpus > 1:
        overrides.append("speed.parallel=fsdp")
    config = load_config(None, overrides)
    if variant not in tracers:  # one per variant, its model read with the variant's options: traces shared by its rows
        tracers[variant] = Tracer(resolve_model(config.model.path, dataclasses.asdict(config.model)), stderr_progress)
    result = plan(config, gpus=gpus, gpu=gpu, mfu=0.4, tracer=tracers[variant])
    baselines = {r["method"]: r for r in result["baselines"]}
    dance = baselines.get("dance_grpo", {})
    return {"model": variant.model, "finetune": finetune, "pixels": size(variant), "gpus": gpus, "gpu": gpu,
            "overrides": overrides, "peak_gib": result["memory_gib"]["total"], "fits": result["fits"],
            "s_per_iter": result["seconds_per_iteration"], "dance_s_per_iter": dance.get("seconds_per_iteration"),
            "dance_over_neighbor": dance.get("cost_ratio_vs_neighbor_grpo"),
            "fe_per_sample": result["forward_equivalents_per_sample"], "memory_gib": result["memory_gib"],
            "baselines": {m: {"peak_gib": r["peak_gib"], "fits": r["fits"], "s_per_iter": r["seconds_per_iteration"]}
                          for m, r in baselines.items() if "error" not in r},
            "baseline_errors": {m: r["error"] for m, r in baselines.items() if "error" in r},
            "fit_options": [f"{o['option']} ({o['peak_gib']:.1f} GiB)" for o in result["fit_options"]]}


def size(variant: Variant) -> str:
    side = str(variant.height) if variant.height == variant.width else f"{variant.height}x{variant.width}"
    return f"{variant.frames} x {side}" if variant.frames else side


def dance_markdown(rows: list[dict]) -> str:
    lines = ["| model | fine-tune | px | GPUs | peak GiB / GPU | fits 80 GB | s/iter (40% MFU) | DanceGRPO s/iter | "
             "DanceGRPO / Neighbor GRPO | FE / sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['finetune']} | {r['pixels']} | {r['gpus']} | {r['peak_gib']:.1f} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['s_per_iter']:.1f} | {r['dance_s_per_iter']:.1f} | "
                     f"{r['dance_over_neighbor']:.2f}x | {r['fe_per_sample']:.1f} |")
    return "\n".join(lines) + "\n"


def baselines_markdown(rows: list[dict]) -> str:
    methods = sorted({m for r in rows for m in r["baselines"]})
    head = ["model", "fine-tune", "px", "GPU", "GPUs", "Neighbor GRPO peak GiB / GPU", "fits", "s/iter (40% MFU)",
            *(f"{m} s/iter" for m in methods), "what fits (if it does not)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["finetune"], r["pixels"], GPU_NAMES[r["gpu"]], str(r["gpus"]), f"{r['peak_gib']:.1f}",
                 "yes" if r["fits"] else "no", f"{r['s_per_iter']:.1f}",
                 *(f"{r['baselines'][m]['s_per_iter']:.1f}" + ("" if r["baselines"][m]["fits"] else " (no fit)")
                   if m in r["baselines"] else "-" for m in methods),
                 "" if r["fits"] else "; ".join(r["fit_options"][:2]) or "nothing"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(name: str, record: dict, markdown: str) -> None:
    out = RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", markdown)):
        if not text:
            continue
        final = out.with_name(out.name + suffix)  # names may hold dots (wan21-t2v-1.3b)
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, final)


def run_table(name: str, models: list[str] | None = None) -> str:
    """The table's rows; with `models`, only those models' rows, kept as a part (results/NAME.part-MODEL.json) and
    merged into the table once every model has its part (parts run side by side in separate processes)."""
    table, started, rows, tracers = TABLES[name], time.perf_counter(), [], {}
    variants = [v for v in table.variants if models is None or v.model in models]
    for variant in variants:
        for finetune in ("lora", "full"):
            for gpu in table.gpu_kinds:
                for gpus in table.gpu_counts:
                    rows.append(row(variant, table, finetune, gpus, gpu, tracers))
                    print(f"{variant.model} {size(variant)} {finetune} {gpu} x{gpus}: {rows[-1]['peak_gib']:.1f} GiB, "
                          f"{rows[-1]['s_per_iter']:.1f} s/iter", file=sys.stderr, flush=True)
    command = f"PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/plan_tables.py {name}"
    if models is not None:
        for variant in variants:
            part = [r for r in rows if r["model"] == variant.model]
            write(f"{name}.part-{variant.model}", {"command": f"{command} --models {','.join(models)}",
                                                   "seconds": time.perf_counter() - started, "rows": part}, "")
        parts = [RESULTS / f"{name}.part-{v.model}.json" for v in table.variants]
        if not all(path.is_file() for path in parts):
            return ""
        records = [json.loads(path.read_text()) for path in parts]
        rows = [r for record in records for r in record["rows"]]
        command += f" (in parts: {'; '.join(sorted({record['command'] for record in records}))})"
    markdown = (dance_markdown if table.columns == "dance" else baselines_markdown)(rows)
    write(name, {"command": command, "mfu": 0.4, "seconds": time.perf_counter() - started, "rows": rows}, markdown)
    if models is not None:  # merged: the parts are in the table now
        for variant in table.variants:
            (RESULTS / f"{name}.part-{variant.model}.json").unlink(missing_ok=True)
    return markdown


def main(args: list[str]) -> None:
    models = None
    if "--models" in args:
        at = args.index("--models")
        models, args = args[at + 1].split(","), args[:at] + args[at + 2:]
    if args == ["models-table"]:
        print(models_table())
        return
    unknown = [n for n in args if n not in TABLES]
    if unknown:
        raise SystemExit(f"plan_tables.py: unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    for name in args or TABLES:
        print(run_table(name, models))


if __name__ == "__main__":
    main(sys.argv[1:])
