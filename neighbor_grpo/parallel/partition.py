"""The distributed partition of an iteration's groups, beside the collectives in `distributed`: which candidates
and trained members each process owns, and how per-process values become the whole batch's."""

from __future__ import annotations

import dataclasses

import torch

from neighbor_grpo.parallel.distributed import BatchPart, Processes, gather_candidates, global_means, member_block

# Stats that are maxima, or that every process already agrees on (the gradient norm is taken after averaging).
MAX_OR_SHARED_STATS = ("ratio_max_dev", "grad_norm", "grad_clipped_share")


def whole_group(rollout, part: BatchPart, count: int, group_size: int, processes: Processes):
    """This process's block of its prompt's rollout -> the whole group's (states of every step, velocities,
    log-probs), gathered from the processes sharing the prompt; every process must call it."""
    gather = lambda value: gather_candidates(value, part, count, group_size, processes)
    return rollout._replace(states=gather(rollout.states), velocities=gather(rollout.velocities),
                            log_probs=None if rollout.log_probs is None else gather(rollout.log_probs))


def own_members(batch, part: BatchPart, count: int):
    """(the minibatch this process trains, its share of the minibatch's trained units). Whole groups: all members
    of its prompts. A shared prompt: its block of the prompt's members; a process left without any trains the
    first one with share 0 (weight 0), so it makes the same forward/backward passes as the others (DDP/FSDP)."""
    members = batch.members.shape[1]
    if part.candidates is None:
        return batch, len(part.prompts) * members / (count * members)
    block = member_block(members, part)
    if not len(block):
        return dataclasses.replace(batch, members=batch.members[:, :1]), 0.0
    return dataclasses.replace(batch, members=batch.members[:, block.start:block.stop]), len(block) / (count * members)


def global_step_means(records: list[dict], shares: list[float], processes: Processes) -> dict[str, float]:
    """The logged per-step values as means over the steps of the whole batch's values. Each record holds means
    over this process's units, weighted by its share of the step's units (constant with whole groups; with shared
    prompts the member blocks, and so the shares, can differ between minibatches)."""
    if len(set(shares)) == 1:
        return global_means(mean_over_steps(records), shares[0], processes, same_everywhere=MAX_OR_SHARED_STATS)
    weighted = [{key: value if key in MAX_OR_SHARED_STATS else value * share for key, value in record.items()}
                for record, share in zip(records, shares)]
    return global_means(mean_over_steps(weighted), 1.0, processes, same_everywhere=MAX_OR_SHARED_STATS)


def mean_over_steps(records: list[dict]) -> dict[str, torch.Tensor]:
    """Each logged value's mean over the optimizer steps; tensors stay on their device (no sync here)."""
    means = {}
    for key in records[0]:
        column = [record[key] for record in records]
        if isinstance(column[0], torch.Tensor):
            means[key] = torch.stack(column).double().mean()
        else:
            means[key] = torch.tensor(sum(column) / len(column), dtype=torch.float64)
    return means
