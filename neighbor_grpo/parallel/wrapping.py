"""The trained net over several processes: replicated (DDP) or sharded (FSDP2), gradient synchronisation only on
the last micro-batch, and whole tensors of sharded parameters for checkpoints and exports."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from neighbor_grpo.parallel.distributed import Processes
from neighbor_grpo.models.lora import net_swapped


# ---- replicating or sharding the trained net -------------------------------------------------------------------

class ReplicatedNet(nn.parallel.DistributedDataParallel):
    """DDP that still answers attribute look-ups of the wrapped net (adapters may read e.g. `net.config`)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root, outermost first and never one inside another (sharding a module inside a unit
    again meets parameters that are DTensors already: diffusers' attention `to_out` ModuleList): the block classes
    the diffusers models in `net` declare never to be split (`_no_split_modules`: FLUX.1's and FLUX.2's
    double/single-stream blocks, Z-Image's and Qwen-Image's blocks, each Wan 2.2 expert's blocks), else every block
    of every outermost ModuleList (the built-in models)."""
    classes = {name for module in net.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    chosen: dict[str, nn.Module] = {}
    for name, module in net.named_modules():
        if any(name.startswith(unit + ".") for unit in chosen):
            continue
        if classes and type(module).__name__ in classes:
            chosen[name] = module
        elif not classes and isinstance(module, nn.ModuleList):
            chosen.update({f"{name}.{index}" if name else str(index): block for index, block in enumerate(module)})
    return list(chosen.values())


def shard_in_place(net: nn.Module) -> nn.Module:
    """FSDP2 full shard: each unit of `shard_units` (the transformer blocks), then the root. Parameters become
    DTensors sharded over the processes; the module object stays the same."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_units(net):
        fully_shard(block)
    # the root too gives its gathered weights back after each forward: a no-grad forward (held-out samples, the
    # rollout) otherwise leaves plain tensors in place of the shards until the next backward
    fully_shard(net, reshard_after_forward=True)
    return net


def parallel_net(net: nn.Module, processes: Processes) -> nn.Module:
    """The module training passes go through: DDP around `net`, or `net` itself sharded in place (FSDP)."""
    if not processes.distributed:
        return net
    if processes.sharded:
        return shard_in_place(net)
    return replicate(net, [processes.local_rank] if next(net.parameters()).is_cuda else None)


def replicate(net: nn.Module, device_ids: list[int] | None = None) -> ReplicatedNet:
    """DDP around `net`. DDP waits for a gradient of every trainable parameter in each backward unless told that
    some may go unused: a module declaring `may_leave_parameters_unused` (Wan 2.2's experts: a pass at one time
    trains one expert) turns on find_unused_parameters, which costs a graph traversal per pass."""
    unused = any(getattr(module, "may_leave_parameters_unused", False) for module in net.modules())
    # buffers are loaded identically everywhere and never trained; broadcasting them in every forward would also
    # need the same number of forwards on every process, which micro-batches of an uneven split do not have
    return ReplicatedNet(net, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=unused)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally (no all-reduce) while `enabled` is false: micro-batches before the last."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def velocity_through(adapter, module: nn.Module) -> Callable:
    """adapter.velocity evaluated through `module` (the DDP wrapper) instead of adapter.net; adapter.net itself
    stays the plain net, so saving, EMA, LoRA and the reference velocity see the usual parameter names."""
    if module is adapter.net:
        return adapter.velocity

    def velocity(x, s, cond):
        with net_swapped(adapter, module):
            return adapter.velocity(x, s, cond)

    return velocity


# ---- full tensors of sharded parameters (FSDP checkpoints and exports) ---------------------------------------

def full_tensor(value):
    """A sharded DTensor gathered whole (a collective: every process must call it); other values unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A full tensor cut like `reference` (this process's shard of a DTensor), or moved to its device."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements)
    return full.to(device=reference.device, dtype=reference.dtype)
