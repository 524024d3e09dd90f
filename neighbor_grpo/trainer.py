"""The training loop, written out once: rollout -> reward -> advantages -> K optimizer steps, for any algorithm."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm.auto import tqdm

from neighbor_grpo.advantages import combine_reward_advantages
from neighbor_grpo.algorithms import ALGORITHMS
from neighbor_grpo.checkpoint import (capture_rng, latest_good_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                                      prune_checkpoints, read_checkpoint, restore_rng, write_checkpoint)
from neighbor_grpo.config import TrainConfig, to_dict
from neighbor_grpo.io import atomic_write_text
from neighbor_grpo.logs import MetricsLog, plot_curves, save_grid
from neighbor_grpo.lora import EMA, apply_lora, make_reference_velocity
from neighbor_grpo.models import load_adapter
from neighbor_grpo.monitors import evaluate
from neighbor_grpo.noise import keyed_generator
from neighbor_grpo.rewards import WeightedRewards, build_rewards
from neighbor_grpo.runfolder import RunFolder, RunFolderError

ROLE_PROMPTS = 9_000_001
PREVIOUS_BEST = ".best-previous"  # the committed best/ export, kept until the next checkpoint commits a newer one


class TrainingAborted(RuntimeError):
    """Too many updates in a row were skipped for NaN/inf; a checkpoint was saved first."""


class RewardFailed(RuntimeError):
    """A reward raised twice in a row on the same images (it is retried once)."""


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    eval_before: dict
    eval_after: dict
    seconds: float


def load_model(path: str, device: str, progress: bool = True, options=None):
    """A model adapter from a checkpoint folder (ours, or a diffusers folder), or the built-in base model (built and
    cached on first use). `options` (the config's `model` section) reaches adapters that take options."""
    if path == "builtin:digits":
        from neighbor_grpo.pretrain import ensure_base_model

        path = str(ensure_base_model(progress=progress))
    return load_adapter(path, device=device, options=options)


def read_prompts(config: TrainConfig) -> list[str]:
    if config.prompts.file is None:
        return list(config.prompts.train)
    path = Path(config.prompts.file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts.file {str(path)!r}: no such file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts.file {str(path)!r}: not UTF-8 text ({error})") from error
    if not prompts:
        raise ValueError(f"prompts.file {str(path)!r}: holds no prompts (expected one prompt per line)")
    return prompts


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
    """Counts per-sample forward passes of the velocity net, split into with-grad (training) and no-grad."""

    def __init__(self, net: torch.nn.Module):
        self.train = 0
        self.no_grad = 0
        self._handle = net.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self.train += int(inputs[0].shape[0])
        else:
            self.no_grad += int(inputs[0].shape[0])

    def reset(self) -> tuple[int, int]:
        counts = (self.no_grad, self.train)
        self.train = self.no_grad = 0
        return counts

    def remove(self) -> None:
        self._handle.remove()


def run_metadata(config: TrainConfig) -> dict:
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("neighbor_grpo", "diffusers", "peft", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "neighbor_grpo" else "neighbor-grpo")
        except Exception:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "command": sys.argv, "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


@dataclass
class TrainingParts:
    params: list
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    algorithm: object
    reference_velocity: Callable
    shift: float
    """The sigma shift actually used (the config's, or the model's own when the config leaves it null)."""


def model_shift(config: TrainConfig, adapter) -> float:
    """The rollout/evaluation grid's shift: the config's value, else the adapter's default (1 if it has none)."""
    if config.algorithm_config.shift is not None:
        return float(config.algorithm_config.shift)
    default = getattr(adapter, "default_shift", None)
    return float(default()) if callable(default) else 1.0


def build_training_parts(config: TrainConfig, adapter) -> TrainingParts:
    """LoRA (if asked), the reference velocity, AdamW over the trainable parameters, EMA and the algorithm."""
    frozen = None
    if config.optim.finetune == "lora":
        with torch.random.fork_rng(devices=[]):  # LoRA's random init keyed by the seed, not by the global RNG's state
            torch.manual_seed(config.seed)
            adapter.net = apply_lora(adapter.net, config.optim.lora_rank, config.optim.lora_alpha, config.optim.lora_targets)
    elif getattr(config.algorithm_config, "ref_beta", 0) > 0 or getattr(config.algorithm_config, "kl_beta", 0) > 0:
        frozen = copy.deepcopy(adapter.net).requires_grad_(False)
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)
    ema = EMA(adapter.net, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    shift = model_shift(config, adapter)
    algorithm = ALGORITHMS[config.algorithm](dataclasses.replace(config.algorithm_config, shift=shift), seed=config.seed)
    return TrainingParts(params, optimizer, ema, algorithm, make_reference_velocity(adapter, frozen), shift)


def _is_finite(*values: torch.Tensor | float) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


# ---- fault tolerance helpers -------------------------------------------------------------------------------------

class _RetryOnce:
    """Wraps one reward: an exception is retried once on the same images, a second one stops the run.
    (A NaN/inf *score* is not an exception here: `check_scores` turns it into a skipped update.)"""

    def __init__(self, name: str, reward):
        self.name, self.reward = name, reward

    def __call__(self, images, prompts):
        try:
            return self.reward(images, prompts)
        except Exception as error:
            warnings.warn(f"reward {self.name!r} raised {type(error).__name__}: {error}; retrying once")
            try:
                return self.reward(images, prompts)
            except Exception as again:
                raise RewardFailed(f"reward {self.name!r} failed twice in a row ({type(again).__name__}: {again}); "
                                   "the run stops. Fix the reward, then continue with `ngrpo train --resume RUN` "
                                   "(train(..., resume=True))") from again

    def __getattr__(self, name: str):  # extra_metrics and the like come from the wrapped reward
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)


def _with_retries(rewards):
    if isinstance(rewards, WeightedRewards):
        wrapped = {n: r if isinstance(r, _RetryOnce) else _RetryOnce(n, r) for n, r in rewards.rewards.items()}
        return dataclasses.replace(rewards, rewards=wrapped)
    return rewards


def _flatten(data: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}, so a config difference is named by its dotted key."""
    flat = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_safe(value):
    """Non-finite floats become None, so checkpoints hold standard JSON (no Infinity/NaN tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _new_counters() -> dict:
    return {"nonfinite_in_row": 0, "nonfinite_total": 0, "best_heldout": -math.inf, "best_iteration": None,
            "model_evals": 0}


def _counters_from_json(saved: dict) -> dict:
    counters = {**_new_counters(), **saved}
    if counters["best_heldout"] is None:
        counters["best_heldout"] = -math.inf
    return counters


def _remove_tree(path: Path) -> None:
    """Rename aside, then delete: a kill half-way leaves a hidden .tmp-* folder, never a torn visible one."""
    if not path.exists():
        return
    aside = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _export_iteration(folder: Path) -> int | None:
    """The iteration an export folder (best/) was taken at, from its model.json; None if unknown."""
    try:
        value = json.loads((folder / "model.json").read_text()).get("iteration")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _load_trainable(net: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    current = {n: p for n, p in net.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    wrong = sorted(n for n in set(current) & set(saved) if tuple(current[n].shape) != tuple(saved[n].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model being trained (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); was model.path or the finetune "
                         "mode changed since the run started?")
    with torch.no_grad():
        for name, param in current.items():
            param.copy_(saved[name])


def _tidy_for_resume(run: Path, start: int, counters: dict) -> None:
    """Make the run folder agree with the checkpoint the run resumes from (`start` iterations done): drop what a
    killed process left half-written or wrote after that checkpoint (it is replayed)."""
    for folder in (run, run / "samples", run / "base", run / "best", run / "aligned"):
        if folder.is_dir():
            for item in folder.glob(".*.tmp"):  # atomic_write temporaries
                item.unlink(missing_ok=True)
    for item in run.glob(".tmp-*"):  # half-built exports (.tmp-best, .tmp-aligned, .tmp-base, .tmp-old-*)
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
    if start == 0:  # no checkpoint: start over; the logs of the killed attempt would repeat iteration 0
        (run / "metrics.csv").unlink(missing_ok=True)
        shutil.rmtree(run / "tensorboard", ignore_errors=True)
    for grid in (run / "samples").glob("iter-*.png"):
        if int(grid.stem.split("-")[1]) > start:
            grid.unlink(missing_ok=True)
    # best/ must be the export of counters["best_iteration"]: an export taken after the checkpoint is undone
    best, previous, wanted = run / "best", run / PREVIOUS_BEST, counters.get("best_iteration")
    if best.is_dir() and _export_iteration(best) is None and wanted is not None:
        shutil.rmtree(previous, ignore_errors=True)  # an adapter that records no iteration: keep best/ as it is
        return
    if not (best.is_dir() and _export_iteration(best) == wanted):
        _remove_tree(best)
        if previous.is_dir() and _export_iteration(previous) == wanted and wanted is not None:
            os.replace(previous, best)
        elif wanted is not None:  # lost (only after checkpoint corruption): the next better evaluation re-exports
            counters["best_heldout"], counters["best_iteration"] = -math.inf, None
    shutil.rmtree(previous, ignore_errors=True)


class _DeferredInterrupt:
    """While training, the first Ctrl-C (SIGINT) only sets a flag: the iteration in progress finishes, a
    checkpoint is saved at that boundary and KeyboardInterrupt is raised. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._installed, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nngrpo: interrupt received; finishing this iteration and saving a checkpoint "
              "(press Ctrl-C again to stop at once and lose the iteration in progress)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
        return False


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, fault_hook: Callable[[str], None] | None = None,
          adapter=None, rewards=None) -> TrainResult:
    """Align a model with the configured algorithm and rewards; writes everything into `run_dir`.

    `adapter` and `rewards` may be passed in code (Python API); otherwise they are built from the config.
    `fault_hook(point)` is called at named points (tests use it to kill the process there).
    See docs/robustness.md for what survives a kill, an interrupt, a failing reward or NaNs.
    """
    hook = fault_hook or (lambda point: None)
    started = time.perf_counter()
    with RunFolder(run_dir, resume=resume, overwrite=overwrite) as folder:
        run = folder.path
        device = torch.device(config.device)
        if resume and not (run / "config.yaml").is_file():
            leftovers = sorted(p.name for p in run.iterdir() if p.name != ".lock")
            if leftovers:
                raise RunFolderError(f"--resume {str(run)!r}: not a run folder (no config.yaml; it holds "
                                     f"{leftovers[:5]})")
            resume = False  # killed before it wrote anything: this is a fresh start
        if resume:
            saved = yaml.safe_load((run / "config.yaml").read_text())
            if saved != to_dict(config):
                old, new = _flatten(saved), _flatten(to_dict(config))
                changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
                raise ValueError(f"--resume {str(run)!r}: the config differs from the run's config.yaml in {changed}; "
                                 "resume with the same config (or start a new run)")
            if not (run / "run.json").is_file():
                atomic_write_text(run / "run.json", json.dumps(run_metadata(config), indent=2))
        else:
            atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
            atomic_write_text(run / "run.json", json.dumps(run_metadata(config), indent=2))

        adapter = adapter or load_model(config.model.path, config.device, progress, options=config.model)
        adapter.net.to(device)
        if not (run / "base" / "model.json").is_file():
            shutil.rmtree(run / ".tmp-base", ignore_errors=True)
            adapter.save(run / ".tmp-base")
            _remove_tree(run / "base")
            os.replace(run / ".tmp-base", run / "base")
        rewards = _with_retries(rewards or build_rewards([to_dict(r) for r in config.rewards], device=device))
        train_prompts = read_prompts(config)

        parts = build_training_parts(config, adapter)
        params, optimizer, ema, algorithm, reference_velocity = (parts.params, parts.optimizer, parts.ema,
                                                                  parts.algorithm, parts.reference_velocity)

        start, counters, heldout_metrics = 0, _new_counters(), {}
        checkpoints = run / "checkpoints"
        last_saved: int | None = None  # iteration of the newest checkpoint this run can resume from
        if resume:
            latest = latest_good_checkpoint(checkpoints)
            if latest is not None:
                tensors, state = read_checkpoint(latest)
                _load_trainable(adapter.net, tensors["model"], latest)
                try:
                    optimizer.load_state_dict(optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
                except (ValueError, KeyError, RuntimeError) as error:
                    raise ValueError(f"checkpoint {str(latest)!r}: its optimizer state does not fit this model "
                                     f"({error})") from error
                if ema is not None:
                    if "ema" not in tensors:
                        raise ValueError(f"checkpoint {str(latest)!r} holds no EMA weights but optim.ema_decay > 0")
                    ema.shadow = {k: v.to(device) for k, v in tensors["ema"].items()}
                restore_rng(tensors["rng"], state["rng"])
                start, counters = state["iteration"], _counters_from_json(state["counters"])
                heldout_metrics = state.get("heldout") or {}
                last_saved = start
            _tidy_for_resume(run, start, counters)
            if checkpoints.is_dir():
                prune_checkpoints(checkpoints, config.keep_checkpoints)  # also drops half-written temporaries
            metadata = json.loads((run / "run.json").read_text())
            metadata.setdefault("resumes", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_iteration": start})
            atomic_write_text(run / "run.json", json.dumps(metadata, indent=2))

        # The state at an iteration boundary (`iteration` done): what a checkpoint must hold. Parameters, optimizer
        # and EMA are the live ones, so the boundary is only "clean" until the next optimizer step.
        boundary: dict = {}
        stepped = [False]

        def mark_boundary(done: int) -> None:
            boundary.update(iteration=done, rng=capture_rng(), counters=copy.deepcopy(counters),
                            heldout=dict(heldout_metrics))
            stepped[0] = False

        def save_checkpoint() -> None:
            nonlocal last_saved
            trainable = {n: p for n, p in adapter.net.named_parameters() if p.requires_grad}
            opt_tensors, opt_plain = optimizer_to_tensors(optimizer.state_dict())
            rng_tensors, rng_plain = boundary["rng"]
            tensors = {"model": trainable, "optimizer": opt_tensors, "rng": rng_tensors}
            if ema is not None:
                tensors["ema"] = ema.shadow
            state = {"iteration": boundary["iteration"], "counters": _json_safe(boundary["counters"]),
                     "heldout": _json_safe(boundary["heldout"]), "optimizer": opt_plain, "rng": rng_plain}
            write_checkpoint(checkpoints, boundary["iteration"], tensors, state, fault_hook=hook)
            last_saved = boundary["iteration"]
            shutil.rmtree(run / PREVIOUS_BEST, ignore_errors=True)  # best/ is committed by this checkpoint
            hook("after_checkpoint")
            prune_checkpoints(checkpoints, config.keep_checkpoints)

        wandb_run = None
        if config.wandb:
            import wandb

            wandb_run = wandb.init(project=config.wandb_project, config=to_dict(config), dir=str(run), resume="allow")
        log = MetricsLog(run, start_iteration=start, wandb_run=wandb_run)
        (run / "samples").mkdir(exist_ok=True)

        def held_out(iteration: int) -> dict:
            context = ema.applied(adapter.net) if ema is not None else contextlib.nullcontext()
            try:
                with context:
                    metrics, images = evaluate(adapter, rewards, config.prompts.eval, config.eval.samples_per_prompt,
                                               config.eval.seed, config.eval.solver, config.eval.steps, parts.shift)
            except FloatingPointError as error:  # a NaN/inf held-out score: no held-out metrics this time
                warnings.warn(f"held-out evaluation after iteration {iteration} skipped: {error}")
                return {}
            save_grid(images[:, :8], run / "samples" / f"iter-{iteration:06d}.png", row_labels=list(config.prompts.eval))
            return metrics

        def export(folder_name: str, extra: dict) -> None:
            context = ema.applied(adapter.net) if ema is not None else contextlib.nullcontext()
            tmp = run / f".tmp-{folder_name}"
            shutil.rmtree(tmp, ignore_errors=True)
            with context:  # the adapter writes its own export format (a LoRA it merges or saves beside the weights)
                adapter.save(tmp, extra=extra)
            target, previous = run / folder_name, run / PREVIOUS_BEST
            committed = _export_iteration(target)
            if (folder_name == "best" and target.is_dir() and not previous.exists() and committed is not None
                    and last_saved is not None and committed <= last_saved):
                os.replace(target, previous)  # keep the committed best until a checkpoint commits this one
            else:
                _remove_tree(target)
            os.replace(tmp, target)

        calls = ModelCallCounter(adapter.net)
        step_hook = optimizer.register_step_pre_hook(lambda *args: stepped.__setitem__(0, True))
        eval_before = {}
        if start == 0:
            eval_before = held_out(0)
            calls.reset()
            atomic_write_text(run / "eval_before.json", json.dumps(eval_before, indent=2))
            log.log(0, {f"heldout/{k}": v for k, v in eval_before.items()})
        elif (run / "eval_before.json").is_file():
            eval_before = json.loads((run / "eval_before.json").read_text())

        bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc="align",
                   unit="it", disable=not progress, dynamic_ncols=True)
        mark_boundary(start)
        try:
            with _DeferredInterrupt() as interrupt:
                for iteration in bar:
                    tick = time.perf_counter()
                    hook("iteration_start")
                    values, skipped = train_iteration(config, adapter, rewards, algorithm, optimizer, params, ema,
                                                      reference_velocity, train_prompts, iteration, hook)
                    rollout_evals, train_evals = calls.reset()
                    counters["model_evals"] += rollout_evals + 3 * train_evals
                    values.update({"model_evals_rollout": float(rollout_evals),
                                   "model_evals_train": float(3 * train_evals),
                                   "model_evals_per_iter": float(rollout_evals + 3 * train_evals),
                                   "s_per_iter": time.perf_counter() - tick})
                    abort = False
                    if skipped:
                        counters["nonfinite_in_row"] += 1
                        counters["nonfinite_total"] += 1
                        warnings.warn(f"iteration {iteration + 1}: update skipped, non-finite {skipped} "
                                      f"({counters['nonfinite_in_row']} in a row, {counters['nonfinite_total']} in all)")
                        abort = counters["nonfinite_in_row"] >= config.max_nonfinite_in_row
                    else:
                        counters["nonfinite_in_row"] = 0
                    values["skipped_updates_total"] = float(counters["nonfinite_total"])
                    done = iteration + 1
                    if not abort and ((config.eval.every and done % config.eval.every == 0) or done == config.iterations):
                        heldout_metrics = held_out(done)
                        calls.reset()
                        values.update({f"heldout/{k}": v for k, v in heldout_metrics.items()})
                        if heldout_metrics.get("reward", -math.inf) > counters["best_heldout"]:
                            counters["best_heldout"], counters["best_iteration"] = heldout_metrics["reward"], done
                            export("best", {"iteration": done, "heldout": heldout_metrics})
                    log.log(done, values)
                    mark_boundary(done)
                    hook("after_log")
                    reward_mean = values.get("reward_mean", math.nan)
                    bar.set_postfix(reward=f"{reward_mean:.3f}",
                                    heldout=f"{counters['best_heldout']:.3f}" if counters["best_heldout"] > -math.inf else "-")
                    if done % config.checkpoint_every == 0 or done == config.iterations or abort or interrupt.requested:
                        save_checkpoint()
                    if abort:
                        raise TrainingAborted(
                            f"{counters['nonfinite_in_row']} updates in a row had NaN/inf ({skipped}); stopping "
                            f"(max_nonfinite_in_row={config.max_nonfinite_in_row}). Lower optim.lr or check the reward; "
                            f"the state after iteration {done} is saved in {str(checkpoints / f'iter-{done:06d}')!r}.")
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except BaseException as error:
            if not stepped[0] and boundary["iteration"] > 0 and boundary["iteration"] != last_saved:
                try:  # nothing was updated since the boundary: its state is exact, keep it
                    save_checkpoint()
                except Exception as save_error:
                    warnings.warn(f"could not save a checkpoint after {type(error).__name__}: {save_error}")
            where = (f"resume continues from the checkpoint after iteration {last_saved} "
                     f"({str(checkpoints / f'iter-{last_saved:06d}')!r})" if last_saved is not None
                     else "no checkpoint yet, so resume starts over")
            print(f"ngrpo: the run stopped ({type(error).__name__}) with {boundary['iteration']} iterations complete; "
                  f"{where}. Continue with `ngrpo train --resume {run}`.", file=sys.stderr, flush=True)
            log.close()
            raise
        finally:
            calls.remove()
            step_hook.remove()
        eval_after = heldout_metrics or (json.loads((run / "eval_after.json").read_text()) if (run / "eval_after.json").is_file() else {})
        export("aligned", {"iterations": config.iterations, "heldout": eval_after, "algorithm": config.algorithm})
        atomic_write_text(run / "eval_after.json", json.dumps(eval_after, indent=2))
        xs, ys = log.series("reward_mean")
        hx, hy = log.series("heldout/reward")
        plot_curves({"training reward (rollouts)": (xs, ys), "held-out reward": (hx, hy)}, run / "reward_curve.png",
                    "iteration", "reward", f"{config.algorithm}: reward")
        log.close()
        return TrainResult(run, config.iterations, eval_before, eval_after, time.perf_counter() - started)


def train_iteration(config: TrainConfig, adapter, rewards, algorithm, optimizer, params, ema, reference_velocity,
                     train_prompts: list[str], iteration: int, hook) -> tuple[dict[str, float], str]:
    """One rollout batch and its optimizer steps. Returns logged values and why the update was skipped ('' if not)."""
    prompts, indices = prompt_batch(train_prompts, config.seed, iteration, config.prompts_per_iteration)
    cond = adapter.encode_prompts(prompts)
    rollout = algorithm.rollout(adapter.velocity, cond, prompts, indices, iteration, adapter.latent_shape(), adapter.device)
    P, G = rollout.final.shape[:2]
    images = adapter.decode(rollout.final.flatten(0, 1))
    try:
        scores = {k: v.view(P, G) for k, v in rewards.score(images, [p for p in prompts for _ in range(G)]).items()}
    except FloatingPointError as error:  # NaN/inf scores: a numerical fault, the update is skipped (and counted)
        return {}, f"reward scores: {error}"
    total = rewards.total(scores)
    values = {"reward_mean": float(total.mean()), "reward_std": float(total.std(dim=-1, correction=0).mean()),
              "zero_variance_groups": float((total.std(dim=-1) < 1e-6).float().mean())}
    values.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
    values["out_of_range_train"] = float(((images < -0.1) | (images > 1.1)).float().mean())
    advantages = combine_reward_advantages(scores, rewards.weights, config.reward_normalization, algorithm.advantages)
    advantages, clipped_share = algorithm.clip(advantages)
    values["adv_clipped_share"] = clipped_share
    if not _is_finite(total, advantages):
        return values, "rewards or advantages"
    hook("after_rollout")
    batches = algorithm.minibatches(rollout, iteration)
    rollout = algorithm.prepare_old_policy(adapter.velocity, rollout, batches)
    stats: list[dict] = []
    skipped = ""
    max_norm = config.optim.max_grad_norm or float("inf")
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, batch_stats = algorithm.loss(adapter.velocity, rollout, advantages, batch, reference_velocity)
        if not _is_finite(loss):
            skipped = "loss"
            break
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not _is_finite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            skipped = "gradients"
            break
        optimizer.step()
        if ema is not None:
            ema.update(adapter.net)
        stats.append({**batch_stats, "loss": float(loss.detach()), "grad_norm": float(grad_norm)})
        hook("after_optimizer_step")
    if stats:
        values.update({k: sum(s[k] for s in stats) / len(stats) for k in stats[0]})
    return values, skipped
