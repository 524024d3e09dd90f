"""The SDE-based GRPO baselines' shared pieces: their SDE steps, the Gaussian log-probability of a step, the
rollout that mixes SDE and ODE steps, and the PPO-clipped per-sample loss.

Each step function returns `(x_next, mean, std)`: `std` is the standard deviation of the Gaussian transition
`x_next ~ N(mean, std^2 I)` (for Flow-GRPO that is its noise scale times sqrt(-dt)). `x_next = mean + std * z` with
`z` given, or drawn from `generator`; every `*_mean_std` function gives the same (mean, std) without sampling, for
re-scoring a stored transition in the loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import torch

from neighbor_grpo.algorithms.common import (Minibatch, Phase, Rollout, VelocityFn, batched_velocity, gather_groups,
                                             gather_members, members_per_minibatch, per_call, repeat_cond,
                                             rollout_phase)
from neighbor_grpo.maths.flow import full_precision, predict_x0
from neighbor_grpo.maths.noise import independent_noises, keyed_generator

ROLE_SDE_NOISE = 7_100_001   # candidate stream of the per-step SDE noises
ROLE_GROUP_NOISE = 7_100_002  # candidate slot of the one initial noise a group shares (DanceGRPO, MixGRPO)
ROLE_TRAIN_STEPS = 7_100_003  # which SDE steps are trained (drawn once per rollout batch)
ROLE_MEMBERS = 7_100_004      # which candidates go into which minibatch
ROLE_WINDOW = 7_100_005       # Flow-GRPO-Fast's window position


class SDEStep(NamedTuple):
    x_next: torch.Tensor
    mean: torch.Tensor
    std: float


def _sample(mean: torch.Tensor, std: float, noise: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """x_next = mean + std * z, z given or drawn from the generator (never from the global stream)."""
    if noise is None:
        if generator is None:
            raise ValueError("pass the step noise z or a keyed generator")
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
    return mean + std * noise.to(mean.dtype)  # std * z in the mean's (float32) precision, not a bf16 z's


# ---- Flow-GRPO (Liu et al. 2025, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, sde_type 'sde') -----------

def flow_grpo_noise_scale(s: float, noise_level: float, s_1: float | None = None) -> float:
    """Flow-GRPO's sigma_t = noise_level * sqrt(s / (1 - s)); at s = 1 the reference puts s_1 (its `sigma_max`,
    the grid's second entry) in the denominator only, so the first step stays finite."""
    if s >= 1:
        if s_1 is None:
            raise ValueError("Flow-GRPO's step from s = 1 needs s_1, the grid's second flow time")
        return noise_level * math.sqrt(s / (1 - s_1))
    return noise_level * math.sqrt(s / (1 - s))


def flow_grpo_mean_std(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, noise_level: float = 0.7,
                       s_1: float | None = None) -> tuple[torch.Tensor, float]:
    """Flow-GRPO: mean = x (1 + sigma_t^2 dt / 2s) + v (1 + sigma_t^2 (1 - s) / 2s) dt, std = sigma_t sqrt(-dt)."""
    dt = s_next - s
    sigma_t = flow_grpo_noise_scale(s, noise_level, s_1)
    x, v = full_precision(x), full_precision(v)
    mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * ((1 + sigma_t**2 * (1 - s) / (2 * s)) * dt)
    return mean, sigma_t * math.sqrt(-dt)


def flow_grpo_sde_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, noise_level: float = 0.7,
                       s_1: float | None = None) -> SDEStep:
    """Flow-GRPO's SDE step (Liu et al. 2025, Eq. 12 as in sd3_sde_with_logprob.py)."""
    mean, std = flow_grpo_mean_std(x, v, s, s_next, noise_level, s_1)
    return SDEStep(_sample(mean, std, noise, generator).to(x.dtype), mean, std)


# ---- DanceGRPO (Xue et al. 2025, fastvideo/train_grpo_flux.py, flux_step with sde_solver=True) -----------------

def dance_grpo_mean_std(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, eta: float = 0.3
                        ) -> tuple[torch.Tensor, float]:
    """DanceGRPO: Euler mean plus -eta^2/2 * score * ds, score = -(x - (1 - s) x0hat) / s^2; std = eta sqrt(s - s_next)."""
    ds = s_next - s
    x, v = full_precision(x), full_precision(v)
    x0 = predict_x0(x, v, s)
    score = -(x - (1 - s) * x0) / s**2
    mean = x + ds * v + (-0.5 * eta**2 * ds) * score
    return mean, eta * math.sqrt(s - s_next)


