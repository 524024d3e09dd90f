"""The README.md written beside every diffusers export."""

from __future__ import annotations

import json

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for save/load_lora_weights


def model_card(meta: dict, pipeline_class: str) -> str:
    """README.md for an export: base model, how to load it, rewards, config and held-out results when known."""
    kind = meta.get("kind")
    lines = ["---", "library_name: diffusers", "tags: [neighbor-grpo, text-to-image, flow-matching"
             + (", lora" if kind == "lora" else "") + "]", "---", "",
             f"# {pipeline_class} aligned with Neighbor GRPO", "",
             f"- base model: `{meta.get('base')}`" + (" (this folder)" if meta.get("base") == "." else ""),
             f"- export: {kind}"]
    if meta.get("loras"):
        lines.append(f"- LoRA files applied in order: {', '.join(f'`{x}`' for x in meta['loras'])}")
    for key in ("algorithm", "iteration", "iterations"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    lines += ["", "## Loading", "", "```python", "import torch", f"from diffusers import {pipeline_class}", ""]
    if kind == "pipeline":
        lines.append(f"pipe = {pipeline_class}.from_pretrained('THIS_FOLDER', dtype=torch.bfloat16)")
    else:
        lines.append(f"pipe = {pipeline_class}.from_pretrained({meta.get('base')!r}, dtype=torch.bfloat16)")
        transformer = meta.get("transformer")
        if transformer:
            where = "THIS_FOLDER/transformer" if transformer == "transformer" else transformer
            lines.append(f"pipe.transformer = type(pipe.transformer).from_pretrained({where!r}, dtype=torch.bfloat16)")
            if meta.get("transformer_2"):  # Wan 2.2: the low-noise expert beside it
                lines.append("pipe.transformer_2 = type(pipe.transformer_2).from_pretrained('THIS_FOLDER/transformer_2', "
                             "dtype=torch.bfloat16)")
        for lora in meta.get("loras") or []:
            where = "THIS_FOLDER" if lora == LORA_FILE else lora
            lines.append(f"pipe.load_lora_weights({where!r})" + ("  # reads " + LORA_FILE if lora == LORA_FILE else ""))
        for lora in meta.get("loras_transformer_2") or []:  # Wan 2.2: the low-noise expert's own LoRA
            lines.append(f"pipe.load_lora_weights('THIS_FOLDER', weight_name={lora!r}, load_into_transformer_2=True)")
        if len(meta.get("loras") or []) > 1:
            lines.append("# (several LoRAs: load each with its own adapter_name, or fuse_lora() after each)")
    lines += ["```", "", "or `ngrpo sample --checkpoint THIS_FOLDER --prompt '...' --out grid.png`.", ""]
    options = meta.get("options") or {}
    lines += ["## Sampling settings used in training", "",
              "\n".join(f"- {k}: {v}" for k, v in options.items() if k in
                        ("guidance", "cfg_scale", "negative_prompt", "height", "width", "dtype")), ""]
    config = meta.get("run_config")
    if isinstance(config, dict):
        rewards = config.get("rewards") or []
        lines += ["## Rewards", "", *[f"- {r.get('label') or r.get('name')} (weight {r.get('weight', 1.0)})"
                                       for r in rewards], ""]
        lines += ["## Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    heldout = meta.get("heldout")
    if heldout:
        lines += ["## Held-out results", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in heldout.items()], ""]
    return "\n".join(lines)
