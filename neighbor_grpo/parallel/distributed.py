"""Data-parallel training over several processes (launched by `accelerate launch` or `torchrun`): who does what,
and the few collectives the training loop needs. In one process every helper here is a no-op.

The iteration's global batch of prompt slots is split by whole groups where possible: process r takes a contiguous
block of slots (`slot_range`). With fewer prompts than processes a group spans processes (`batch_part`): each
prompt gets a contiguous block of processes, each of them a contiguous block of its G candidates, and the blocks
of the rollout are gathered so every process of the prompt holds the whole group. Slot and candidate numbers keep
keying the noises, anchors and members, so every process draws exactly the numbers a single process would.
Rewards are gathered (a few floats per candidate) so advantages and logged metrics are computed on the whole
batch; each process's loss is weighted by its share of the trained units (prompts, or a prompt's anchors/members),
so the averaged gradient is the gradient of the global mean however the batch is split.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist



@dataclass(frozen=True)
class Processes:
    """This process's place in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    """'none' (one process), 'ddp' (replicated net, gradients averaged) or 'fsdp' (sharded net, FSDP2)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


SINGLE_PROCESS = Processes()


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun and accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of the job, or the only process (before or after train() joined the process group)."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


def wanted_strategy(parallel: str) -> str:
    """speed.parallel -> 'ddp' or 'fsdp'; 'auto' follows an accelerate config with distributed_type FSDP."""
    if parallel != "auto":
        return parallel
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") else "ddp"


def check_device(device: str, field: str = "device") -> None:
    """A device this torch can use, else a ValueError naming `field` (not torch's AssertionError deep inside)."""
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{field}: expected a torch device (cpu, cuda, cuda:N, mps), got {device!r}") from None
    if wanted.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{field}: {device!r} needs CUDA, but this torch ({torch.__version__}) sees no CUDA "
                             "device; use cpu, or install a CUDA build of torch")
        if wanted.index is not None and wanted.index >= count:
            raise ValueError(f"{field}: {device!r} does not exist; this machine has {count} CUDA device(s)")
    elif wanted.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}: {device!r} is not available on this machine; use cpu")


def init_processes(device: str, parallel: str = "auto") -> tuple[Processes, torch.device]:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU) and pick this process's device:
    `cuda` becomes `cuda:LOCAL_RANK`. One process: nothing to join, the device as configured."""
    check_device(device)
    world = launched_world_size()
    if world <= 1 and not dist.is_initialized():
        return SINGLE_PROCESS, torch.device(device)
    cuda = torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # rank 0 alone runs held-out evaluation, exports and checkpoint writes while the others wait at a barrier
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))
    processes = Processes(dist.get_rank(), dist.get_world_size(), local_rank, wanted_strategy(parallel))
    return processes, torch.device(device)


def leave_process_group() -> None:
    """Destroy the default process group and the prompt groups made from it (no-op when none was joined)."""
    _PEER_GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def joins_process_group(function: Callable) -> Callable:
    """For a function that joins the launcher's process group (`init_processes`): the group it joined is destroyed
    when it returns or raises (the end, a stop, KeyboardInterrupt, an error alike), so none of gloo's or NCCL's
    threads is left to the interpreter's exit, where it can abort the process ("terminate called without an
    active exception") after the work is done. A group the caller had joined before is left to the caller."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        joined_before = dist.is_initialized()
        try:
            return function(*args, **kwargs)
        finally:
            if not joined_before:
                leave_process_group()

    return wrapper


