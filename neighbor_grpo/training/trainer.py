"""The training loop, written out once: rollout -> reward -> advantages -> the algorithm's optimizer steps, for any
algorithm. The iteration itself is in `iteration`; the run's folder, logs, evaluations, exports and checkpoints in
`run`; what the run trains with (model, algorithm, optimizer) in `parts`."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from neighbor_grpo.config.train_config import TrainConfig, to_dict
from neighbor_grpo.training.cost import forward_equivalents
from neighbor_grpo.parallel.distributed import (Processes, any_process, check_batch_fits, init_processes, joins_process_group,
                                       main_process_first, sum_over_processes)
from neighbor_grpo.training.iteration import (ModelCallCounter, prompt_batch, train_iteration,  # noqa: F401  (public API)
                                     training_counter)
from neighbor_grpo.training.parts import (build_training_parts, checked_prompt_sets, load_model, model_shift,  # noqa: F401
                                          read_prompts)
from neighbor_grpo.runs.resume import recovery
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.retry import RewardFailed, with_retries  # noqa: F401
from neighbor_grpo.training.guards import NonFiniteWeights, TrainingAborted, TrainingIneffective, weights_checksum  # noqa: F401
from neighbor_grpo.training.interrupts import DeferredInterrupt
from neighbor_grpo.runs.run import Run, open_run


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    eval_before: dict
    eval_after: dict
    seconds: float


@joins_process_group  # train() leaves the process group it joined
def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, fault_hook: Callable[[str], None] | None = None,
          adapter=None, rewards=None, accept_changes: dict | None = None) -> TrainResult:
    """Align a model with the configured algorithm and rewards; writes everything into `run_dir`.

    `adapter` and `rewards` may be passed in code (Python API); otherwise they are built from the config.
    `accept_changes` ({dotted key: value}, resuming only) changes settings of the short list resume.ACCEPTABLE on
    purpose; any other difference from the checkpoint's recorded inputs is refused (docs/robustness.md).
    `fault_hook(point)` is called at named points (tests use it to kill the process there). See docs/robustness.md
    for what survives a kill, an interrupt, a failing reward or NaNs. Launched on several processes (accelerate
    launch, torchrun; docs/distributed.md), each process rolls out its share of the prompt slots; only the main
    process evaluates, logs, exports and writes checkpoints.
    """
    hook = fault_hook or (lambda point: None)
    started = time.perf_counter()
    processes, device = init_processes(config.device, config.speed.parallel)
    check_batch_fits(config.prompts_per_iteration, processes, config.algorithm_config.group_size,
                     f"{config.algorithm}.group_size")
    progress = progress and processes.is_main
    with open_run(run_dir, config, processes, resume, overwrite, hook, accept_changes) as run:
        config = run.config  # resuming: the checked config, with accepted changes
        with main_process_first(processes):  # the main process builds and caches the built-in models first
            adapter = adapter or load_model(config.model.path, str(device), progress, options=config.model)
            rewards = with_retries(rewards or build_rewards([to_dict(r) for r in config.rewards], device=device))
            # eval.monitor_rewards: scored on held-out samples only, never trained on or selected by
            monitors = (build_rewards([to_dict(r) for r in config.eval.monitor_rewards], device=device)
                        if processes.is_main else None)
        adapter.net.to(device)
        run.save_base(adapter)
        train_prompts, heldout_prompts = checked_prompt_sets(config, rewards)  # the prompt file is read once
        check_prompts(adapter, config, train_prompts, heldout_prompts)  # before the run folder is committed
        parts = build_training_parts(config, adapter, processes)
        run.commit()  # start-up succeeded: a new run folder replaces --out only now
        run.attach(adapter, parts, rewards, heldout_prompts, monitors)
        start = run.restore() if run.resuming else 0
        run.open_log(start)
        calls = training_counter(adapter, parts)
        eval_before = run.evaluate_before(start)
        calls.reset()
        bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="align", unit="it",
                   disable=not progress, dynamic_ncols=True)
        run.mark_boundary(start)
        try:
            with DeferredInterrupt() as interrupt:
                for iteration in bar:
                    tick = time.perf_counter()
                    hook("iteration_start")
                    checksum = weights_checksum(parts.params)
                    values, skipped = train_iteration(config, adapter, rewards, parts.algorithm, parts.optimizer,
                                                      parts.params, parts.ema, parts.reference_velocity, train_prompts,
                                                      iteration, hook, parts=parts)
                    values.update(count_model_evals(calls, run.counters, processes, config.optim.finetune),
                                  s_per_iter=time.perf_counter() - tick)
                    changed = any_process(weights_checksum(parts.params) != checksum, processes)
                    abort = count_updates(skipped, changed, run.counters, values, config, processes, iteration)
                    done = iteration + 1
                    if not abort:
                        values.update(run.evaluate_due(done))
                        calls.reset()  # held-out sampling is not training cost
                    run.log.log(done, values)
                    run.mark_boundary(done)
                    hook("after_log")
                    best = run.counters["best_heldout"]
                    bar.set_postfix(reward=f"{values.get('reward_mean', float('nan')):.3f}",
                                    heldout=f"{best:.3f}" if best > -float("inf") else "-")
                    stop = any_process(interrupt.requested, processes)  # Ctrl-C reaches the processes at different moments
                    if run.checkpoint_due(done) or abort or stop:
                        run.checkpoint()
                    if abort:
                        raise TrainingAborted(abort_message(run, skipped, done))
                    if stop:
                        raise KeyboardInterrupt
        except BaseException as error:
            run.stopped(error)
            raise
        finally:
            calls.remove()
        eval_after = run.finish()
        return TrainResult(run.path, config.iterations, eval_before, eval_after, time.perf_counter() - started)


def check_prompts(adapter, config: TrainConfig, train_prompts: list[str], heldout_prompts: list[str]) -> None:
    """Every prompt the model cannot take is an error now, naming where it came from, not minutes into the run after
    its folder is committed. A text-encoder model encodes the held-out prompts once here (cached: offloaded text
    encoders stay off); the built-in models' label lookup is cheap enough for every prompt."""
    p = config.prompts
    train_source = f"prompts.file {p.file!r}" if p.file else "prompts.train"
    heldout_source = (f"prompts.eval_file {p.eval_file!r}" if p.eval_file else
                      f"prompts.file {p.file!r} (its eval_fraction split)" if p.eval_fraction else "prompts.eval")
    caches = callable(getattr(adapter, "cache_prompts", None))
    sources = [(train_source, train_prompts), (heldout_source, heldout_prompts)]
    for source, prompts in sources[1:] if caches else sources:
        try:
            adapter.cache_prompts(prompts) if caches else adapter.encode_prompts(sorted(set(prompts)))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def count_model_evals(calls: ModelCallCounter, counters: dict, processes: Processes, finetune: str) -> dict[str, float]:
    """The iteration's velocity-net passes over all processes in forward-equivalents (cost.forward_equivalents: a
    with-grad pass is 1 + b, b = 2 for a full fine-tune, 1 for LoRA), added to the run's running total."""
    rollout_evals, train_evals = (int(n) for n in sum_over_processes(list(calls.reset()), processes))
    iteration_cost = forward_equivalents(rollout_evals, train_evals, finetune)
    counters["model_evals"] += iteration_cost
    return {"model_evals_rollout": float(rollout_evals), "model_evals_train": iteration_cost - rollout_evals,
            "model_evals_per_iter": iteration_cost}


