"""The training state at an iteration boundary, and its save/load as a checkpoint.

A checkpoint holds everything needed to continue a run exactly: the trainable weights, the optimizer, the EMA,
every RNG, the counters, the held-out metrics, the inputs it was made from (the config and the SHA-256 of its input
files: the config's fingerprint a resume compares), and `algorithm_state` (the networks an algorithm owns besides
the trained weights, e.g. an old policy kept by soft update). The weights, optimizer, EMA and algorithm networks are
read from the live training parts when the state is saved; the rest is the snapshot taken at the boundary.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neighbor_grpo.runs.checkpoint import (capture_rng, optimizer_from_tensors, optimizer_to_tensors, read_checkpoint,
                                      restore_rng, write_checkpoint)
from neighbor_grpo.parallel.distributed import Processes
from neighbor_grpo.parallel.wrapping import full_tensor, shard_like
from neighbor_grpo.training.parts import TrainingParts


def new_counters() -> dict:
    return {"nonfinite_in_row": 0, "nonfinite_total": 0, "best_heldout": -math.inf, "best_iteration": None,
            "model_evals": 0, "idle_updates": 0}


@dataclass
class TrainingState:
    """A run after `iteration` iterations: what a checkpoint holds besides the live weights and optimizer."""

    iteration: int = 0
    counters: dict = field(default_factory=new_counters)
    """Non-finite updates (in a row, in all), the best held-out reward and its iteration, forward-equivalents."""
    heldout: dict = field(default_factory=dict)
    """The latest held-out metrics."""
    rng: tuple | None = None
    """capture_rng() at the boundary: (tensors, plain)."""
    inputs: dict | None = None
    """resume.input_fingerprint: the fingerprint of the run's inputs, the whole config and the SHA-256 of every input
    file (what a resume compares)."""

    def at_boundary(self, iteration: int, counters: dict, heldout: dict) -> "TrainingState":
        """A snapshot of the live counters and metrics and of every RNG after `iteration` iterations."""
        return TrainingState(iteration, copy.deepcopy(counters), dict(heldout), capture_rng(), self.inputs)


def json_safe(value):
    """Non-finite floats become None, so checkpoints hold standard JSON (no Infinity/NaN tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _counters_from_json(saved: dict) -> dict:
    counters = {**new_counters(), **saved}
    if counters["best_heldout"] is None:
        counters["best_heldout"] = -math.inf
    return counters


def trainable_names(net: torch.nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def algorithm_tensors(parts: TrainingParts, names: set[str]) -> dict[str, torch.Tensor]:
    """The algorithm's networks as one flat dict: only the entries the policy trains (the rest are the frozen base
    weights, identical in every copy), keyed 'network/parameter'."""
    return {f"{key}/{n}": full_tensor(p) for key, net in parts.algorithm_nets.items()
            for n, p in net.named_parameters() if n in names}


def full_optimizer_state(optimizer: torch.optim.Optimizer, processes: Processes) -> dict:
    """The optimizer state with sharded (FSDP) moments gathered whole: checkpoints look the same on 1 or N processes."""
    state = optimizer.state_dict()
    if processes.sharded:
        state["state"] = {i: {k: full_tensor(v) for k, v in slots.items()} for i, slots in state["state"].items()}
    return state


def optimizer_state_like(state: dict, params: list) -> dict:
    """A checkpoint's full optimizer moments cut into this process's shards (FSDP); unchanged otherwise."""
    for index, slots in state["state"].items():
        param = params[int(index)]
        for key, value in slots.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape) and value.dim() > 0:
                slots[key] = shard_like(value, param)
    return state


def save_state(folder: Path, state: TrainingState, net: torch.nn.Module, parts: TrainingParts, fault_hook=None) -> None:
    """Write the state and the live weights/optimizer/EMA/algorithm networks as checkpoints/iter-N. Every process
    calls it (FSDP gathers the shards); the main process writes."""
    processes = parts.processes
    if not (processes.is_main or processes.sharded):
        return
    names = trainable_names(net)
    trainable = {n: full_tensor(p) for n, p in net.named_parameters() if p.requires_grad}
    opt_tensors, opt_plain = optimizer_to_tensors(full_optimizer_state(parts.optimizer, processes))
    ema_shadow = {k: full_tensor(v) for k, v in parts.ema.shadow.items()} if parts.ema is not None else None
    algorithm = algorithm_tensors(parts, names)
    if not processes.is_main:
        return
    rng_tensors, rng_plain = state.rng
    tensors = {"model": trainable, "optimizer": opt_tensors, "rng": rng_tensors}
    if ema_shadow is not None:
        tensors["ema"] = ema_shadow
    if algorithm:
        tensors["algorithm"] = algorithm
    plain = {"iteration": state.iteration, "counters": json_safe(state.counters), "heldout": json_safe(state.heldout),
             "optimizer": opt_plain, "rng": rng_plain,
             "algorithm_state": sorted(parts.algorithm_nets), "inputs": state.inputs}
    write_checkpoint(folder, state.iteration, tensors, plain, fault_hook=fault_hook)


def load_trainable(net: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    current = {n: p for n, p in net.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    wrong = sorted(n for n in set(current) & set(saved) if tuple(current[n].shape) != tuple(saved[n].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model being trained (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); was model.path or the finetune "
                         "mode changed since the run started?")
    with torch.no_grad():
        for name, param in current.items():
            param.copy_(shard_like(saved[name], param))  # FSDP: this process's shard of the saved full tensor


def _load_algorithm_nets(parts: TrainingParts, saved: dict[str, torch.Tensor], names: set[str], path: Path) -> None:
    for key, net in parts.algorithm_nets.items():
        entries = {n: saved.get(f"{key}/{n}") for n in names}
        if any(value is None for value in entries.values()):
            raise ValueError(f"checkpoint {str(path)!r} holds no state for the algorithm's network {key!r}; was the "
                             "algorithm changed since the run started?")
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in entries:
                    p.copy_(shard_like(entries[n], p))


def load_state(path: Path, net: torch.nn.Module, parts: TrainingParts, lr: float | None = None) -> TrainingState:
    """Load checkpoint `path` into the live net, optimizer, EMA and algorithm networks, restore every RNG, and
    return the boundary state it was taken at. `lr` (the config's, possibly an accepted change) replaces the
    learning rate the optimizer state carries."""
    tensors, plain = read_checkpoint(path)
    load_trainable(net, tensors["model"], path)
    try:
        parts.optimizer.load_state_dict(optimizer_state_like(
            optimizer_from_tensors(tensors["optimizer"], plain["optimizer"]), parts.params))
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"checkpoint {str(path)!r}: its optimizer state does not fit this model ({error})") from error
    for group in parts.optimizer.param_groups if lr is not None else ():
        group["lr"] = lr
    if parts.ema is not None:
        if "ema" not in tensors:
            raise ValueError(f"checkpoint {str(path)!r} holds no EMA weights but optim.ema_decay > 0")
        parts.ema.shadow = {k: shard_like(v, parts.ema.shadow[k]) for k, v in tensors["ema"].items()}
    if parts.algorithm_nets:
        _load_algorithm_nets(parts, tensors.get("algorithm", {}), trainable_names(net), path)
    restore_rng(tensors["rng"], plain["rng"])
    return TrainingState(plain["iteration"], _counters_from_json(plain["counters"]), plain.get("heldout") or {},
                         None, plain.get("inputs"))
