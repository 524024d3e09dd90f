"""`ngrpo demo --task words`: text rendering end to end on a CPU. The committed builtin:words base (a small SD3
transformer that writes 3-4 letter words partly legibly), aligned with Neighbor GRPO to the OCR reward, then
before/after on the held-out words it never trained on, read with the evaluation sampler (32 Euler steps).

The aligned LoRA is loaded back through diffusers (`WordsPipeline.from_pretrained(base)` then `load_lora_weights`)
and the after-grid is rendered by that pipeline with diffusers' own scheduler: what a user of the export gets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from neighbor_grpo.builtin.demo import numeric_setup, torch_threads
from neighbor_grpo.builtin.words import HELDOUT_WORDS, word_prompt
from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.runs.io import atomic_write_bytes, atomic_write_text
from neighbor_grpo.runs.ownership import check_folder_target, write_marker

WORDS_DEMO_CONFIG = Path(__file__).parent / "configs" / "words_demo.yaml"
GROUP = 12
"""Samples per held-out word in the before/after table: a GRPO group, so the spread column means what RL sees."""
GRID_WORDS, GRID_SAMPLES = 16, 4
ROWS = [("exact", "held-out words read exactly (rapidocr)", "higher"),
        ("reward", "OCR reward (1 - edit distance / length)", "higher"),
        ("groups_with_spread", f"words whose {GROUP} samples differ in reward", "keep")]
GOLD_ROWS = [("gold_exact", "read exactly by Tesseract (gold: a reader nothing trains on)", "higher"),
             ("gold_reward", "Tesseract's OCR reward", "higher")]


def gold_reader():
    """Tesseract (`ocr_tesseract`) when it is installed, else None: the demo then shows the proxy only."""
    from neighbor_grpo.rewards.tesseract import make_ocr_tesseract, tesseract_missing

    return None if tesseract_missing() else make_ocr_tesseract()


def words_table(before: dict, after: dict) -> str:
    lines = [f"| metric ({len(HELDOUT_WORDS)} held-out words x {GROUP} samples) | base | aligned | better is |",
             "|---|---|---|---|"]
    rows = ROWS + [row for row in GOLD_ROWS if row[0] in before]
    lines += [f"| {label} | {before[key]:.4f} | {after[key]:.4f} | {better} |" for key, label, better in rows]
    return "\n".join(lines)


def word_grid(images: torch.Tensor, columns: int) -> bytes:
    """(n, 1, H, W) images in [0, 1] as a PNG: `columns` per row, 2 px grey gaps."""
    from io import BytesIO

    from PIL import Image

    n, _, height, width = images.shape
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (height + 2) + 2, columns * (width + 2) + 2), 128, dtype=np.uint8)
    pixels = (images.clamp(0, 1)[:, 0] * 255).round().to(torch.uint8).numpy()
    for index, image in enumerate(pixels):
        top, left = 2 + (index // columns) * (height + 2), 2 + (index % columns) * (width + 2)
        canvas[top:top + height, left:left + width] = image
    buffer = BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def diffusers_render(base: Path, lora: Path | None, prompts: list[str], noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Images rendered by diffusers alone: the base pipeline, the exported LoRA loaded by its own loader."""
    from neighbor_grpo.builtin.words import decode_word_latents
    from neighbor_grpo.models.diffusers_common import quiet_loading
    from neighbor_grpo.models.model_card import LORA_FILE
    from neighbor_grpo.models.words_pipeline import WordsPipeline

    with quiet_loading():
        pipe = WordsPipeline.from_pretrained(str(base))
        if lora is not None:
            pipe.load_lora_weights(str(lora), weight_name=LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompts, num_inference_steps=steps, latents=noise, sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
    return decode_word_latents(images * 2 - 1)


def run_words_demo(out: str | Path, overwrite: bool = False, overrides: list[str] | None = None,
                   progress: bool = True, threads: int = 2, base: str | Path | None = None) -> dict:
    """The demo with `threads` torch threads; `base`: another words model folder than the committed base."""
    with torch_threads(threads):
        return _run_words_demo(Path(out), overwrite, overrides, progress, base)


def _run_words_demo(out: Path, overwrite: bool, overrides: list[str] | None, progress: bool, base) -> dict:
    from neighbor_grpo.builtin.words_pretrain import EVAL_STEPS, ensure_words_model, legibility, ocr_reward
    from neighbor_grpo.models import load_adapter
    from neighbor_grpo.training.trainer import train

    started = time.perf_counter()
    check_folder_target(out, overwrite)
    if base is None:
        print("[1/3] base model: builtin:words (committed; pretrained by `ngrpo pretrain --model words`)")
        base = ensure_words_model(progress=progress)
    else:
        print("[1/3] base model: given")
    base = Path(base)
    config = load_config(WORDS_DEMO_CONFIG, [*(overrides or []), f"model.path={base}"])
    print(f"      {base}")
    print(f"[2/3] aligning with {config.algorithm} to the ocr reward (rapidocr, recognition only)")
    result = train(config, out, overwrite=overwrite, progress=progress)
    write_marker(out, "demo")
    aligned = out / "aligned"
    print("[3/3] held-out words before and after (the aligned LoRA loaded back through diffusers)")
    reward, gold = ocr_reward(), gold_reader()
    if gold is None:
        print("      (Tesseract is not installed: the gold rows are left out; apt-get install tesseract-ocr and "
              "pip install pytesseract add them)")
    before = legibility(load_adapter(base).pipeline, HELDOUT_WORDS, GROUP, reward, gold=gold)
    after = legibility(load_adapter(aligned).pipeline, HELDOUT_WORDS, GROUP, reward, gold=gold)
    prompts = [word_prompt(w) for w in HELDOUT_WORDS[:GRID_WORDS] for _ in range(GRID_SAMPLES)]
    noise = torch.randn((len(prompts), 1, 16, 64), generator=torch.Generator().manual_seed(7))
    grid_before = diffusers_render(base, None, prompts, noise, EVAL_STEPS)
    grid_after = diffusers_render(base, aligned, prompts, noise, EVAL_STEPS)
    ours = load_adapter(aligned)  # the same images through the run's own sampler: the export is faithful
    cond = ours.encode_prompts(prompts)
    with torch.no_grad():
        final = integrate(lambda x, s: ours.velocity(x, s, cond), noise, sigma_grid(EVAL_STEPS), "euler").states[-1]
    export_gap = (ours.decode(final) - grid_after).abs().max().item()
    atomic_write_bytes(out / "grid_before.png", word_grid(grid_before, GRID_SAMPLES))
    atomic_write_bytes(out / "grid_after.png", word_grid(grid_after, GRID_SAMPLES))
    table = words_table(before, after)
    seconds = time.perf_counter() - started
    summary = {"before": before, "after": after, "eval_before": result.eval_before, "eval_after": result.eval_after,
               "export_max_pixel_gap": export_gap, "wall_clock_s": seconds, "train_s": result.seconds,
               "iterations": config.iterations, "setup": numeric_setup()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", f"# Words demo: before/after (held-out words)\n\n{table}\n\n"
                      f"Grids: grid_before.png, grid_after.png ({GRID_WORDS} held-out words x {GRID_SAMPLES} samples, "
                      f"rendered by diffusers with the exported LoRA). Wall-clock: {seconds:.0f} s.\n")
    print()
    print(table)
    print(f"\nExported LoRA through diffusers vs the run's sampler: max pixel difference {export_gap:.2e}")
    print(f"Run folder: {out}  (grid_before.png, grid_after.png, aligned/ = the LoRA for diffusers, metrics.csv)")
    print(f"Wall-clock: {seconds:.0f} s")
    return summary
