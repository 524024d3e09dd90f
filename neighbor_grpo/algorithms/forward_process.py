"""Pieces the forward-process methods share (DiffusionNFT, AWM): they roll out clean samples with an ODE solver,
then train on fresh noisy versions x_s = (1 - s) x0 + s eps of those samples; no trajectories, no likelihoods.

Every random number is keyed by (seed, iteration, prompt index, candidate, role), so a run draws the same on 1 or
N processes, whatever the minibatch or micro-batch split, and after a resume.
"""

from __future__ import annotations

from typing import Sequence

import torch

from neighbor_grpo.maths.advantages import center_in_group
from neighbor_grpo.algorithms.common import Minibatch, Rollout, VelocityFn, repeat_cond
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.noise import independent_noises, keyed_generator
from neighbor_grpo.maths.solvers import integrate

ROLE_MEMBERS = 7_200_001     # which candidates go into which minibatch
ROLE_TIMES = 7_200_002       # a sample's training times
ROLE_TRAIN_NOISE = 7_200_003  # a sample's fresh noises, one per training time


@torch.no_grad()
def clean_sample_rollout(velocity: VelocityFn, cond, prompts: Sequence[str], prompt_indices: Sequence[int],
                         iteration: int, latent_shape: tuple[int, ...], device, candidates: slice | None, seed: int,
                         group_size: int, steps: int, shift: float | None, solver: str, start: float = 1.0) -> Rollout:
    """Independent initial noises per candidate, solved with an ODE solver on the (shifted) grid from flow time
    `start`. Only the first and last states are kept (the methods train from `final` only) and one velocity slot, to
    keep shapes uniform; `sigmas` is the whole grid (grid-time samplers train on it)."""
    noises = torch.stack([independent_noises(latent_shape, group_size, seed, iteration, index, device=device)
                          for index in prompt_indices])  # (P, G, *latent)
    if candidates is not None:
        noises = noises[:, candidates]
    P, g = noises.shape[:2]
    sigmas = sigma_grid(steps, shift=shift or 1.0, start=start).to(device)
    flat_cond = repeat_cond(cond, g)
    trajectory = integrate(lambda x, s: velocity(x, s, flat_cond), noises.reshape(P * g, *latent_shape), sigmas, solver)
    states = trajectory.states[[0, -1]].reshape(2, P, g, *latent_shape)
    velocities = trajectory.velocities[-1:].reshape(1, P, g, *latent_shape)
    return Rollout(list(prompts), list(prompt_indices), cond, sigmas, states, velocities)


def std_normalised_advantages(rewards: torch.Tensor, global_std: bool, eps: float) -> torch.Tensor:
    """PerPromptStatTracker: (r - mean_prompt) / (std + eps), population std of all rewards of the batch
    (global_std) or of the prompt's group."""
    std = rewards.std(correction=0) if global_std else rewards.std(dim=-1, correction=0, keepdim=True)
    return center_in_group(rewards) / (std + eps)


def member_minibatches(rollout: Rollout, num_minibatches: int, slots: int, seed: int, iteration: int) -> list[Minibatch]:
    """Every prompt's G candidates shuffled (keyed) and cut into `num_minibatches` slices (one optimizer step
    each); `steps` holds the training-time slots 0..slots-1 (the times themselves are per sample)."""
    G = rollout.group_size
    orders = torch.stack([torch.randperm(G, generator=keyed_generator(seed, iteration, index, ROLE_MEMBERS))
                          for index in rollout.prompt_indices])
    return [Minibatch(steps=list(range(slots)), members=chunk.sort(dim=1).values)
            for chunk in orders.tensor_split(num_minibatches, dim=1)]


def sample_generators(seed: int, iteration: int, prompt_indices: Sequence[int], members: torch.Tensor, role: int
                      ) -> list[list[torch.Generator]]:
    """One keyed generator per (prompt, member): the same numbers however the members are batched."""
    return [[keyed_generator(seed, iteration, index, int(m), role) for m in row]
            for index, row in zip(prompt_indices, members.tolist())]


def training_noises(shape: tuple[int, ...], count: int, seed: int, iteration: int, prompt_indices: Sequence[int],
                    members: torch.Tensor, device, per_time: bool = True) -> torch.Tensor:
    """(count, P, M, *latent) fresh eps per (sample, training time); `per_time=False`: one eps per sample."""
    rows = []
    for generators in sample_generators(seed, iteration, prompt_indices, members, ROLE_TRAIN_NOISE):
        rows.append(torch.stack([torch.randn((count if per_time else 1, *shape), generator=g) for g in generators]))
    noise = torch.stack(rows).movedim(2, 0)  # (count or 1, P, M, *latent)
    return noise.expand(count, *noise.shape[1:]).to(device)


def noised(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps, s broadcast over the latent dimensions."""
    s = s.view(*s.shape, *([1] * (x0.dim() - s.dim())))
    return (1 - s) * x0 + s * eps


def member_velocity(velocity: VelocityFn, x: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
    """v on (P, M, *latent) states at per-sample times s (P, M) with (P, ...) conditioning."""
    P, M = x.shape[:2]
    flat = velocity(x.reshape(P * M, *x.shape[2:]), s.reshape(P * M), repeat_cond(cond, M))
    return flat.reshape(x.shape)


@torch.no_grad()
def soft_update(target: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """theta_target <- decay * theta_target + (1 - decay) * theta, on the parameters the policy trains (the frozen
    base weights are the same in both)."""
    trained = {name for name, p in net.named_parameters() if p.requires_grad}
    current = dict(net.named_parameters())
    for name, p in target.named_parameters():
        if name in trained:
            p.mul_(decay).add_(current[name].detach().to(p.dtype), alpha=1 - decay)


class IterationSteps:
    """Counts the optimizer steps of the current iteration, so an update the reference makes once per epoch (after
    all its steps) runs after the last one. The global step k = iteration * steps per iteration + steps taken
    (derived from the iteration, so it is the same after a resume)."""

    def __init__(self):
        self.iteration, self.planned, self.taken = 0, 0, 0

    def plan(self, iteration: int, planned: int) -> None:
        self.iteration, self.planned, self.taken = iteration, planned, 0

    def step(self) -> int | None:
        """Record one optimizer step; the global step count k after it when it was the iteration's last, else None."""
        self.taken += 1
        return self.iteration * self.planned + self.taken if self.taken == self.planned else None
