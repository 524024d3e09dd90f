"""In-process vs reward-server scores, float32 and PNG encodings.

    python benchmarks/remote_score_differences.py [--count 512] [--out benchmarks/results/remote_score_differences.json]

Serves the built-in `digit_prob` reward (the cached classifier; `ngrpo pretrain` builds it) on a real loopback
server and scores the same images in process and through the `remote` reward with `encoding: float32` and `png`:
`--count` images of the built-in data set (real digits, 16 x 16 grey, in [0, 1]) and as many uniform-noise images,
prompted with their own digit (data set) or a random digit (noise). Prints the largest and mean |difference| and
the score's spread (std) for scale.
"""

from __future__ import annotations

import argparse
import json

import torch

from neighbor_grpo.builtin.data import load_digits_images
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.server import ServerThread, make_app
from neighbor_grpo.runs.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits, labels = load_digits_images(16)
    generator = torch.Generator().manual_seed(0)
    sets = {"data set digits": (digits[:args.count].float(), [str(int(y)) for y in labels[:args.count]]),
            "uniform noise": (torch.rand(args.count, 1, 16, 16, generator=generator),
                              [str(int(d)) for d in torch.randint(0, 10, (args.count,), generator=generator)])}
    local = build_rewards([{"name": "digit_prob"}]).rewards["digit_prob"]
    results = {}
    with ServerThread(make_app(local, "digit_prob", max_batch=1024)) as url:
        for encoding in ("float32", "png"):
            remote = build_rewards([{"name": "remote", "kwargs": {"url": url, "encoding": encoding}}]).rewards["remote"]
            for name, (images, prompts) in sets.items():
                here, there = local(images.clamp(0, 1), prompts), remote(images.clamp(0, 1), prompts)
                difference = (here - there).abs()
                results[f"{encoding}, {name}"] = {"max_abs": float(difference.max()), "mean_abs": float(difference.mean()),
                                                  "score_std": float(here.std()), "bit_identical": bool(torch.equal(here, there))}
    print("| encoding, images | max abs diff | mean abs diff | score std | bit-identical |")
    print("|---|---|---|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value['max_abs']:.3g} | {value['mean_abs']:.3g} | {value['score_std']:.3g} | "
              f"{value['bit_identical']} |")
    if args.out:
        atomic_write_text(args.out, json.dumps({"count": args.count, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
