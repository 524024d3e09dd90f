"""Speed-up of `speed.async_scoring` with a slow reward server (a fixed time per image).

    python benchmarks/async_scoring.py --per-image-ms 15 --hidden 1024 --depth 4 --iterations 4 --repeat 2 \
        --out benchmarks/results/async_scoring.json

Starts a real reward server on 127.0.0.1 (uvicorn, an ephemeral port) whose reward sleeps `--per-image-ms` per
image (the time a remote judge or a busy GPU scorer takes), and trains a small random digits model (`--hidden`,
`--depth`) through it with the `remote` reward (float32), scoring in turn and overlapped, `--iterations` timed
iterations each, alternating the two `--repeat` times on the same machine. Prints the median seconds per
iteration of each and the speed-up, and checks that both orders end with bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from neighbor_grpo.config.train_config import load_config
from neighbor_grpo.models import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.retry import with_retries
from neighbor_grpo.rewards.server import ServerThread, make_app
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.training.iteration import train_iteration
from neighbor_grpo.training.parts import build_training_parts


class SlowReward:
    """Mean brightness, after `per_image_s` per image of waiting (a remote model's latency, not this CPU's work)."""

    def __init__(self, per_image_s: float):
        self.per_image_s = per_image_s

    def __call__(self, images, prompts):
        time.sleep(self.per_image_s * len(prompts))
        return images.mean(dim=(1, 2, 3))


def timed_run(url: str, overlap: bool, args) -> tuple[list[float], list[torch.Tensor]]:
    config = load_config(None, [f"prompts_per_iteration={args.prompts}", f"neighbor_grpo.group_size={args.group}",
                                "neighbor_grpo.num_anchors=2", f"neighbor_grpo.rollout_steps={args.steps}",
                                f"speed.rollout_chunk={args.chunk}", f"speed.async_scoring={str(overlap).lower()}"])
    adapter = DigitsAdapter.create(DigitsNetConfig(hidden=args.hidden, depth=args.depth), seed=0)
    rewards = with_retries(build_rewards([{"name": "remote", "kwargs": {"url": url, "encoding": "float32"}}]))
    parts = build_training_parts(config, adapter)
    seconds = []
    for iteration in range(args.iterations + 1):  # the first is a warm-up
        started = time.perf_counter()
        train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params, parts.ema,
                        parts.reference_velocity, list(config.prompts.train), iteration, lambda point: None,
                        parts=parts)
        seconds.append(time.perf_counter() - started)
    return seconds[1:], [p.detach().clone() for p in adapter.net.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-image-ms", type=float, default=15.0)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=2, help="speed.rollout_chunk (groups per chunk)")
    parser.add_argument("--steps", type=int, default=8, help="rollout steps")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    weights: dict[bool, list[torch.Tensor]] = {}
    with ServerThread(make_app(SlowReward(args.per_image_ms / 1000), "slow", max_batch=256)) as url:
        for _ in range(args.repeat):
            for overlap in (False, True):
                seconds, weights[overlap] = timed_run(url, overlap, args)
                times[overlap] += seconds
    identical = all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))
    in_turn, overlapped = statistics.median(times[False]), statistics.median(times[True])
    images = args.prompts * args.group
    print(f"reward server: {args.per_image_ms:g} ms per image, {images} images per iteration in chunks of "
          f"{args.chunk * args.group} ({images * args.per_image_ms / 1000:.2f} s of scoring per iteration)")
    print(f"in turn:    {in_turn:.3f} s/iter (median of {len(times[False])})")
    print(f"overlapped: {overlapped:.3f} s/iter (median of {len(times[True])})")
    print(f"speed-up:   {in_turn / overlapped:.2f}x; weights bit-identical: {identical}")
    if args.out:
        result = {"args": vars(args), "s_per_iter": {"in_turn": times[False], "overlapped": times[True]},
                  "median": {"in_turn": in_turn, "overlapped": overlapped}, "speedup": in_turn / overlapped,
                  "weights_identical": identical, "machine": platform.platform(), "torch": torch.__version__}
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")  # never a half-written file


if __name__ == "__main__":
    main()
