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
from neighbor_grpo.checkpoint import (capture_rng, checkpoint_to_resume, optimizer_from_tensors, optimizer_to_tensors,
                                      prune_checkpoints, read_checkpoint, restore_rng, write_checkpoint)
from neighbor_grpo.config import ConfigError, TrainConfig, from_dict, to_dict
from neighbor_grpo.distributed import (SINGLE_PROCESS, BatchPart, Processes, all_true, any_process, barrier,
                                       batch_part, broadcast_object, check_batch_fits, full_tensor, gather_block,
                                       gather_candidates, global_means, gradient_sync, init_processes,
                                       main_process_first, member_block, parallel_net, shard_in_place, shard_like,
                                       sum_over_processes, velocity_through)
from neighbor_grpo.io import atomic_write_text
from neighbor_grpo.logs import MetricsLog, plot_curves, save_grid
from neighbor_grpo.lora import EMA, apply_lora, make_reference_velocity
from neighbor_grpo.models import load_adapter, model_default_shift, net_swapped
from neighbor_grpo.monitors import evaluate
from neighbor_grpo.noise import keyed_generator
from neighbor_grpo.prompts import resolve_prompt_sets
from neighbor_grpo.rewards import WeightedRewards, build_rewards
from neighbor_grpo.runfolder import RunFolder, RunFolderError
from neighbor_grpo.speed import (allow_tf32, autocast_velocity, compile_in_place, enable_gradient_checkpointing,
                                 make_grad_scaler, make_optimizer)

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
    """The training prompts: `prompts.train`, or `prompts.file` without its held-out split."""
    return resolve_prompt_sets(config.prompts)[0]


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
    nets (a full fine-tune's frozen reference copy) count too: their passes cost the same."""

    def __init__(self, net: torch.nn.Module, *extra: torch.nn.Module | None):
        self.train = 0
        self.no_grad = 0
        self._handles = [module.register_forward_hook(self._count) for module in (net, *extra) if module is not None]

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
        for handle in self._handles:
            handle.remove()


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
    velocity: Callable | None = None
    """v(x, s, cond) for no-grad passes (rollouts, old policy, held-out samples): adapter.velocity under autocast."""
    train_velocity: Callable | None = None
    """v(x, s, cond) for training passes: through DDP (or the FSDP-sharded net) and autocast."""
    train_module: torch.nn.Module | None = None
    """The module whose gradients are synchronised over processes (the DDP wrapper, or the sharded net)."""
    processes: Processes = SINGLE_PROCESS
    scaler: object | None = None
    """torch.amp.GradScaler for speed.mixed_precision=fp16, else None."""
    export_net: torch.nn.Module | None = None
    """FSDP, main process: an unsharded CPU copy of the net that exports and checkpoints load the gathered weights into."""
    reference_net: torch.nn.Module | None = None
    """The frozen copy behind reference_velocity in full fine-tunes (None with LoRA: the net with adapters off)."""


def model_shift(config: TrainConfig, adapter) -> float:
    """The rollout/evaluation grid's shift: the config's value, else the adapter's default (1 if it has none)."""
    if config.algorithm_config.shift is not None:
        return float(config.algorithm_config.shift)
    return model_default_shift(adapter)


def lora_targets(config: TrainConfig, adapter) -> list[str]:
    """optim.lora_targets, or the adapter's own default targets when the config leaves the built-in model's."""
    from neighbor_grpo.config import OptimConfig

    default = getattr(adapter, "default_lora_targets", None)
    if config.optim.lora_targets == OptimConfig().lora_targets and callable(default):
        return list(default())
    return list(config.optim.lora_targets)


def build_training_parts(config: TrainConfig, adapter, processes: Processes = SINGLE_PROCESS) -> TrainingParts:
    """LoRA (if asked), the reference velocity, speed settings, DDP/FSDP over `processes`, the optimizer over the
    trainable parameters, EMA and the algorithm."""
    speed = config.speed
    frozen = None
    if config.optim.finetune == "lora":
        with torch.random.fork_rng(devices=[]):  # LoRA's random init keyed by the seed, not by the global RNG's state
            torch.manual_seed(config.seed)
            adapter.net = apply_lora(adapter.net, config.optim.lora_rank, config.optim.lora_alpha, lora_targets(config, adapter))
    elif getattr(config.algorithm_config, "ref_beta", 0) > 0 or getattr(config.algorithm_config, "kl_beta", 0) > 0:
        frozen = copy.deepcopy(adapter.net).requires_grad_(False)
    allow_tf32(speed.tf32)
    if speed.gradient_checkpointing:
        enable_gradient_checkpointing(adapter)
    export_net = None
    if processes.sharded:
        export_net = copy.deepcopy(adapter.net).cpu() if processes.is_main else None
        if frozen is not None:
            shard_in_place(frozen)
    if speed.compile:
        compile_in_place(adapter.net)
    train_module = parallel_net(adapter.net, processes)
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optim.lr, (config.optim.beta1, config.optim.beta2),
                               config.optim.weight_decay, speed.optimizer)
    ema = EMA(adapter.net, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    shift = model_shift(config, adapter)
    algorithm = ALGORITHMS[config.algorithm](dataclasses.replace(config.algorithm_config, shift=shift), seed=config.seed)
    device = next(adapter.net.parameters()).device
    precision = speed.mixed_precision
    return TrainingParts(params, optimizer, ema, algorithm,
                         autocast_velocity(make_reference_velocity(adapter, frozen), precision, device), shift,
                         velocity=autocast_velocity(adapter.velocity, precision, device),
                         train_velocity=autocast_velocity(velocity_through(adapter, train_module), precision, device),
                         train_module=train_module, processes=processes,
                         scaler=make_grad_scaler(precision, device), export_net=export_net, reference_net=frozen)


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
            param.copy_(shard_like(saved[name], param))  # FSDP: this process's shard of the saved full tensor


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


class _NoLog:
    """What the other processes log: nothing (metrics, TensorBoard and wandb belong to the main process)."""

    def log(self, iteration: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _SharedFolder:
    """The run folder as the other processes see it: the main process holds the lock and prepares it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> "_SharedFolder":
        return self

    def commit(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        pass


def _prepare_run_folder(run: Path, config: TrainConfig, resume: bool, processes: Processes) -> bool:
    """Write (or, resuming, check) config.yaml and run.json. Returns whether this is a resume after all."""
    if resume and not (run / "config.yaml").is_file():
        leftovers = sorted(p.name for p in run.iterdir() if p.name != ".lock")
        if leftovers:
            raise RunFolderError(f"--resume {str(run)!r}: not a run folder (no config.yaml; it holds "
                                 f"{leftovers[:5]})")
        resume = False  # killed before it wrote anything: this is a fresh start
    if resume:
        saved = yaml.safe_load((run / "config.yaml").read_text())
        try:  # keys a newer version added are absent from an older run's config.yaml: they take their defaults
            saved = to_dict(from_dict(TrainConfig, saved))
        except (ConfigError, TypeError):
            pass  # not a config this version reads: the comparison below names the differences
        if saved != to_dict(config):
            old, new = _flatten(saved), _flatten(to_dict(config))
            changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
            raise ValueError(f"--resume {str(run)!r}: the config differs from the run's config.yaml in {changed}; "
                             "resume with the same config (or start a new run)")
        if not (run / "run.json").is_file():
            atomic_write_text(run / "run.json", json.dumps(run_metadata(config), indent=2))
    else:
        metadata = {**run_metadata(config), "processes": processes.world_size, "parallel": processes.strategy}
        atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        atomic_write_text(run / "run.json", json.dumps(metadata, indent=2))
    return resume


class _VelocityAdapter:
    """The adapter with another velocity function (autocast) for held-out sampling; everything else its own."""

    def __init__(self, adapter, velocity: Callable):
        self._adapter, self.velocity = adapter, velocity

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)


def _full_optimizer_state(optimizer: torch.optim.Optimizer, processes: Processes) -> dict:
    """The optimizer state with sharded (FSDP) moments gathered whole: checkpoints look the same on 1 or N processes."""
    state = optimizer.state_dict()
    if processes.sharded:
        state["state"] = {i: {k: full_tensor(v) for k, v in slots.items()} for i, slots in state["state"].items()}
    return state


def _optimizer_state_like(state: dict, params: list) -> dict:
    """A checkpoint's full optimizer moments cut into this process's shards (FSDP); unchanged otherwise."""
    for index, slots in state["state"].items():
        param = params[int(index)]
        for key, value in slots.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape) and value.dim() > 0:
                slots[key] = shard_like(value, param)
    return state


@contextlib.contextmanager
def _plain_net(adapter, parts: TrainingParts):
    """adapter.net as a plain, whole module for adapter.save: under FSDP every process gathers the sharded weights
    (a collective) and the main process saves them from its unsharded copy; otherwise the net itself."""
    if not parts.processes.sharded:
        yield
        return
    weights = {name: full_tensor(value) for name, value in adapter.net.state_dict().items()}
    if parts.export_net is None:  # not the main process: it only took part in the gathering
        yield
        return
    parts.export_net.load_state_dict({name: value.cpu() for name, value in weights.items()})
    with net_swapped(adapter, parts.export_net):
        yield


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, fault_hook: Callable[[str], None] | None = None,
          adapter=None, rewards=None) -> TrainResult:
    """Align a model with the configured algorithm and rewards; writes everything into `run_dir`.

    `adapter` and `rewards` may be passed in code (Python API); otherwise they are built from the config.
    `fault_hook(point)` is called at named points (tests use it to kill the process there).
    See docs/robustness.md for what survives a kill, an interrupt, a failing reward or NaNs.
    Launched on several processes (accelerate launch, torchrun; docs/distributed.md), each process rolls out
    its share of the prompt slots; only the main process evaluates, logs, exports and writes checkpoints.
    """
    hook = fault_hook or (lambda point: None)
    started = time.perf_counter()
    processes, device = init_processes(config.device, config.speed.parallel)
    check_batch_fits(config.prompts_per_iteration, processes, config.algorithm_config.group_size,
                     f"{config.algorithm}.group_size")
    main = processes.is_main
    progress = progress and main
    folder_context = RunFolder(run_dir, resume=resume, overwrite=overwrite) if main else _SharedFolder(run_dir)
    with folder_context as folder:
        run = folder.path
        if main:
            resume = _prepare_run_folder(run, config, resume, processes)
        resume = broadcast_object(resume, processes)  # the others wait here until the folder is ready

        with main_process_first(processes):  # the main process builds and caches the built-in models first
            adapter = adapter or load_model(config.model.path, str(device), progress, options=config.model)
            rewards = _with_retries(rewards or build_rewards([to_dict(r) for r in config.rewards], device=device))
        adapter.net.to(device)
        if main and not (run / "base" / "model.json").is_file():
            shutil.rmtree(run / ".tmp-base", ignore_errors=True)
            adapter.save(run / ".tmp-base")
            _remove_tree(run / "base")
            os.replace(run / ".tmp-base", run / "base")
        train_prompts, heldout_prompts = resolve_prompt_sets(config.prompts)  # the prompt file is read once
        if callable(getattr(adapter, "cache_prompts", None)):  # encoded once now: offloaded text encoders stay off
            adapter.cache_prompts(heldout_prompts)

        parts = build_training_parts(config, adapter, processes)
        params, optimizer, ema, algorithm, reference_velocity = (parts.params, parts.optimizer, parts.ema,
                                                                  parts.algorithm, parts.reference_velocity)
        run = folder.commit()  # start-up succeeded: a new run folder replaces --out only now (runfolder.py)

        start, counters, heldout_metrics = 0, _new_counters(), {}
        checkpoints = run / "checkpoints"
        last_saved: int | None = None  # iteration of the newest checkpoint this run can resume from
        if resume:
            latest = broadcast_object(checkpoint_to_resume(checkpoints) if main else None, processes)
            if latest is not None:  # every process reads the same checkpoint (a folder all of them can see)
                tensors, state = read_checkpoint(latest)
                _load_trainable(adapter.net, tensors["model"], latest)
                try:
                    optimizer.load_state_dict(_optimizer_state_like(
                        optimizer_from_tensors(tensors["optimizer"], state["optimizer"]), params))
                except (ValueError, KeyError, RuntimeError) as error:
                    raise ValueError(f"checkpoint {str(latest)!r}: its optimizer state does not fit this model "
                                     f"({error})") from error
                if ema is not None:
                    if "ema" not in tensors:
                        raise ValueError(f"checkpoint {str(latest)!r} holds no EMA weights but optim.ema_decay > 0")
                    ema.shadow = {k: shard_like(v, ema.shadow[k]) for k, v in tensors["ema"].items()}
                restore_rng(tensors["rng"], state["rng"])
                start, counters = state["iteration"], _counters_from_json(state["counters"])
                heldout_metrics = state.get("heldout") or {}
                last_saved = start
            if main:
                _tidy_for_resume(run, start, counters)
                if checkpoints.is_dir():
                    prune_checkpoints(checkpoints, config.keep_checkpoints)  # also drops half-written temporaries
                metadata = json.loads((run / "run.json").read_text())
                metadata.setdefault("resumes", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_iteration": start,
                                                           "processes": processes.world_size})
                atomic_write_text(run / "run.json", json.dumps(metadata, indent=2))
            counters = broadcast_object(counters, processes)  # tidying may have reset the best-so-far

        # The state at an iteration boundary (`iteration` done): what a checkpoint must hold. Parameters, optimizer
        # and EMA are the live ones, so the boundary is only "clean" until the next optimizer step.
        boundary: dict = {}
        stepped = [False]

        def mark_boundary(done: int) -> None:
            boundary.update(iteration=done, rng=capture_rng(), counters=copy.deepcopy(counters),
                            heldout=dict(heldout_metrics))
            stepped[0] = False

        def save_checkpoint(wait: bool = True) -> None:
            """Every process calls it (FSDP gathers the shards); the main process writes."""
            nonlocal last_saved
            if main or processes.sharded:
                trainable = {n: full_tensor(p) for n, p in adapter.net.named_parameters() if p.requires_grad}
                opt_tensors, opt_plain = optimizer_to_tensors(_full_optimizer_state(optimizer, processes))
                ema_shadow = {k: full_tensor(v) for k, v in ema.shadow.items()} if ema is not None else None
            if main:
                rng_tensors, rng_plain = boundary["rng"]
                tensors = {"model": trainable, "optimizer": opt_tensors, "rng": rng_tensors}
                if ema_shadow is not None:
                    tensors["ema"] = ema_shadow
                state = {"iteration": boundary["iteration"], "counters": _json_safe(boundary["counters"]),
                         "heldout": _json_safe(boundary["heldout"]), "optimizer": opt_plain, "rng": rng_plain}
                write_checkpoint(checkpoints, boundary["iteration"], tensors, state, fault_hook=hook)
            last_saved = boundary["iteration"]
            if main:
                shutil.rmtree(run / PREVIOUS_BEST, ignore_errors=True)  # best/ is committed by this checkpoint
                hook("after_checkpoint")
                prune_checkpoints(checkpoints, config.keep_checkpoints)
            if wait:
                barrier(processes)

        wandb_run = None
        if config.wandb and main:
            import wandb

            wandb_run = wandb.init(project=config.wandb_project, config=to_dict(config), dir=str(run), resume="allow")
        log = MetricsLog(run, start_iteration=start, wandb_run=wandb_run) if main else _NoLog()
        if main:
            (run / "samples").mkdir(exist_ok=True)
        sampler = _VelocityAdapter(adapter, parts.velocity)

        def held_out(iteration: int) -> dict:
            """The main process evaluates (under FSDP all take part in the forward passes); all get the metrics."""
            metrics = {}
            if main or processes.sharded:
                context = ema.applied(adapter.net) if ema is not None else contextlib.nullcontext()
                try:
                    with context:
                        metrics, images = evaluate(sampler, rewards, heldout_prompts, config.eval.samples_per_prompt,
                                                   config.eval.seed, config.eval.solver, config.eval.steps, parts.shift)
                    if main:
                        save_grid(images[:16, :8], run / "samples" / f"iter-{iteration:06d}.png",
                                  row_labels=list(heldout_prompts[:16]))
                except FloatingPointError as error:  # a NaN/inf held-out score: no held-out metrics this time
                    warnings.warn(f"held-out evaluation after iteration {iteration} skipped: {error}")
                    metrics = {}
            return broadcast_object(metrics, processes)

        def export(folder_name: str, extra: dict) -> None:
            extra = {**extra, "run_config": to_dict(config)}
            context = ema.applied(adapter.net) if ema is not None else contextlib.nullcontext()
            tmp = run / f".tmp-{folder_name}"
            with context, _plain_net(adapter, parts):
                if main:  # the adapter writes its own export format (a LoRA it merges or saves beside the weights)
                    shutil.rmtree(tmp, ignore_errors=True)
                    adapter.save(tmp, extra=extra)
            if main:
                target, previous = run / folder_name, run / PREVIOUS_BEST
                committed = _export_iteration(target)
                if (folder_name == "best" and target.is_dir() and not previous.exists() and committed is not None
                        and last_saved is not None and committed <= last_saved):
                    os.replace(target, previous)  # keep the committed best until a checkpoint commits this one
                else:
                    _remove_tree(target)
                os.replace(tmp, target)
            barrier(processes)

        calls = ModelCallCounter(adapter.net, parts.reference_net)
        step_hook = optimizer.register_step_pre_hook(lambda *args: stepped.__setitem__(0, True))
        eval_before = {}
        if start == 0:
            eval_before = held_out(0)
            calls.reset()
            if main:
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
                                                      reference_velocity, train_prompts, iteration, hook, parts=parts)
                    rollout_evals, train_evals = (int(n) for n in sum_over_processes(list(calls.reset()), processes))
                    counters["model_evals"] += rollout_evals + 3 * train_evals
                    values.update({"model_evals_rollout": float(rollout_evals),
                                   "model_evals_train": float(3 * train_evals),
                                   "model_evals_per_iter": float(rollout_evals + 3 * train_evals),
                                   "s_per_iter": time.perf_counter() - tick})
                    abort = False
                    if skipped:
                        counters["nonfinite_in_row"] += 1
                        counters["nonfinite_total"] += 1
                        if main:
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
                    stop = any_process(interrupt.requested, processes)  # Ctrl-C reaches the processes at different moments
                    if done % config.checkpoint_every == 0 or done == config.iterations or abort or stop:
                        save_checkpoint()
                    if abort:
                        raise TrainingAborted(
                            f"{counters['nonfinite_in_row']} updates in a row had NaN/inf ({skipped}); stopping "
                            f"(max_nonfinite_in_row={config.max_nonfinite_in_row}). Lower optim.lr or check the reward; "
                            f"the state after iteration {done} is saved in {str(checkpoints / f'iter-{done:06d}')!r}.")
                    if stop:
                        raise KeyboardInterrupt
        except BaseException as error:
            # an emergency save needs no other process (with FSDP it would: the shards are gathered)
            if (not stepped[0] and boundary["iteration"] > 0 and boundary["iteration"] != last_saved
                    and not processes.sharded):
                try:  # nothing was updated since the boundary: its state is exact, keep it
                    save_checkpoint(wait=False)
                except Exception as save_error:
                    warnings.warn(f"could not save a checkpoint after {type(error).__name__}: {save_error}")
            if main:
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
        if main:
            atomic_write_text(run / "eval_after.json", json.dumps(eval_after, indent=2))
            xs, ys = log.series("reward_mean")
            hx, hy = log.series("heldout/reward")
            plot_curves({"training reward (rollouts)": (xs, ys), "held-out reward": (hx, hy)}, run / "reward_curve.png",
                        "iteration", "reward", f"{config.algorithm}: reward")
        log.close()
        barrier(processes)  # no process returns before the main one has written everything
        return TrainResult(run, config.iterations, eval_before, eval_after, time.perf_counter() - started)


# Stats that are maxima, or that every process already agrees on (the gradient norm is taken after averaging).
MAX_OR_SHARED_STATS = ("ratio_max_dev", "grad_norm")


def train_iteration(config: TrainConfig, adapter, rewards, algorithm, optimizer, params, ema, reference_velocity,
                     train_prompts: list[str], iteration: int, hook,
                     parts: TrainingParts | None = None) -> tuple[dict[str, float], str]:
    """One rollout batch and its optimizer steps. Returns logged values (of the whole global batch) and why the
    update was skipped ('' if not). `parts` (from build_training_parts) brings the split over processes,
    DDP/FSDP, mixed precision and the fp16 gradient scaler; without it, one process."""
    processes = parts.processes if parts is not None else SINGLE_PROCESS
    velocity = parts.velocity if parts is not None else adapter.velocity
    train_velocity = parts.train_velocity if parts is not None else adapter.velocity
    scaler = parts.scaler if parts is not None else None
    all_prompts, all_indices = prompt_batch(train_prompts, config.seed, iteration, config.prompts_per_iteration)
    count, group_size = len(all_prompts), algorithm.config.group_size
    # this process's groups, or its block of one group when there are fewer prompts than processes; the slot and
    # candidate numbers key the noises, so the blocks together roll out what one process would
    part = batch_part(count, group_size, processes.rank, processes.world_size)
    slots = part.prompts
    prompts, indices = all_prompts[slots.start:slots.stop], all_indices[slots.start:slots.stop]
    cond = adapter.encode_prompts(prompts)
    # all of this process's candidates in one batch, without autograd bookkeeping; FSDP's gathered-weight buffers
    # are reused by the training passes, so they must not become inference tensors: no_grad there
    block = {} if part.candidates is None else {"candidates": slice(part.candidates.start, part.candidates.stop)}
    with torch.no_grad() if processes.sharded else torch.inference_mode():
        rollout = algorithm.rollout(velocity, cond, prompts, indices, iteration, adapter.latent_shape(), adapter.device,
                                    **block)
    P, g = rollout.final.shape[:2]  # g = G unless the group spans processes
    with torch.no_grad():
        images = adapter.decode(rollout.final.flatten(0, 1))
        fault = ""
        try:
            local_scores = {k: v.view(P, g) for k, v in rewards.score(images, [p for p in prompts for _ in range(g)]).items()}
        except FloatingPointError as error:  # NaN/inf scores: a numerical fault, the update is skipped (and counted)
            fault = str(error)
    if any_process(bool(fault), processes):  # every process skips together
        return {}, f"reward scores: {fault or 'non-finite on another process'}"
    # the whole batch's rewards on every process: advantages (per group, or batch-wide) and metrics as in one process
    scores = {k: gather_block(v, part, count, group_size, processes) for k, v in local_scores.items()}
    total = rewards.total(scores)
    values = {"reward_mean": float(total.mean()), "reward_std": float(total.std(dim=-1, correction=0).mean()),
              "zero_variance_groups": float((total.std(dim=-1) < 1e-6).float().mean())}
    values.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
    values.update(global_means({"out_of_range_train": ((images < -0.1) | (images > 1.1)).float().mean()},
                               part.candidate_share(count, group_size), processes))
    if count < processes.world_size:
        # a group split over processes: the leaping policy needs all G next states, the SDE losses their members'
        rollout = whole_group(rollout, part, count, group_size, processes)
    advantages = combine_reward_advantages(scores, rewards.weights, config.reward_normalization, algorithm.advantages)
    advantages, clipped_share = algorithm.clip(advantages)
    values["adv_clipped_share"] = clipped_share
    if not _is_finite(total, advantages):
        return values, "rewards or advantages"
    advantages = advantages[slots.start:slots.stop]
    hook("after_rollout")
    # the same minibatches as one process; of a shared prompt, each process trains its block of the members
    batches = [own_members(batch, part, count) for batch in algorithm.minibatches(rollout, iteration)]
    rollout = algorithm.prepare_old_policy(velocity, rollout, [batch for batch, _ in batches])
    records: list[dict] = []
    shares: list[float] = []
    skipped, fp16_overflows = "", 0
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
        records.append({**batch_stats, "loss": loss.detach(), "grad_norm": grad_norm.detach()})
        shares.append(share)
        hook("after_optimizer_step")
    if scaler is not None:
        values["fp16_overflow_steps"] = float(fp16_overflows)
    if records:  # read to the host once, after the optimizer loop
        values.update(global_step_means(records, shares, processes))
    return values, skipped


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
        return global_means(_mean_over_steps(records), shares[0], processes, same_everywhere=MAX_OR_SHARED_STATS)
    weighted = [{key: value if key in MAX_OR_SHARED_STATS else value * share for key, value in record.items()}
                for record, share in zip(records, shares)]
    return global_means(_mean_over_steps(weighted), 1.0, processes, same_everywhere=MAX_OR_SHARED_STATS)


def _mean_over_steps(records: list[dict]) -> dict[str, torch.Tensor]:
    """Each logged value's mean over the optimizer steps; tensors stay on their device (no sync here)."""
    means = {}
    for key in records[0]:
        column = [record[key] for record in records]
        if isinstance(column[0], torch.Tensor):
            means[key] = torch.stack(column).double().mean()
        else:
            means[key] = torch.tensor(sum(column) / len(column), dtype=torch.float64)
    return means


def accumulate_gradients(algorithm, velocity, rollout, advantages: torch.Tensor, batch, reference_velocity,
                         weight: float, micro_batch: int | None, module: torch.nn.Module | None,
                         scaler=None, passes: int = 1) -> tuple[torch.Tensor, dict]:
    """The minibatch's loss over this process's groups, backpropagated in passes of `micro_batch` prompts
    (gradients accumulate; only the last pass synchronises them over processes). Every pass's loss is a mean over
    its prompts, so weighting it by its prompt share gives exactly the one-pass gradient. At least `passes` passes:
    a process with fewer prompts repeats its last one with weight 0, because FSDP gathers the weights in every
    forward and all processes must take part. Returns the loss and the algorithm's stats, as means over this
    process's groups."""
    P = len(rollout.prompts)
    size = P if not micro_batch else min(micro_batch, P)
    chunks = [range(start, min(start + size, P)) for start in range(0, P, size)]
    chunks += [chunks[-1]] * (passes - len(chunks))  # the repeats carry weight 0 (below)
    total, stats = 0.0, {}
    for number, rows in enumerate(chunks):
        part = len(rows) / P if number * size < P else 0.0
        pieces = (rollout, advantages, batch) if len(chunks) == 1 else select_prompts(rollout, advantages, batch, rows)
        with gradient_sync(module, enabled=number == len(chunks) - 1) if module is not None else contextlib.nullcontext():
            loss, pass_stats = algorithm.loss(velocity, *pieces, reference_velocity)
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