def check_batch_fits(prompts_per_iteration: int, processes: Processes, group_size: int | None = None,
                     group_field: str = "group_size") -> None:
    """With fewer prompts than processes a group spans processes; each of them needs at least one candidate.
    Without `group_size` (a caller that cannot split groups), at least one whole group per process."""
    if prompts_per_iteration >= processes.world_size:
        return
    if group_size is None:
        raise ValueError(f"prompts_per_iteration: {prompts_per_iteration} prompts (groups) cannot be split over "
                         f"{processes.world_size} processes (each needs at least one); raise prompts_per_iteration "
                         "or launch fewer processes")
    most = -(-processes.world_size // prompts_per_iteration)  # processes of the prompt with the most
    if most > group_size:
        raise ValueError(f"prompts_per_iteration: {prompts_per_iteration} prompts x {group_field}={group_size} "
                         f"candidates cannot be split over {processes.world_size} processes (a prompt would get "
                         f"{most} processes, more than its {group_size} candidates); raise prompts_per_iteration or "
                         f"{group_field}, or launch fewer processes")


def slot_range(count: int, rank: int, world_size: int) -> range:
    """Process `rank`'s contiguous block of the `count` prompt slots; block sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class BatchPart:
    """What one process rolls out and trains of the iteration's P prompts x G candidates."""

    prompts: range
    """Its prompt slots (one when a group spans processes)."""
    candidates: range | None
    """Its contiguous block of each of those prompts' candidates; None: all G (whole groups)."""
    peers: range
    """The ranks that share its prompt, this one included (just itself with whole groups)."""
    rank: int

    @property
    def position(self) -> int:
        """Its place among the peers: which block of candidates, and of the trained members, is its own."""
        return self.rank - self.peers.start

    def candidate_share(self, count: int, group_size: int) -> float:
        """Its share of the batch's P x G candidates (images): weights its per-candidate means."""
        mine = len(self.candidates) if self.candidates is not None else group_size
        return len(self.prompts) * mine / (count * group_size)


def prompt_processes(prompt: int, count: int, world_size: int) -> range:
    """The ranks sharing prompt slot `prompt` when count < world_size: r with floor(r * count / world_size) ==
    prompt, a contiguous block of at least one."""
    return range(-(-prompt * world_size // count), -(-(prompt + 1) * world_size // count))


def batch_part(count: int, group_size: int, rank: int, world_size: int) -> BatchPart:
    """Process `rank`'s part of `count` prompts x `group_size` candidates: whole groups (`slot_range`) when there
    are at least as many prompts as processes, else one prompt and a contiguous block of its candidates (block
    sizes differ by at most one). Every (prompt, candidate) belongs to exactly one process."""
    if count >= world_size:
        return BatchPart(slot_range(count, rank, world_size), None, range(rank, rank + 1), rank)
    prompt = rank * count // world_size
    peers = prompt_processes(prompt, count, world_size)
    if len(peers) > group_size:
        raise ValueError(f"prompts_per_iteration: {count} prompts x group_size {group_size} cannot be split over "
                         f"{world_size} processes (prompt {prompt} would get {len(peers)} processes, more than its "
                         "candidates)")
    candidates = slot_range(group_size, rank - peers.start, len(peers))
    return BatchPart(range(prompt, prompt + 1), candidates, peers, rank)


def member_block(members: int, part: BatchPart) -> range:
    """The part of a prompt's `members` trained units (anchors, SDE members) this process trains: all with whole
    groups, else a contiguous block among the prompt's processes (possibly empty)."""
    return slot_range(members, part.position, len(part.peers))


# ---- collectives (identity in one process) ---------------------------------------------------------------------

def _collective_device(processes: Processes) -> torch.device:
    return torch.device("cuda", processes.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(processes: Processes) -> None:
    """Every process waits here until all have arrived (the main process's writes are then visible)."""
    if processes.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(processes: Processes) -> Iterator[None]:
    """The main process runs the block first (e.g. builds and caches the built-in models), then the others."""
    if not processes.is_main:
        barrier(processes)
    yield
    if processes.is_main:
        barrier(processes)


def any_process(flag: bool, processes: Processes) -> bool:
    """True on every process when `flag` is true on at least one (e.g. an interrupt, a failed reward)."""
    if not processes.distributed:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device(processes))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_true(flags: torch.Tensor, processes: Processes) -> list[bool]:
    """Element-wise AND of a bool vector over processes, read to the host once (the loop's only sync)."""
    if processes.distributed:
        flags = flags.float().to(_collective_device(processes))
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(v) for v in flags.tolist()]


def gather_block(local: torch.Tensor, part: BatchPart, count: int, group_size: int,
                 processes: Processes) -> torch.Tensor:
    """(len(prompts), len(candidates)) values of this process -> the (count, group_size) whole batch on every
    process (zeros elsewhere, summed: exact, and NaN anywhere reaches everyone)."""
    if not processes.distributed:
        return local
    full = torch.zeros((count, group_size, *local.shape[2:]), dtype=local.dtype, device=_collective_device(processes))
    candidates = part.candidates if part.candidates is not None else range(group_size)
    full[part.prompts.start:part.prompts.stop, candidates.start:candidates.stop] = local.to(full.device)
    dist.all_reduce(full, op=dist.ReduceOp.SUM)
    return full.to(local.device)


_PEER_GROUPS: dict[tuple[int, int, int], dict[int, object]] = {}


def _peer_group(part: BatchPart, count: int, world_size: int):
    """The process group of this process's prompt (None: it has the prompt alone). Every process creates every
    prompt's group, in the same order (dist.new_group is a collective of the whole job), once per job and count."""
    key = (id(dist.group.WORLD), count, world_size)
    if key not in _PEER_GROUPS:
        groups = {}
        for prompt in range(count):
            ranks = prompt_processes(prompt, count, world_size)
            if len(ranks) > 1:
                groups[ranks.start] = dist.new_group(list(ranks))
        _PEER_GROUPS[key] = groups
    return _PEER_GROUPS[key].get(part.peers.start)


def gather_candidates(local: torch.Tensor, part: BatchPart, count: int, group_size: int,
                      processes: Processes) -> torch.Tensor:
    """(S, 1, g, ...) with this process's block of its prompt's candidates on dim 2 -> (S, 1, G, ...), the whole
    group in candidate order, from the processes that share the prompt (only they communicate). Blocks are padded
    to the largest for all_gather; every process of the job must call this (the groups are made on first use)."""
    group = _peer_group(part, count, world_size=processes.world_size)
    if group is None:  # the prompt has this process alone
        return local
    size = len(part.peers)
    largest = -(-group_size // size)
    device = _collective_device(processes)
    padded = torch.zeros((*local.shape[:2], largest, *local.shape[3:]), dtype=local.dtype, device=device)
    padded[:, :, :local.shape[2]] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(blocks, padded, group=group)
    pieces = [block[:, :, :len(slot_range(group_size, position, size))] for position, block in enumerate(blocks)]
    return torch.cat(pieces, dim=2).to(local.device)


def sum_over_processes(values: list[float], processes: Processes) -> list[float]:
    if not processes.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(processes))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def global_means(values: dict[str, torch.Tensor], share: float, processes: Processes,
                 same_everywhere: tuple[str, ...] = ()) -> dict[str, float]:
    """Per-process means -> means over the whole batch (weighted by each process's share of the prompts), one
    collective for all keys. Keys in `same_everywhere` are maxima, or values every process already agrees on."""
    if not values:
        return {}
    names = list(values)
    device = _collective_device(processes) if processes.distributed else torch.device("cpu")
    local = torch.stack([torch.as_tensor(values[n]).detach().to(device, torch.float64).reshape(()) for n in names])
    if processes.distributed:
        maxed = torch.tensor([n in same_everywhere for n in names], device=local.device)
        weighted = torch.where(maxed.to(local.device), torch.zeros_like(local), local * share)
        highest = torch.where(maxed.to(local.device), local, torch.full_like(local, -torch.inf))
        dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        local = torch.where(maxed.to(local.device), highest, weighted)
    return dict(zip(names, local.tolist()))


def broadcast_object(value, processes: Processes):
    """The main process's `value` on every process (small picklable things: metrics, a path, a flag)."""
    if not processes.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device(processes))
    return box[0]
