"""The plan as text: what `ngrpo plan` prints (the JSON carries the same numbers)."""

from __future__ import annotations

MEMORY_LINES = [("weights", "weights (trained net)"), ("gradients", "gradients"),
                ("optimizer_state", "optimizer state (AdamW)"), ("ema", "EMA shadow"),
                ("reference_copy", "reference copy (full fine-tune)"), ("algorithm_networks", "algorithm networks"),
                ("ddp_buckets", "DDP gradient buckets"), ("text_encoders", "text encoders"),
                ("prompt_cache", "prompt cache"), ("vae", "VAE"), ("rewards", "rewards (estimate)"),
                ("trajectories", "stored trajectories"), ("activations_peak", "activations (peak phase)")]


def flops_text(flops: float) -> str:
    """FLOPs in the unit that reads best (PFLOP for FLUX iterations, GFLOP for the tiny test models)."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:8.2f} {unit}"
    return f"{flops / 1e6:8.2f} MFLOP"


def seconds_text(seconds: float) -> str:
    return f"{seconds:8.1f}" if seconds >= 0.1 else f"{seconds:8.2g}"


def render(result: dict) -> str:
    r = result
    if "lower_bound_gib" in r:  # refused from shapes before any trace (plan.bounds)
        return (f"{r['model']}, {r['algorithm']}, {r['finetune']} fine-tune, {r['gpus']} x {r['gpu']}: "
                f"{r['does_not_fit']}. Lower prompts_per_iteration, the group size or the resolution, or plan more "
                "--gpus")
    gib = r["memory_gib"]
    size = f"{r['resolution']} px, " if r.get("resolution") else ""
    size = f"{r['frames']} frames x {size}" if r.get("frames") else size
    lines = [f"{r['model']}, {r['algorithm']}, {r['finetune']} fine-tune, {size}{r['gpus']} x {r['gpu']} "
             f"({r['gpu_memory_gib']:.1f} GiB, {r['gpu_peak_tflops']:.0f} TFLOPS bf16 dense), MFU {r['mfu']:.0%}",
             f"per GPU: {r['prompts_per_gpu']:g} prompts, {r['samples_per_gpu']} samples, "
             f"{r['trainable_parameters'] / 1e6:,.1f} M trainable parameters", "", "peak memory per GPU:"]
    for key, label in MEMORY_LINES:
        if gib.get(key):
            lines.append(f"  {label:34s} {gib[key]:8.2f} GiB")
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"  {'total (peak phase: ' + gib['peak_phase'] + ')':34s} {gib['total']:8.2f} GiB  -> x {r['margin']} + "
                 f"{r['allowance_gib']:.1f} GiB allowance = {gib['total'] * r['margin'] + r['allowance_gib']:.1f} of "
                 f"{r['gpu_memory_gib']:.1f} GiB: {verdict}")
    lines += ["", "FLOPs per iteration per GPU:"]
    total = r["flops_total_per_gpu"]
    for phase, flops in r["flops_per_gpu"].items():
        lines.append(f"  {phase:12s} {flops_text(flops)}  {flops / total:6.1%}")
    lines.append(f"  {'total':12s} {flops_text(total)}  (all GPUs {flops_text(r['flops_all_gpus']).strip()})")
    lines.append(f"forward-equivalents per sample: {r['forward_equivalents_per_sample']:.2f}")
    lines.append(f"predicted: {r['seconds_per_iteration']:.3g} s/iteration at {r['mfu']:.0%} MFU")
    width = max([16] + [len(row["method"]) for row in r["baselines"]])
    lines += ["", "every method at its paper settings (same model, resolution, speed settings):",
              f"  {'method':{width}s} {'s/iter':>8s} {'FE/sample':>10s} {'peak GiB':>9s} {'fits':>5s} {'cost vs NGRPO':>14s}"]
    for row in r["baselines"]:
        if "error" in row:
            lines.append(f"  {row['method']:{width}s} {row['error']}")
            continue
        lines.append(f"  {row['method']:{width}s} {seconds_text(row['seconds_per_iteration'])} {row['forward_equivalents_per_sample']:10.1f} "
                     f"{row['peak_gib']:9.1f} {'yes' if row['fits'] else 'no':>5s} "
                     f"{row.get('cost_ratio_vs_neighbor_grpo', float('nan')):13.2f}x")
    if r["unknown_rewards"]:
        lines.append(f"not modelled (0 FLOPs, 0 bytes): rewards {', '.join(r['unknown_rewards'])}")
    if not r["fits"]:
        lines += ["", "does not fit; options that would (each alone):"]
        for option in r["fit_options"]:
            how = " ".join(option["overrides"]) + (f" --gpus {option['gpus']}" if option["gpus"] != r["gpus"] else "")
            lines.append(f"  {option['option']}: {how.strip() or '-'}: predicted peak {option['peak_gib']:.1f} GiB")
        if not r["fit_options"]:
            lines.append("  none alone; combine several (LoRA, checkpointing, FSDP over more GPUs, offloading)")
    return "\n".join(lines)
