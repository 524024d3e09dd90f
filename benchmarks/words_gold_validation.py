"""Validation of the text-rendering gold (Tesseract) before any comparison uses it, as digit_gold was validated.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/words_gold_validation.py --out benchmarks/results/words_gold.json

Both readers (proxy: `ocr` in recognize mode, rapidocr; gold: `ocr_tesseract`) on every word of builtin:words:
clean renders at the model's resolution, Gaussian blur sigma 2 and 3x downsampling (of 32x128 renders), and their
agreement on base-model samples (`--samples-per-word` each, evaluation sampler). Refuses to run without Tesseract,
naming what to install. Not CI.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def degraded(images: torch.Tensor, kind: str) -> torch.Tensor:
    """32x128 renders blurred (Gaussian sigma 2) or downsampled 3x and back up (bilinear)."""
    if kind == "blur_sigma2":
        radius = 6
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-x ** 2 / (2 * 2.0 ** 2))
        kernel = kernel / kernel.sum()
        padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
        out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
        return F.conv2d(out, kernel.view(1, 1, -1, 1))
    small = F.interpolate(images, scale_factor=1 / 3, mode="area")
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


def exact(reader, images, prompts) -> float:
    return (reader(images, prompts) == 1).float().mean().item()


def main(argv=None) -> int:
    from neighbor_grpo.builtin.words import COMMON_WORDS, HELDOUT_WORDS, decode_word_latents, render_words, word_prompt
    from neighbor_grpo.rewards.tesseract import make_ocr_tesseract, tesseract_missing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", help="words model folder for the agreement on samples (default: the committed base)")
    parser.add_argument("--samples-per-word", type=int, default=4)
    args = parser.parse_args(argv)
    missing = tesseract_missing()
    if missing:
        print(f"words_gold_validation: refused, {missing}", file=sys.stderr)
        return 2
    from neighbor_grpo.builtin.words_pretrain import (COMMITTED_BASE, EVAL_SOLVER, EVAL_STEPS, ocr_reward,
                                                      pipeline_velocity)
    from neighbor_grpo.maths.flow import sigma_grid
    from neighbor_grpo.maths.solvers import integrate
    from neighbor_grpo.runs.io import atomic_write_text

    proxy, gold = ocr_reward(), make_ocr_tesseract()
    prompts = [word_prompt(w) for w in COMMON_WORDS]
    generator = torch.Generator().manual_seed(0)
    at_model = decode_word_latents(render_words(COMMON_WORDS, generator=generator) * 2 - 1)
    drawn = render_words(COMMON_WORDS, image_size=(32, 128), generator=torch.Generator().manual_seed(0))
    table = {"clean_model_resolution": at_model, "clean_32x128": drawn,
             "blur_sigma2": degraded(drawn, "blur_sigma2"), "downsample_3x": degraded(drawn, "downsample_3x")}
    record = {"words": len(COMMON_WORDS), "readers": {}}
    for name, images in table.items():
        record["readers"][name] = {"proxy_exact": exact(proxy, images, prompts), "gold_exact": exact(gold, images, prompts)}
        print(name, record["readers"][name], flush=True)
    base = args.base or (COMMITTED_BASE if (COMMITTED_BASE / "pretrain.json").is_file() else None)
    if base is None:
        print("no --base and no committed builtin:words base: agreement on base samples not measured", flush=True)
    else:
        from neighbor_grpo.models import load_adapter

        pipeline = load_adapter(base).pipeline
        sample_prompts = [word_prompt(w) for w in HELDOUT_WORDS for _ in range(args.samples_per_word)]
        noise = torch.randn((len(sample_prompts), *pipeline.latent_shape()), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            final = integrate(pipeline_velocity(pipeline, sample_prompts), noise, sigma_grid(EVAL_STEPS),
                              EVAL_SOLVER).states[-1]
        images = decode_word_latents(final)
        p, g = proxy(images, sample_prompts) == 1, gold(images, sample_prompts) == 1
        record["base_samples"] = {"base": str(base), "n": len(sample_prompts), "proxy_exact": p.float().mean().item(),
                                  "gold_exact": g.float().mean().item(), "agree": (p == g).float().mean().item(),
                                  "gold_given_proxy": (g & p).sum().item() / max(1, p.sum().item())}
        print("base samples", record["base_samples"], flush=True)
    atomic_write_text(args.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