def dance_grpo_sde_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, eta: float = 0.3) -> SDEStep:
    """DanceGRPO's SDE step (Xue et al. 2025, flux_step)."""
    mean, std = dance_grpo_mean_std(x, v, s, s_next, eta)
    return SDEStep(_sample(mean, std, noise, generator).to(x.dtype), mean, std)


# ---- CPS (Wang & Yu 2025, flow_grpo sd3_sde_with_logprob.py, sde_type 'cps'; spec competitors.md 3.1) ----------

def cps_noise_std(s_next: float, eta: float) -> float:
    """CPS's injected noise std sigma_j = s' sin(eta pi / 2): 0 at eta 0 (Euler) and at s' = 0, s' at eta 1."""
    return s_next * math.sin(eta * math.pi / 2)


def cps_mean_std(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, eta: float = 0.8
                 ) -> tuple[torch.Tensor, float]:
    """mean = (1 - s') x0hat + sqrt(s'^2 - sigma^2) epshat, x0hat = x - s v, epshat = x + (1 - s) v: the data
    coefficient 1 - s' and the total noise std sqrt(s'^2 - sigma^2 + sigma^2) = s' of the forward marginal."""
    sigma = cps_noise_std(s_next, eta)
    x, v = full_precision(x), full_precision(v)
    x0hat, epshat = x - s * v, x + (1 - s) * v
    # max(.., 0): s'^2 - (s' sin)^2 can round a hair below 0 at eta 1
    mean = (1 - s_next) * x0hat + math.sqrt(max(s_next**2 - sigma**2, 0.0)) * epshat
    return mean, sigma


def cps_sde_step(x: torch.Tensor, v: torch.Tensor, s: float, s_next: float, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, eta: float = 0.8) -> SDEStep:
    """Coefficients-Preserving Sampling: x_next = mean + sigma_j z (the reference computes it in float32)."""
    mean, sigma = cps_mean_std(x.float(), v.float(), s, s_next, eta)
    x_next = _sample(mean, sigma, None if noise is None else noise.float(), generator)
    return SDEStep(x_next.to(x.dtype), mean, sigma)


def cps_code_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor = 1.0,
                      batch_dims: int = 1) -> torch.Tensor:
    """The reference's CPS log-prob -mean_d (sg(x_next) - mean)^2 ("remove all constants": no 1 / (2 sigma^2),
    so log rho_code = (2 sigma^2 / D) log rho_true, a step-dependent temperature). `std` is unused; it keeps the
    signature of gaussian_log_prob."""
    x_next, mean = full_precision(x_next), full_precision(mean)
    return -((x_next.detach() - mean) ** 2).mean(dim=tuple(range(batch_dims, mean.dim())))


# ---- the Gaussian policy ----------------------------------------------------------------------------------------

