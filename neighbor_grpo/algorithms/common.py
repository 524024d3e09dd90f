"""Containers and helpers every algorithm shares (no class hierarchy: each algorithm is its own module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # v(x, s, cond)


class Rollout(NamedTuple):
    prompts: list[str]        # P prompts
    prompt_indices: list[int]  # P positions in the prompt set (keys for the random numbers)
    cond: torch.Tensor        # (P, ...) conditioning, one per prompt
    sigmas: torch.Tensor      # (N+1,) flow times s_0 = 1 > ... > s_N = 0
    states: torch.Tensor      # (N+1, P, G, *latent) x_0 .. x_N of every candidate
    velocities: torch.Tensor  # (N, P, G, *latent) old-policy velocity at each stored state
    log_probs: torch.Tensor | None = None  # (N, P, G) SDE baselines: log-prob of each step under the old policy
    sde_mask: torch.Tensor | None = None   # (N,) bool, SDE baselines: which steps were stochastic

    @property
    def final(self) -> torch.Tensor:
        """(P, G, *latent) the samples."""
        return self.states[-1]

    @property
    def group_size(self) -> int:
        return self.states.shape[2]


@dataclass(frozen=True)
class Phase:
    """One kind of velocity-net call an iteration makes, declared by each algorithm's `call_schedule(prompts)`:
    what the planner traces (at `batch`) and composes, and what the forward-equivalent counter must measure."""

    name: str      # "rollout", "train", "reference", "old_policy", "ema", ...
    samples: int   # per-sample net evaluations of this phase in one iteration of `prompts` prompts
    batch: int     # samples per call: the shape to trace at
    grad: bool     # a with-grad forward (followed by its backward) or a no-grad one
    network: str   # "policy", "reference", or a name from the algorithm's `networks`
    # with-grad: calls whose saved activations are alive together before one backward (a loss summed over the
    # minibatch's steps or training times, then backpropagated once): the planner holds that many at the peak
    held: int = 1


# ---- call schedules: what every algorithm's `call_schedule` is built from ---------------------------------------
# `samples` counts per sample the algorithm asks for; an adapter that batches more through the net (SD3's
# classifier-free guidance: 2 per sample) multiplies them itself. A schedule is one process's: `prompts` are the
# prompts (groups) that process rolls out and trains (a group split over processes, with fewer prompts than
# processes, is not expressed). `rollout_chunk` and `micro_batch` are the trainer's
# `speed.rollout_chunk` and `speed.micro_batch` (iteration.train_iteration and accumulate_gradients), which cut
# the rollout and each loss/backward pass into calls of at most that many prompts; `batch` is the largest call.

def per_call(prompts: int, limit: int | None) -> int:
    """Prompts one call sees: all `prompts`, or at most `limit` (speed.rollout_chunk or speed.micro_batch)."""
    return prompts if not limit else min(limit, prompts)


def solver_evaluations(solver: str, steps: int) -> int:
    """Velocity evaluations of one ODE solve of `steps` steps into s = 0 (solvers.py): one per step for Euler and
    DPM-Solver++(2M); Heun's two per step, less the one it skips on the last step into s = 0."""
    if steps < 1:
        raise ValueError(f"rollout_steps must be >= 1 for a call schedule; got {steps}")
    if solver in ("euler", "dpm++2m"):
        return steps
    if solver == "heun":
        return 2 * steps - 1
    raise ValueError(f"rollout_solver: no call schedule for solver {solver!r}; expected euler, heun or dpm++2m")


def rollout_phase(prompts: int, group_size: int, evaluations: int, rollout_chunk: int | None,
                  network: str = "policy") -> Phase:
    """The rollout: every candidate through `evaluations` no-grad calls, a chunk of whole groups per call."""
    return Phase("rollout", prompts * group_size * evaluations, per_call(prompts, rollout_chunk) * group_size, False,
                 network)


def members_per_minibatch(group_size: int, num_minibatches: int) -> int:
    """The most candidates of a group in one minibatch (torch.tensor_split puts the remainder first)."""
    return -(-group_size // max(1, num_minibatches))


@dataclass
class Minibatch:
    """One optimizer step's share of the trained (prompt, candidate, step) units."""

    steps: list[int]                     # trained step indices j
    members: torch.Tensor                # (P, M) candidate indices per prompt (anchors for Neighbor GRPO)


@dataclass
class LossStats:
    values: dict[str, float] = field(default_factory=dict)


def repeat_cond(cond: torch.Tensor, times: int) -> torch.Tensor:
    """(P, ...) -> (P * times, ...), each prompt's conditioning repeated for its candidates."""
    return cond.repeat_interleave(times, dim=0)


def batched_velocity(velocity: VelocityFn, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Evaluate v on (P, M, *latent) states with (P, ...) conditioning; returns the same shape as x."""
    P, M = x.shape[:2]
    flat = velocity(x.reshape(P * M, *x.shape[2:]), s, repeat_cond(cond, M))
    return flat.reshape(x.shape)


def pick_steps(num_steps: int, count: int, selection: str, generator: torch.Generator) -> list[int]:
    """Which of the N steps to train on: a random subset, the first, the last, or all."""
    count = max(1, min(count, num_steps))
    if selection == "all" or count == num_steps:
        return list(range(num_steps))
    if selection == "random":
        return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())
    if selection == "first":
        return list(range(count))
    if selection == "last":
        return list(range(num_steps - count, num_steps))
    raise ValueError(f"step_selection must be one of random, first, last, all; got {selection!r}")


def gather_members(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """x (P, G, *latent), members (P, M) -> (P, M, *latent)."""
    index = members.view(*members.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index.to(x.device))


def gather_groups(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """values (P, G), members (P, M) -> (P, M)."""
    return torch.gather(values, 1, members.to(values.device))
