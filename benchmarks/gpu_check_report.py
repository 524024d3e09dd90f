"""The GPU check's JSON sections that describe rather than measure (the model's stand-ins, the ratios) and its
printed table (benchmarks/gpu_check.py)."""

from __future__ import annotations

from pathlib import Path


def model_description(args) -> dict:
    from neighbor_grpo.models.architectures import DIFFUSERS_ARCHS

    spec = DIFFUSERS_ARCHS[args.arch]
    tokens, width, pooled = spec["text"]
    return {
        "transformer": f"diffusers FluxTransformer2DModel, {'a tiny config' if args.tiny else 'FLUX.1-dev config'} "
                       "(neighbor_grpo.models.architectures.DIFFUSERS_ARCHS), random weights built on the device",
        "transformer_config": spec["transformer"],
        "text_encoders": f"stand-in: fixed random prompt embeddings {tokens} x {width}, pooled {pooled} (T5-XXL and "
                         "CLIP-L output shapes); encoders run once per prompt and are cached, so not timed",
        "vae": "AutoencoderKL with FLUX's VAE config, random weights" if not args.tiny else "a tiny AutoencoderKL",
    }


def ratios(runs: dict, finetunes) -> dict:
    """DanceGRPO's s/iter over Neighbor GRPO's, measured and predicted, per fine-tuning mode."""
    out = {}
    for finetune in finetunes:
        ours, dance = runs.get(f"neighbor_grpo/{finetune}"), runs.get(f"dance_grpo/{finetune}")
        if not ours or not dance:
            continue
        measured = (dance["measured"]["s_per_iter"] / ours["measured"]["s_per_iter"]
                    if ours.get("measured") and dance.get("measured") else None)
        predicted = None
        if ours.get("predicted") and dance.get("predicted"):
            a, b = dance["predicted"].get("s_per_iter"), ours["predicted"].get("s_per_iter")
            predicted = a / b if a and b else None
        out[f"dance_over_neighbor_s_per_iter/{finetune}"] = {"measured": measured, "predicted": predicted}
    return out


def print_report(result: dict, out: Path) -> None:
    env = result["environment"]
    print(f"\n{env['gpu'] or env['device']}: torch {env['torch']}, diffusers {env['diffusers']}; "
          f"{result['budget']['elapsed_s']:.0f} s of {result['budget']['budget_s']:.0f} s"
          + (f" (budget cut {len(result['budget']['cuts'])} time(s))" if result["budget"]["cut"] else ""))
    print("| run | status | s/iter | pred s/iter | img/s | peak alloc GB | pred peak GB | MFU rollout | MFU train |")
    print("|---|---|---|---|---|---|---|---|---|")

    def fmt(value, pattern="{:.3g}"):
        return "-" if value is None else pattern.format(value)

    for label, entry in result["runs"].items():
        m, p = entry.get("measured") or {}, entry.get("predicted") or {}
        print(f"| {label} | {entry['status']} | {fmt(m.get('s_per_iter'))} | {fmt(p.get('s_per_iter'))} "
              f"| {fmt(m.get('rollout_images_per_s'))} | {fmt(m.get('peak_memory_allocated_gb'))} "
              f"| {fmt(p.get('peak_memory_gb'))} | {fmt(m.get('mfu_rollout'), '{:.1%}')} "
              f"| {fmt(m.get('mfu_train'), '{:.1%}')} |")
    for label, entry in result["runs"].items():
        if entry.get("reason"):
            print(f"{label}: {entry['reason']}")
    print(f"wrote {out}")
