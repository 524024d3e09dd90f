"""One iteration, as the algorithms describe it: roll out the prompts' groups, score them, compute advantages,
then take the algorithm's optimizer steps. Rollout and scoring run per chunk of whole groups."""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch

from neighbor_grpo.maths.advantages import combine_reward_advantages
from neighbor_grpo.config.prompts import load_source_images
from neighbor_grpo.config.train_config import TrainConfig
from neighbor_grpo.models import decode_samples, sample_latent_shape
from neighbor_grpo.parallel.distributed import (SINGLE_PROCESS, BatchPart, Processes, all_true, any_process, batch_part,
                                       gather_block, global_means)
from neighbor_grpo.maths.noise import keyed_generator
from neighbor_grpo.parallel.wrapping import full_tensor, gradient_sync
from neighbor_grpo.training.parts import TrainingParts
from neighbor_grpo.parallel.partition import MAX_OR_SHARED_STATS, global_step_means, own_members, whole_group

ROLE_PROMPTS = 9_000_001


def prompt_batch(prompts: list[str], seed: int, iteration: int, count: int) -> tuple[list[str], list[int]]:
    """The iteration's prompts: consecutive slots of per-epoch permutations keyed by (seed, epoch); the slot
    number inside the global batch is the 'prompt index' that keys the noises."""
    chosen = []
    for slot in range(count):
        position = iteration * count + slot
        epoch, offset = divmod(position, len(prompts))
        order = torch.randperm(len(prompts), generator=keyed_generator(seed, epoch, ROLE_PROMPTS))
        chosen.append(prompts[int(order[offset])])
    return chosen, list(range(count))


class ModelCallCounter:
    """Counts per-sample forward passes of the velocity net, split into with-grad (training) and no-grad. Extra
    nets (a full fine-tune's frozen reference copy, an algorithm's own networks) count too: their passes cost the
    same."""

    def __init__(self, net: torch.nn.Module, *extra: torch.nn.Module | None):
        self.train = 0
        self.no_grad = 0
        self._handles = [module.register_forward_hook(self._count) for module in (net, *extra) if module is not None]

    def _count(self, module, inputs, output) -> None:
        first = inputs[0]  # the latents: one batched tensor, or (Z-Image) a list of per-sample tensors
        samples = len(first) if isinstance(first, (list, tuple)) else int(first.shape[0])
        if torch.is_grad_enabled():
            self.train += samples
        else:
            self.no_grad += samples

    def reset(self) -> tuple[int, int]:
        counts = (self.no_grad, self.train)
        self.train = self.no_grad = 0
        return counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def training_counter(adapter, parts: TrainingParts) -> ModelCallCounter:
    """A counter on every network an iteration evaluates: the policy, a full fine-tune's frozen reference copy and
    the algorithm's own networks (the trainer, `ngrpo compare` and the throughput benchmark all count with it)."""
    return ModelCallCounter(adapter.net, parts.reference_net, *parts.algorithm_nets.values())


def is_finite(*values: torch.Tensor | float) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


# ---- rollout and scoring, per chunk of whole groups ---------------------------------------------------------------

def group_chunks(prompts: range, size: int | None) -> list[range]:
    """This process's prompt slots in chunks of `size` whole groups (one chunk when `size` is None)."""
    step = size or max(len(prompts), 1)
    return [range(start, min(start + step, prompts.stop)) for start in range(prompts.start, prompts.stop, step)]


def rollout_chunk(algorithm, velocity, adapter, prompts: list[str], indices: list[int], iteration: int,
                  part: BatchPart, sharded: bool):
    """The chunk's groups rolled out under the old parameters, without autograd bookkeeping. FSDP's gathered-weight
    buffers are reused by the training passes, so they must not become inference tensors: no_grad there."""
    cond = adapter.encode_prompts(prompts)
    block = {} if part.candidates is None else {"candidates": slice(part.candidates.start, part.candidates.stop)}
    with torch.no_grad() if sharded else torch.inference_mode():
        return algorithm.rollout(velocity, cond, prompts, indices, iteration, sample_latent_shape(adapter, prompts),
                                 adapter.device, **block)


