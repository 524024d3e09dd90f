"""Reward models in a plan: documented estimates (their weights are not shipped, and their architectures depend on
the checkpoint a user points `kwargs.path` at). Per image: FLOPs of the image tower, about 2 x its parameters x
its tokens (224 px, patch 14: 257 tokens; BLIP at 384 px: 577), and the weights in the reward's dtype (float32
unless `kwargs.dtype` says otherwise). Small next to the velocity net (a PickScore image is ~0.33 TFLOP, one FLUX.1
forward at 512 px ~21 TFLOP)."""

from __future__ import annotations

from dataclasses import dataclass

# name -> (total parameters, image-tower parameters, image tokens), from the public model cards
ESTIMATES = {
    "pickscore": (986e6, 632e6, 257),     # CLIP ViT-H/14 (yuvalkirstain/PickScore_v1)
    "hpsv2": (986e6, 632e6, 257),         # CLIP ViT-H/14 (HPSv2)
    "clip_score": (428e6, 304e6, 257),    # CLIP ViT-L/14
    "aesthetic": (428e6, 304e6, 257),     # CLIP ViT-L/14 + a small MLP head
    "image_reward": (447e6, 304e6, 577),  # BLIP ViT-L at 384 px + its text tower
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class RewardEstimate:
    name: str
    weight_bytes: int
    flops_per_image: float
    activation_bytes: int = 0  # not modelled: small next to the decoded images the phase already counts
    known: bool = True


def reward_estimate(name: str, kwargs: dict) -> RewardEstimate:
    """The estimate for a reward; the built-in ones (digit_prob, digit_gold, jpeg_compressibility), rewards served
    elsewhere (`remote`, a `vlm_judge` endpoint: no weights here) and unknown rewards count 0 (unknown: `known`
    False, and the plan says so); `pairwise_win_rate` costs what its comparator costs."""
    if name == "pairwise_win_rate" and isinstance(kwargs.get("comparator"), dict):
        comparator = kwargs["comparator"]
        inner = reward_estimate(str(comparator.get("name")), comparator.get("kwargs") or {})
        return RewardEstimate(name, inner.weight_bytes, inner.flops_per_image, known=inner.known)
    if name == "remote" or (name == "vlm_judge" and kwargs.get("base_url")):
        return RewardEstimate(name, 0, 0.0)
    if name not in ESTIMATES:
        return RewardEstimate(name, 0, 0.0, known=name in ("digit_prob", "digit_gold", "jpeg_compressibility"))
    total, image_tower, tokens = ESTIMATES[name]
    nbytes = BYTES.get(str(kwargs.get("dtype", "float32")), 4)
    return RewardEstimate(name, int(total * nbytes), 2.0 * image_tower * tokens)
