"""Convert downloaded reward checkpoints to safetensors once, offline:

    python -m neighbor_grpo.rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth aesthetic-head.safetensors
    python -m neighbor_grpo.rewards.convert hpsv2 HPS_v2.1_compressed.pt hpsv2.1.safetensors
    python -m neighbor_grpo.rewards.convert image_reward ImageReward.pt image-reward.safetensors

Pickled inputs are read with torch.load(weights_only=True) only, which refuses anything but tensors and plain
containers."""

from __future__ import annotations

import argparse
import sys


def converters() -> dict:
    from neighbor_grpo.rewards.aesthetic import convert_aesthetic_head
    from neighbor_grpo.rewards.hpsv2 import convert_hpsv2_checkpoint
    from neighbor_grpo.rewards.image_reward import convert_image_reward_checkpoint

    return {"aesthetic": convert_aesthetic_head, "hpsv2": convert_hpsv2_checkpoint,
            "image_reward": convert_image_reward_checkpoint}


def main(argv: list[str] | None = None) -> int:
    table = converters()
    parser = argparse.ArgumentParser(prog="python -m neighbor_grpo.rewards.convert", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(table))
    parser.add_argument("source", help="the downloaded checkpoint (.pt/.pth or .safetensors)")
    parser.add_argument("target", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not args.target.endswith(".safetensors"):
        parser.error("target must end in .safetensors")
    table[args.kind](args.source, args.target)
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