def score_chunk(adapter, rewards, rollout) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """The chunk's decoded images scored by every reward: ({name: (P, g)}, images, fault). A NaN/inf score is a
    numerical fault (the update is skipped and counted), not an exception."""
    P, g = rollout.final.shape[:2]  # g = G unless the group spans processes
    with torch.no_grad():
        images = decode_samples(adapter, rollout.final.flatten(0, 1), rollout.cond.repeat_interleave(g, dim=0))
        try:
            group_ids = torch.tensor(rollout.prompt_indices, device=images.device).repeat_interleave(g)
            prompts = [p for p in rollout.prompts for _ in range(g)]
            sources = load_source_images(prompts, *images.shape[-2:])  # editing prompts carry theirs; else None
            scores = rewards.score(images, prompts, source_images=None if sources is None else sources.to(images.device),
                                   group_ids=group_ids)
        except FloatingPointError as error:
            return {}, images, str(error)
    return {k: v.view(P, g) for k, v in scores.items()}, images, ""


def rollouts_and_scores(chunks: list[range], roll, score, overlap: bool) -> tuple[list, list]:
    """Each chunk rolled out, then scored: ([rollout], [(scores, images, fault)]). With `overlap`, a worker thread
    decodes and scores chunk k while chunk k+1 rolls out. A rollout never reads a score and its noises come from
    keys, so both orders compute the same numbers; in turn, scoring stops at the first NaN (the update is skipped
    either way)."""
    pieces, scored = [], []
    if not overlap:
        for chunk in chunks:
            pieces.append(roll(chunk))
            scored.append(score(pieces[-1]))
            if scored[-1][2]:
                break
        return pieces, scored
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ngrpo-scoring") as worker:
        futures = []
        for chunk in chunks:
            pieces.append(roll(chunk))
            futures.append(worker.submit(score, pieces[-1]))
            if any(f.done() and f.exception() is not None for f in futures):
                break  # a reward that failed for good: no point rolling out more
        try:
            scored = [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()  # after a failure, chunks not started yet are not scored
    return pieces, scored


def concat_rollouts(pieces: list):
    """Chunks' rollouts -> one rollout over all their prompts (the inverse of `select_prompts`)."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    cat = lambda name, dim: torch.cat([getattr(p, name) for p in pieces], dim=dim)
    return first._replace(prompts=[x for p in pieces for x in p.prompts],
                          prompt_indices=[x for p in pieces for x in p.prompt_indices],
                          cond=_cat_rows([p.cond for p in pieces]), states=cat("states", 1),
                          velocities=cat("velocities", 1),
                          log_probs=None if first.log_probs is None else cat("log_probs", 1))


def _cat_rows(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if isinstance(values[0], (list, tuple)):
        return type(values[0])(_cat_rows(list(column)) for column in zip(*values))
    if isinstance(values[0], dict):
        return {k: _cat_rows([v[k] for v in values]) for k in values[0]}
    return values[0]


# ---- the iteration -----------------------------------------------------------------------------------------------

def train_iteration(config: TrainConfig, adapter, rewards, algorithm, optimizer, params, ema, reference_velocity,
                    train_prompts: list[str], iteration: int, hook,
                    parts: TrainingParts | None = None) -> tuple[dict[str, float], str]:
    """One rollout batch and its optimizer steps. Returns logged values (of the whole global batch) and why the
    update was skipped ('' if not). `parts` (from build_training_parts) brings the split over processes,
    DDP/FSDP, mixed precision and the fp16 gradient scaler; without it, one process."""
    processes = parts.processes if parts is not None else SINGLE_PROCESS
    velocity = parts.velocity if parts is not None else adapter.velocity
    all_prompts, all_indices = prompt_batch(train_prompts, config.seed, iteration, config.prompts_per_iteration)
    count, group_size = len(all_prompts), algorithm.config.group_size
    # this process's groups, or its block of one group when there are fewer prompts than processes; the slot and
    # candidate numbers key the noises, so the blocks together roll out what one process would
    part = batch_part(count, group_size, processes.rank, processes.world_size)
    slots = part.prompts
    roll = lambda chunk: rollout_chunk(algorithm, velocity, adapter, all_prompts[chunk.start:chunk.stop],
                                       all_indices[chunk.start:chunk.stop], iteration, part, processes.sharded)
    pieces, scored = rollouts_and_scores(group_chunks(slots, config.speed.rollout_chunk), roll,
                                         lambda piece: score_chunk(adapter, rewards, piece), config.speed.async_scoring)
    chunk_scores, chunk_images, faults = (list(column) for column in zip(*scored))
    fault = next((f for f in faults if f), "")
    if any_process(bool(fault), processes):  # every process skips together
        return {}, f"reward scores: {fault or 'non-finite on another process'}"
    rollout = concat_rollouts(pieces)
    local_scores = {k: torch.cat([s[k] for s in chunk_scores]) for k in chunk_scores[0]}
    images = torch.cat(chunk_images) if len(chunk_images) > 1 else chunk_images[0]
    # the whole batch's rewards on every process: advantages (per group, or batch-wide) and metrics as in one process
    scores = {k: gather_block(v, part, count, group_size, processes) for k, v in local_scores.items()}
    total = rewards.total(scores)
    values = reward_values(scores, total)
    values.update(global_means({"out_of_range_train": ((images < -0.1) | (images > 1.1)).float().mean()},
                               part.candidate_share(count, group_size), processes))
    if count < processes.world_size:
        # a group split over processes: the leaping policy needs all G next states, the SDE losses their members'
        rollout = whole_group(rollout, part, count, group_size, processes)
    advantages = combine_reward_advantages(scores, rewards.weights, config.reward_normalization, algorithm.advantages)
    advantages, clipped_share = algorithm.clip(advantages)
    values["adv_clipped_share"] = clipped_share
    if not is_finite(total, advantages):
        return values, "rewards or advantages"
    advantages = advantages[slots.start:slots.stop]
    hook("after_rollout")
    step_values, skipped = update(config, adapter, algorithm, optimizer, params, ema, reference_velocity, velocity,
                                  rollout, advantages, part, count, iteration, hook, parts)
    values.update(step_values)
    return values, skipped


def reward_values(scores: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
    """The logged reward statistics of the whole batch (`total` is the weighted sum of `scores`, (P, G)): mean,
    within-group spread, flat groups, each reward."""
    values = {"reward_mean": float(total.mean()), "reward_std": float(total.std(dim=-1, correction=0).mean()),
              "zero_variance_groups": float((total.std(dim=-1) < 1e-6).float().mean())}
    values.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
    return values


def update(config: TrainConfig, adapter, algorithm, optimizer, params, ema, reference_velocity, velocity, rollout,
           advantages: torch.Tensor, part: BatchPart, count: int, iteration: int, hook,
           parts: TrainingParts | None) -> tuple[dict[str, float], str]:
    """The algorithm's optimizer steps on this rollout batch (one per minibatch): the logged step means and why the
    update was skipped ('' if not)."""
    processes = parts.processes if parts is not None else SINGLE_PROCESS
    train_velocity = parts.train_velocity if parts is not None else adapter.velocity
    scaler = parts.scaler if parts is not None else None
    # the same minibatches as one process; of a shared prompt, each process trains its block of the members
    batches = [own_members(batch, part, count) for batch in algorithm.minibatches(rollout, iteration)]
    rollout = algorithm.prepare_old_policy(velocity, rollout, [batch for batch, _ in batches])
    records: list[dict] = []
    shares: list[float] = []
    values, skipped, fp16_overflows = {}, "", 0
    max_norm = config.optim.max_grad_norm or float("inf")
    for batch, share in batches:
        optimizer.zero_grad(set_to_none=True)
        # DDP/FSDP average gradients over processes: weighting each process's mean loss by world_size * its share
        # of the trained units makes that average the gradient of the mean over the whole batch, however split
        loss, batch_stats = accumulate_gradients(algorithm, train_velocity, rollout, advantages, batch,
                                                 reference_velocity, processes.world_size * share,
                                                 config.speed.micro_batch,
                                                 parts.train_module if parts is not None else None, scaler,
                                                 passes_per_step(count, config.speed.micro_batch, processes))
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.as_tensor(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)), device=loss.device)
        # one host sync per optimizer step, needed to decide whether to take it; the same decision on every process
        finite_loss, finite_grads = all_true(torch.stack([torch.isfinite(loss).all(), torch.isfinite(grad_norm).all()]),
                                             processes)
        if scaler is not None and finite_loss and not finite_grads and scaler.get_scale() > 1.0:
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # the usual fp16 overflow: this step is left out and the loss scale halved, not a fault
            fp16_overflows += 1
            continue
        if not (finite_loss and finite_grads):
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            skipped = "loss" if not finite_loss else "gradients"
            break
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(adapter.net)
        if hasattr(algorithm, "after_step"):  # e.g. a soft update of an old policy the algorithm owns
            algorithm.after_step(adapter.net)
        # grad_clipped_share: the share of optimizer steps whose gradient norm was above optim.max_grad_norm (a
        # device-side comparison, read with the other stats after the loop: no extra host sync)
        records.append({**batch_stats, "loss": loss.detach(), "grad_norm": grad_norm.detach(),
                        "grad_clipped_share": (grad_norm.detach() > max_norm).float()})
        shares.append(share)
        hook("after_optimizer_step")
    if scaler is not None:
        values["fp16_overflow_steps"] = float(fp16_overflows)
    if records:  # read to the host once, after the optimizer loop
        values.update(global_step_means(records, shares, processes))
    return values, skipped


def accumulate_gradients(algorithm, velocity, rollout, advantages: torch.Tensor, batch, reference_velocity,
                         weight: float, micro_batch: int | None, module: torch.nn.Module | None,
                         scaler=None, passes: int = 1) -> tuple[torch.Tensor, dict]:
    """The minibatch's loss over this process's groups, backpropagated in passes of `micro_batch` prompts
    (gradients accumulate; only the last pass synchronises them over processes). Every pass's loss is a mean over
    its prompts, so weighting it by its prompt share gives exactly the one-pass gradient. An algorithm with
    `loss_parts(batch)` (the SDE baselines: one part per trained step) has each pass's loss backpropagated part by
    part, so only one part's activations are alive at a time. At least `passes` passes: a process with fewer
    prompts repeats its last one with weight 0, because FSDP gathers the weights in every forward and all
    processes must take part. Returns the loss and the algorithm's stats, as means over this process's groups."""
    P = len(rollout.prompts)
    size = P if not micro_batch else min(micro_batch, P)
    chunks = [range(start, min(start + size, P)) for start in range(0, P, size)]
    chunks += [chunks[-1]] * (passes - len(chunks))  # the repeats carry weight 0 (below)
    loss_parts = getattr(algorithm, "loss_parts", lambda whole: [(whole, 1.0)])
    total, stats = 0.0, {}
    for number, rows in enumerate(chunks):
        share = len(rows) / P if number * size < P else 0.0
        pieces = (rollout, advantages, batch) if len(chunks) == 1 else select_prompts(rollout, advantages, batch, rows)
        parts = loss_parts(pieces[2])
        for index, (piece, piece_weight) in enumerate(parts):
            last = number == len(chunks) - 1 and index == len(parts) - 1
            part = share * piece_weight
            with gradient_sync(module, enabled=last) if module is not None else contextlib.nullcontext():
                loss, pass_stats = algorithm.loss(velocity, *pieces[:2], piece, reference_velocity)
                scaled = loss * (weight * part)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if part == 0.0:
                continue
            total = total + loss.detach() * part
            for key, value in pass_stats.items():
                if key in MAX_OR_SHARED_STATS:
                    stats[key] = torch.maximum(torch.as_tensor(stats.get(key, value)), torch.as_tensor(value))
                else:
                    stats[key] = stats.get(key, 0.0) + value * part
    return total, stats


def passes_per_step(count: int, micro_batch: int | None, processes: Processes) -> int:
    """The fewest forward/backward passes per optimizer step. FSDP: the same on every process (the one with the
    most prompts sets it); DDP only synchronises in the last pass, so each process makes just the passes it needs."""
    if not (micro_batch and processes.sharded):
        return 1
    most = -(-count // processes.world_size)
    return -(-most // micro_batch)


def _rows(value, rows: slice):
    """Rows of per-prompt conditioning: a tensor, or a tuple/list/dict of them."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return value


def select_prompts(rollout, advantages: torch.Tensor, batch, rows: range):
    """The rollout, advantages and minibatch restricted to the prompts in `rows` (one micro-batch)."""
    part = slice(rows.start, rows.stop)
    piece = rollout._replace(prompts=rollout.prompts[part], prompt_indices=rollout.prompt_indices[part],
                             cond=_rows(rollout.cond, part), states=rollout.states[:, part],
                             velocities=rollout.velocities[:, part],
                             log_probs=None if rollout.log_probs is None else rollout.log_probs[:, part])
    return piece, advantages[part], dataclasses.replace(batch, members=batch.members[part])