def count_updates(skipped: str, changed: bool, counters: dict, values: dict, config: TrainConfig,
                  processes: Processes, iteration: int) -> bool:
    """Count a skipped (non-finite) update, or one that changed no parameter; True when too many skipped in a row
    mean the run must stop."""
    abort = False
    if skipped or not changed:
        counters["idle_updates"] += 1
    if skipped:
        counters["nonfinite_in_row"] += 1
        counters["nonfinite_total"] += 1
        if processes.is_main:
            warnings.warn(f"iteration {iteration + 1}: update skipped, non-finite {skipped} "
                          f"({counters['nonfinite_in_row']} in a row, {counters['nonfinite_total']} in all)")
        abort = counters["nonfinite_in_row"] >= config.max_nonfinite_in_row
    else:
        counters["nonfinite_in_row"] = 0
    values["skipped_updates_total"] = float(counters["nonfinite_total"])
    return abort


def abort_message(run: Run, skipped: str, done: int) -> str:
    return (f"{run.counters['nonfinite_in_row']} updates in a row had NaN/inf ({skipped}); stopping "
            f"(max_nonfinite_in_row={run.config.max_nonfinite_in_row}). Check the settings and the reward; "
            f"the state after iteration {done} is saved in {str(run.checkpoints / f'iter-{done:06d}')!r}. "
            f"{recovery(run.path, run.config)}")