def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    """log N(x_next; mean, std^2), averaged (not summed) over all but the first `batch_dims` dims, as both references.

    Both references (Flow-GRPO's sde_step_with_logprob, DanceGRPO's flux_step) keep the -log(std) and
    -log(sqrt(2 pi)) terms; they do not depend on the parameters, so they cancel in the ratio but not in the
    logged log-probs. (MixGRPO's copy of the DanceGRPO step drops them by a stray line break; its Flow-GRPO
    step, the one MixGRPO uses, keeps them.) x_next is detached as in both references. Computed in float32 at
    least (flow_grpo #177: log_prob NaN under bf16).
    """
    x_next, mean = full_precision(x_next), full_precision(mean)
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    log_prob = (-((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std)
                - torch.log(torch.sqrt(torch.as_tensor(2 * math.pi, dtype=mean.dtype, device=mean.device))))
    return log_prob.mean(dim=tuple(range(batch_dims, log_prob.dim())))


# ---- rollouts -------------------------------------------------------------------------------------------------

StepFn = Callable[[torch.Tensor, torch.Tensor, float, float, torch.Tensor], SDEStep]  # (x, v, s, s_next, z)
OdeStepFn = Callable[[int, list, list, list], torch.Tensor]  # (j, states, velocities, grid) -> x_{j+1}
LogProbFn = Callable[..., torch.Tensor]  # (x_next, mean, std, batch_dims) -> log-prob per sample


def euler_ode_step(j: int, states: list, velocities: list, grid: list) -> torch.Tensor:
    """The deterministic step outside the SDE steps, as all three references: x + (s_{j+1} - s_j) v."""
    return states[j] + (grid[j + 1] - grid[j]) * velocities[j]


def step_noises(shape: tuple[int, ...], num_steps: int, group_size: int, seed: int, iteration: int,
                prompt_index: int, device: str | torch.device = "cpu", candidates: slice | None = None) -> torch.Tensor:
    """(G, N, *shape) SDE noises of one prompt, one keyed stream per candidate (so batching never changes them);
    with `candidates`, only that block's streams."""
    block = range(group_size)[candidates] if candidates is not None else range(group_size)
    streams = (keyed_generator(seed, iteration, prompt_index, i, ROLE_SDE_NOISE) for i in block)
    return torch.stack([torch.randn((num_steps, *shape), generator=generator) for generator in streams]).to(device)


def shared_noises(shape: tuple[int, ...], group_size: int, seed: int, iteration: int, prompt_index: int,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(G, *shape) one initial noise repeated over the group (DanceGRPO's and MixGRPO's init_same_noise)."""
    noise = torch.randn(shape, generator=keyed_generator(seed, iteration, prompt_index, ROLE_GROUP_NOISE))
    return noise.unsqueeze(0).expand(group_size, *shape).clone().to(device)


def rollout_noises(shape: tuple[int, ...], group_size: int, num_steps: int, same_initial_noise: bool, seed: int,
                   iteration: int, prompt_indices: Sequence[int], device: str | torch.device = "cpu",
                   candidates: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, G, *shape) initial noises (shared by the group, or independent) and (P, G, N, *shape) step noises;
    with `candidates`, only that block of each group (g instead of G), the same numbers the whole group gets."""
    draw = shared_noises if same_initial_noise else independent_noises
    initial = torch.stack([draw(shape, group_size, seed, iteration, index, device=device) for index in prompt_indices])
    if candidates is not None:
        initial = initial[:, candidates]
    steps = torch.stack([step_noises(shape, num_steps, group_size, seed, iteration, index, device, candidates)
                         for index in prompt_indices])
    return initial, steps


@torch.no_grad()
def sde_rollout(velocity: VelocityFn, noises: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
                sde_mask: torch.Tensor, sde_step: StepFn, noise: torch.Tensor, prompts: Sequence[str],
                prompt_indices: Sequence[int], ode_step: OdeStepFn = euler_ode_step,
                log_prob: LogProbFn = gaussian_log_prob) -> Rollout:
    """Sample all P*G candidates at once: SDE steps where `sde_mask` is set (keeping their log-probs under the old
    policy), deterministic steps elsewhere. `noise` is (P, G, N, *latent); one model evaluation per state."""
    P, G = noises.shape[:2]
    latent = noises.shape[2:]
    grid = [float(s) for s in sigmas.detach().cpu().double().tolist()]
    flat_cond = repeat_cond(cond, G)
    states, velocities = [noises.reshape(P * G, *latent)], []
    log_probs = torch.zeros(len(grid) - 1, P, G, device=noises.device)
    for j in range(len(grid) - 1):
        v = velocity(states[j], sigmas[j], flat_cond)
        velocities.append(v)
        if bool(sde_mask[j]):
            step = sde_step(states[j], v, grid[j], grid[j + 1], noise[:, :, j].reshape(P * G, *latent))
            log_probs[j] = log_prob(step.x_next, step.mean, step.std).view(P, G)
            states.append(step.x_next)
        else:
            states.append(ode_step(j, states, velocities, grid))
    return Rollout(list(prompts), list(prompt_indices), cond, sigmas,
                   torch.stack(states).view(len(grid), P, G, *latent), torch.stack(velocities).view(len(grid) - 1, P, G, *latent),
                   log_probs, sde_mask.clone())


def sde_steps(rollout: Rollout) -> list[int]:
    """The stochastic (trainable) steps of a rollout."""
    return [int(j) for j in torch.nonzero(rollout.sde_mask).flatten().tolist()]


# ---- minibatches --------------------------------------------------------------------------------------------

def sde_minibatches(steps: list[int], rollout: Rollout, num_minibatches: int, minibatch_by: str, seed: int,
                    iteration: int) -> list[Minibatch]:
    """'samples': every prompt's G candidates shuffled (keyed) and cut into `num_minibatches` slices, each trained
    on all `steps` (the references' gradient accumulation over timesteps); 'steps': one minibatch per step with
    all candidates."""
    P, G = len(rollout.prompt_indices), rollout.group_size
    if not steps:
        return []
    if minibatch_by == "steps":
        everyone = torch.arange(G).expand(P, G).clone()
        return [Minibatch(steps=[j], members=everyone) for j in steps]
    if minibatch_by != "samples":
        raise ValueError(f"minibatch_by must be 'samples' or 'steps'; got {minibatch_by!r}")
    orders = torch.stack([torch.randperm(G, generator=keyed_generator(seed, iteration, index, ROLE_MEMBERS))
                          for index in rollout.prompt_indices])  # (P, G)
    slices = orders.tensor_split(num_minibatches, dim=1)
    return [Minibatch(steps=list(steps), members=chunk.sort(dim=1).values) for chunk in slices]


def sde_call_schedule(prompts: int, group_size: int, rollout_steps: int, trained_steps: int, num_minibatches: int,
                      minibatch_by: str, old_policy: str, reference: bool, rollout_chunk: int | None,
                      micro_batch: int | None) -> list[Phase]:
    """The SDE baselines' velocity-net calls in one iteration (common.Phase): one rollout evaluation per step;
    every candidate trained at `trained_steps` steps, one with-grad call per (minibatch, step, micro-batch) on
    its members, each backpropagated before the next (step_losses); the reference at the same states when
    the loss has a KL; with old_policy 'recompute', the same units once without grad on the whole batch
    (prepare_old_policy is not micro-batched)."""
    if minibatch_by not in ("samples", "steps"):
        raise ValueError(f"minibatch_by must be 'samples' or 'steps'; got {minibatch_by!r}")
    if old_policy not in ("rollout", "recompute"):
        raise ValueError(f"old_policy must be 'rollout' or 'recompute'; got {old_policy!r}")
    members = members_per_minibatch(group_size, num_minibatches) if minibatch_by == "samples" else group_size
    units, batch = prompts * group_size * trained_steps, per_call(prompts, micro_batch) * members
    phases = [rollout_phase(prompts, group_size, rollout_steps, rollout_chunk)]
    if trained_steps == 0:
        return phases
    if old_policy == "recompute":
        phases.append(Phase("old_policy", units, prompts * members, False, "policy"))
    # the trainer backpropagates each trained step on its own (step_losses): one call's graph alive at a time
    phases.append(Phase("train", units, batch, True, "policy", held=1))
    if reference:
        phases.append(Phase("reference", units, batch, False, "reference"))
    return phases


# ---- the policy of one stored transition, and the PPO-clipped loss -----------------------------------------

MeanStdFn = Callable[[torch.Tensor, torch.Tensor, int, Rollout], tuple[torch.Tensor, float]]  # (x, v, j, rollout)


def transition_log_prob(velocity: VelocityFn, rollout: Rollout, j: int, members: torch.Tensor, mean_std: MeanStdFn,
                        log_prob: LogProbFn = gaussian_log_prob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """log pi(x_{j+1} | x_j) of the members' stored transitions under `velocity`: (log_prob (P, M), v, mean, std)."""
    x = gather_members(rollout.states[j], members)
    v = batched_velocity(velocity, x, rollout.sigmas[j], rollout.cond)
    mean, std = mean_std(x, v, j, rollout)
    return log_prob(gather_members(rollout.states[j + 1], members), mean, std, batch_dims=2), v, mean, std


@torch.no_grad()
def sde_old_policy(mode: str, velocity, rollout, batches, mean_std, log_prob: LogProbFn = gaussian_log_prob):
    """The rollout's own log-probs ('rollout'), or a no-grad recompute batched like training ('recompute')."""
    if mode == "rollout":
        return rollout
    if mode != "recompute":
        raise ValueError(f"old_policy must be 'rollout' or 'recompute'; got {mode!r}")
    return recompute_old_policy(velocity, rollout, batches, mean_std, log_prob)


def recompute_old_policy(velocity: VelocityFn, rollout: Rollout, batches: list[Minibatch], mean_std: MeanStdFn,
                         log_prob: LogProbFn = gaussian_log_prob) -> Rollout:
    """Old log-probs (and velocities) at the trained units from a no-grad pass batched exactly like the training
    pass, so the ratio is exactly 1 before the first update."""
    log_probs, velocities = rollout.log_probs.clone(), rollout.velocities.clone()
    for batch in batches:
        for j in batch.steps:
            new_log_prob, v, _, _ = transition_log_prob(velocity, rollout, j, batch.members, mean_std, log_prob)
            log_probs[j].scatter_(1, batch.members.to(new_log_prob.device), new_log_prob)
            index = batch.members.view(*batch.members.shape, *([1] * (v.dim() - 2))).expand_as(v)
            velocities[j].scatter_(1, index.to(v.device), v)
    return rollout._replace(log_probs=log_probs, velocities=velocities)


def step_losses(batch: Minibatch) -> list[tuple[Minibatch, float]]:
    """The minibatch's loss as a weighted sum of one-step losses (sde_policy_loss averages over its steps), for the
    trainer to backpropagate one step at a time: the references call backward per timestep inside their gradient
    accumulation, so only one step's activations are alive. Same gradient, up to float summation order."""
    return [(dataclasses.replace(batch, steps=[j]), 1 / len(batch.steps)) for j in batch.steps]


def ppo_clipped_loss(ratio: torch.Tensor, advantages: torch.Tensor, eps_clip: float) -> torch.Tensor:
    """mean over samples of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), as Flow-GRPO's and DanceGRPO's code."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    return torch.maximum(unclipped, clipped).mean()


LogRatioFn = Callable[[torch.Tensor, torch.Tensor, float, int, torch.Tensor], torch.Tensor]  # (log_ratio, mean, std, j, members)


def sde_policy_loss(velocity: VelocityFn, rollout: Rollout, advantages: torch.Tensor, batch: Minibatch,
                    mean_std: MeanStdFn, eps_clip: float,
                    penalty: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                    log_prob: LogProbFn = gaussian_log_prob, adjust_log_ratio: LogRatioFn | None = None,
                    step_weight: Callable[[int], float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-sample clipped loss averaged over the batch's steps (the references accumulate gradients over
    timesteps with loss / num_train_timesteps). `penalty(x, mean, j)` adds e.g. Flow-GRPO's KL term;
    `adjust_log_ratio` replaces the log-ratio (GRPO-Guard's RatioNorm) and `step_weight(j)` scales step j's
    clipped loss (GRPO-Guard's 1/|dt|).

    approx_kl is Flow-GRPO's logged estimator 0.5 * mean((logp - logp_old)^2), on the log-ratio the clip sees."""
    total, stats = 0.0, []
    A = gather_groups(advantages, batch.members)
    for j in batch.steps:
        new_log_prob, _, mean, std = transition_log_prob(velocity, rollout, j, batch.members, mean_std, log_prob)
        log_ratio = new_log_prob - gather_groups(rollout.log_probs[j], batch.members)
        if adjust_log_ratio is not None:
            log_ratio = adjust_log_ratio(log_ratio, mean, std, j, batch.members)
        ratio = log_ratio.exp()
        policy = ppo_clipped_loss(ratio, A, eps_clip)
        if step_weight is not None:
            policy = policy * step_weight(j)
        extra = penalty(gather_members(rollout.states[j], batch.members), mean, j) if penalty is not None else torch.zeros(())
        total = total + policy + extra
        detached = ratio.detach()
        # detached 0-dim tensors: the trainer reads them to the host once per iteration, not once per step
        stats.append({"ratio_mean": detached.mean(), "ratio_max_dev": (detached - 1).abs().max(),
                      "clip_fraction": ((detached - 1).abs() > eps_clip).float().mean(),
                      "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
                      "policy_loss": policy.detach(), "kl_loss": extra.detach().to(policy.device)})
    merged = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
    merged["ratio_max_dev"] = torch.stack([s["ratio_max_dev"] for s in stats]).max()
    return total / len(batch.steps), merged
