"""One real CPU training iteration with its FLOPs counted per (network, grad) group and its peak live bytes
measured by torch.profiler: what the planner's predictions are checked against."""

from __future__ import annotations

import contextlib

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from neighbor_grpo.plan.attention_flops import cpu_attention_flops
from neighbor_grpo.plan.live_bytes import decompose_like_flop_counter
from neighbor_grpo.training.parts import read_prompts
from neighbor_grpo.training.trainer import build_training_parts, train_iteration


class PhaseFlops(TorchDispatchMode):
    """FlopCounterMode's formulas (its registry, CPU attention registered), summed under the current label."""

    def __init__(self):
        super().__init__()
        self.label = "other"
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        decomposed = decompose_like_flop_counter(self, func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        out = func(*args, **(kwargs or {}))
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.label] = self.flops.get(self.label, 0) + formula(*args, **(kwargs or {}), out_val=out)
        return out

    @contextlib.contextmanager
    def labelled(self, label: str):
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def wrap(self, fn, label):
        def wrapped(*args, **kwargs):
            with self.labelled(label if isinstance(label, str) else label()):
                return fn(*args, **kwargs)
        return wrapped


def counted_iteration(config, adapter, rewards, monkeypatch, iterations: int = 1) -> dict[str, int]:
    """FLOPs of the last of `iterations` real iterations by group: ('policy', False) rollout and old-policy
    passes, ('policy', True) with-grad passes and their backward, ('reference', False), 'decode', 'other'."""
    parts = build_training_parts(config, adapter)
    counter = PhaseFlops()
    state = {"after_rollout": False}
    no_grad = lambda: "policy/old" if state["after_rollout"] else "policy/rollout"  # noqa: E731
    parts.velocity = counter.wrap(parts.velocity, no_grad)
    parts.train_velocity = counter.wrap(parts.train_velocity, "policy/grad")
    parts.reference_velocity = counter.wrap(parts.reference_velocity, "reference")
    monkeypatch.setattr(adapter, "decode", counter.wrap(adapter.decode, "decode"))
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: counter.wrap(backward, "policy/grad")(self, *a, **k))

    def hook(point):
        if point == "after_rollout":
            state["after_rollout"] = True

    for iteration in range(iterations):
        counter.flops, state["after_rollout"] = {}, False
        with cpu_attention_flops(True), counter:
            train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer, parts.params, parts.ema,
                            parts.reference_velocity, read_prompts(config), iteration, hook, parts=parts)
    return counter.flops


def planned_groups(result: dict) -> dict[str, float]:
    """The planner's per-phase FLOPs in the same groups."""
    groups: dict[str, float] = {}
    grads = {p["name"]: p["grad"] for p in result["phases"]}
    networks = {p["name"]: p["network"] for p in result["phases"]}
    for name, flops in result["flops_per_gpu"].items():
        if name in ("decode", "reward"):
            key = name
        elif networks[name] == "reference":
            key = "reference"
        elif grads[name]:
            key = "policy/grad"
        else:
            key = "policy/rollout" if name == "rollout" else "policy/old"
        groups[key] = groups.get(key, 0.0) + flops
    return groups
