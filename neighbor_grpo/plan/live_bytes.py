"""Peak memory without memory: a model built on `meta` is made fake (shapes, dtypes and devices, no storage), and
a dispatch mode adds up the bytes of every tensor storage created while it is active, for as long as the storage
lives. Under FakeTensorMode it replays exactly the allocations a real run makes (docs/planning.md).

Order matters (torch 2.13): peft's get_peft_model fails under FakeTensorMode ("Couldn't swap Linear.weight"), and
so does `to_empty` on meta tensors created inside the mode; build and add LoRA on meta outside, then `to_fake`.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def fake_mode() -> FakeTensorMode:
    """The mode every trace of one plan shares (`to_empty` reads the meta parameters, hence non-fake inputs)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(model: torch.nn.Module, mode: FakeTensorMode, device: str = "cpu") -> torch.nn.Module:
    """A meta-device model (LoRA already applied) with fake parameters and buffers on `device`."""
    if any(not t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("to_fake: expected a model built on the meta device (every parameter and buffer is_meta)")
    with mode:
        return model.to_empty(device=device)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


def decompose_like_flop_counter(mode, func, args, kwargs):
    """What FlopCounterMode does first: a composite op that reaches the mode whole (matmul, linear under
    torch.inference_mode, which skips the autograd keys that decompose them) runs as its decomposition, inside the
    mode, so its matmuls are counted; NotImplemented when the op has none."""
    if isinstance(func, torch._ops.HigherOrderOperator) or func is torch.ops.prim.device.default:
        return NotImplemented
    with mode:
        return func.decompose(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """FLOPs (as FlopCounterMode counts them) and live and peak bytes of the storages created while active, on top of `baseline` (what already exists: the
    parameters, say). A storage counts once from its first appearance as an op's output until it is freed.
    `existing` tensors (the weights, the inputs) are never counted: an op's output can be a view of one of them
    (`aten.t` of a weight inside `linear`), which is not a new allocation."""

    def __init__(self, baseline: int = 0, existing=()):
        super().__init__()
        self.live = self.peak = baseline
        self.flops = 0  # FlopCounterMode's formulas (its registry), counted here: FlopCounterMode's own module
        # tracker keeps the tensors of checkpointed blocks alive under fake tensors, which would inflate the peak
        self._alive: dict[int, weakref.ref] = {}
        self._existing = {id(t.untyped_storage()): t for t in existing}  # kept alive: their ids stay theirs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        decomposed = decompose_like_flop_counter(self, func, args, kwargs)
        if decomposed is not NotImplemented:
            return decomposed
        out = func(*args, **(kwargs or {}))
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._alive or key in self._existing:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._alive[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.pop(key, None)
