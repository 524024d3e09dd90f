"""Training cost in forward-pass equivalents, defined once (trainer counters, `ngrpo compare`, throughput.py), the
forwards an algorithm's call schedule implies (each algorithm's `call_schedule`), and the FLOPs of one
velocity-net forward.

A forward-equivalent is one per-sample forward pass of the velocity net. A with-grad forward is followed by its
backward: a full fine-tune's backward computes gradients of the inputs and of the weights (about 2 forwards), a
LoRA backward only those of the inputs through the frozen weights (about 1 forward; the adapters are tiny). The
count is per sample the net sees, so with classifier-free guidance each half of the doubled batch counts.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.algorithms.common import Phase, repeat_cond
from neighbor_grpo.models import sample_latent_shape

BACKWARD_FACTORS = {"full": 2.0, "lora": 1.0}


def backward_factor(finetune: str) -> float:
    """b: forward-equivalents of one backward pass, 2 for a full fine-tune and 1 for LoRA."""
    if finetune not in BACKWARD_FACTORS:
        raise ValueError(f"finetune: expected one of {sorted(BACKWARD_FACTORS)}, got {finetune!r}")
    return BACKWARD_FACTORS[finetune]


def forward_equivalents(no_grad: float, with_grad: float, finetune: str) -> float:
    """no-grad forwards + (1 + b) x with-grad forwards."""
    if no_grad < 0 or with_grad < 0:
        raise ValueError(f"forward counts must be >= 0, got no_grad={no_grad}, with_grad={with_grad}")
    return no_grad + (1.0 + backward_factor(finetune)) * with_grad


def cost_note(finetune: str) -> str:
    """The line every table prints under its forward-equivalent columns."""
    return (f"forward-equivalents = no-grad forwards + (1 + b) x with-grad forwards, b = {backward_factor(finetune):g} "
            f"({finetune} fine-tune), per sample the net sees")


class CountedReference:
    """Wraps the reference velocity to count its per-sample forwards. With LoRA the reference is the trained net
    with its adapters off, which the call counter also sees: `hooked` keeps that share to avoid counting twice."""

    def __init__(self, reference_velocity, counter):
        self.reference_velocity, self.counter = reference_velocity, counter
        self.samples = self.hooked = 0
        self.net_samples_per_sample = 1.0  # > 1 where the adapter batches more through the net (SD3's CFG: 2)

    def __call__(self, x, s, cond):
        before = self.counter.no_grad
        v = self.reference_velocity(x, s, cond)
        hooked = self.counter.no_grad - before
        self.samples += hooked or round(int(x.shape[0]) * self.net_samples_per_sample)
        self.hooked += hooked
        return v

    def reset(self) -> tuple[int, int]:
        counts = (self.samples, self.hooked)
        self.samples = self.hooked = 0
        return counts


def config_schedule(config, prompts: int | None = None, iteration: int = 0) -> list[Phase]:
    """The velocity-net calls one iteration of `config` makes (its algorithm's `call_schedule`), with the trainer's
    rollout chunks and micro-batches, for `prompts` prompts on one process (default: prompts_per_iteration)."""
    algorithm = ALGORITHMS[config.algorithm](config.algorithm_config, seed=config.seed)
    return algorithm.call_schedule(config.prompts_per_iteration if prompts is None else prompts,
                                   rollout_chunk=config.speed.rollout_chunk, micro_batch=config.speed.micro_batch,
                                   iteration=iteration)


def schedule_forward_counts(schedule: list[Phase]) -> dict[str, int]:
    """Per-sample forwards of a schedule in the throughput benchmark's four kinds: the rollout, the with-grad
    (trained) forwards, the reference's, and every other no-grad forward (old policy, an EMA copy)."""
    counts = {"rollout": 0, "train": 0, "reference": 0, "other": 0}
    for phase in schedule:
        kind = ("train" if phase.grad else "rollout" if phase.name == "rollout"
                else "reference" if phase.network == "reference" else "other")
        counts[kind] += phase.samples
    return counts


def schedule_forward_equivalents(schedule: list[Phase], finetune: str) -> float:
    """Forward-equivalents of one iteration from its call schedule (as the counters measure them)."""
    return forward_equivalents(sum(p.samples for p in schedule if not p.grad), sum(p.samples for p in schedule if p.grad),
                               finetune)


def count_forward_flops(adapter, velocity, calls, prompts: list[str], group_size: int) -> dict:
    """FLOPs of one velocity-net forward at the rollout batch shape (P*G samples) and per sample the net saw (CFG
    doubles what the net sees), through the trainer's velocity (mixed precision as configured); plus, at one
    sample, a measured forward+backward: a check on the 2x / 1x backward rule."""
    cond = adapter.encode_prompts(prompts)
    device = adapter.device
    x = torch.randn(len(prompts) * group_size, *sample_latent_shape(adapter, prompts), device=device)
    s = torch.tensor(0.5, device=device)
    eager = getattr(torch.compiler, "set_stance", None)  # count the eager graph when speed.compile is on
    with eager("force_eager") if eager else contextlib.nullcontext():
        calls.reset()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            velocity(x, s, repeat_cond(cond, group_size))
        total, seen = counter.get_total_flops(), calls.reset()[0]
        with FlopCounterMode(display=False) as counter:
            v = velocity(x[:1], s, cond[:1])
            forward_one = counter.get_total_flops()
            v.float().square().mean().backward()
        both_one = counter.get_total_flops()
    calls.reset()
    adapter.net.zero_grad(set_to_none=True)
    return {"batch": int(x.shape[0]), "net_samples_at_batch": seen, "forward_at_batch": int(total),
            "forward_per_sample": total / seen,
            "measured_backward_over_forward": (both_one - forward_one) / forward_one if forward_one else None}
