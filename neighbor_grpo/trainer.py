"""The training loop, written out once: rollout -> reward -> advantages -> K optimizer steps, for any algorithm."""

from __future__ import annotations

import copy
import json
import math
import platform
import subprocess
import sys
import time
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
from neighbor_grpo.io import atomic_write_text, save_safetensors
from neighbor_grpo.logs import MetricsLog, plot_curves, save_grid
from neighbor_grpo.lora import EMA, apply_lora, is_lora, lora_state_dict, make_reference_velocity, merged_copy
from neighbor_grpo.models import load_adapter
from neighbor_grpo.monitors import evaluate
from neighbor_grpo.noise import keyed_generator
from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.runfolder import RunFolder

ROLE_PROMPTS = 9_000_001


class TrainingAborted(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    eval_before: dict
    eval_after: dict
    seconds: float


def load_model(path: str, device: str, progress: bool = True):
    """A model adapter from a checkpoint folder, or the built-in base model (built and cached on first use)."""
    if path == "builtin:digits":
        from neighbor_grpo.pretrain import ensure_base_model

        path = str(ensure_base_model(progress=progress))
    return load_adapter(path, device=device)


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


def build_training_parts(config: TrainConfig, adapter) -> TrainingParts:
    """LoRA (if asked), the reference velocity, AdamW over the trainable parameters, EMA and the algorithm."""
    frozen = None
    if config.optim.finetune == "lora":
        adapter.net = apply_lora(adapter.net, config.optim.lora_rank, config.optim.lora_alpha, config.optim.lora_targets)
    elif getattr(config.algorithm_config, "ref_beta", 0) > 0 or getattr(config.algorithm_config, "kl_beta", 0) > 0:
        frozen = copy.deepcopy(adapter.net).requires_grad_(False)
    params = [p for p in adapter.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                                  weight_decay=config.optim.weight_decay)
    ema = EMA(adapter.net, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
    algorithm = ALGORITHMS[config.algorithm](config.algorithm_config, seed=config.seed)
    return TrainingParts(params, optimizer, ema, algorithm, make_reference_velocity(adapter, frozen))


def _is_finite(*values: torch.Tensor | float) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True, fault_hook: Callable[[str], None] | None = None,
          adapter=None, rewards=None) -> TrainResult:
    """Align a model with the configured algorithm and rewards; writes everything into `run_dir`.

    `adapter` and `rewards` may be passed in code (Python API); otherwise they are built from the config.
    `fault_hook(point)` is called at named points (tests use it to kill the process there).
    """
    hook = fault_hook or (lambda point: None)
    started = time.perf_counter()
    with RunFolder(run_dir, resume=resume, overwrite=overwrite) as folder:
        run = folder.path
        device = torch.device(config.device)
        if resume:
            saved = yaml.safe_load((run / "config.yaml").read_text())
            if saved != to_dict(config):
                changed = sorted(k for k in set(saved) | set(to_dict(config)) if saved.get(k) != to_dict(config).get(k))
                raise ValueError(f"--resume {str(run)!r}: the config differs from the run's config.yaml in {changed}; "
                                 "resume with the same config (or start a new run)")
        else:
            atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
            atomic_write_text(run / "run.json", json.dumps(run_metadata(config), indent=2))

        adapter = adapter or load_model(config.model.path, config.device, progress)
        adapter.net.to(device)
        if not (run / "base" / "model.json").is_file():
            adapter.save(run / "base")
        rewards = rewards or build_rewards([to_dict(r) for r in config.rewards], device=device)
        train_prompts = read_prompts(config)

        parts = build_training_parts(config, adapter)
        params, optimizer, ema, algorithm, reference_velocity = (parts.params, parts.optimizer, parts.ema,
                                                                  parts.algorithm, parts.reference_velocity)

        start, counters = 0, {"nonfinite_in_row": 0, "nonfinite_total": 0, "best_heldout": -math.inf, "model_evals": 0}
        checkpoints = run / "checkpoints"
        if resume:
            latest = latest_good_checkpoint(checkpoints)
            if latest is not None:
                tensors, state = read_checkpoint(latest)
                adapter.net.load_state_dict(tensors["model"], strict=False)
                optimizer.load_state_dict(optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
                if ema is not None:
                    ema.shadow = {k: v.to(device) for k, v in tensors["ema"].items()}
                restore_rng(tensors["rng"], state["rng"])
                start, counters = state["iteration"], state["counters"]

        def save_checkpoint(iteration: int) -> None:
            trainable = {n: p for n, p in adapter.net.named_parameters() if p.requires_grad}
            opt_tensors, opt_plain = optimizer_to_tensors(optimizer.state_dict())
            rng_tensors, rng_plain = capture_rng()
            tensors = {"model": trainable, "optimizer": opt_tensors, "rng": rng_tensors}
            if ema is not None:
                tensors["ema"] = ema.shadow
            write_checkpoint(checkpoints, iteration, tensors,
                             {"iteration": iteration, "counters": counters, "optimizer": opt_plain, "rng": rng_plain},
                             fault_hook=hook)
            hook("after_checkpoint")
            prune_checkpoints(checkpoints, config.keep_checkpoints)

        wandb_run = None
        if config.wandb:
            import wandb

            wandb_run = wandb.init(project=config.wandb_project, config=to_dict(config), dir=str(run), resume="allow")
        log = MetricsLog(run, start_iteration=start, wandb_run=wandb_run)
        (run / "samples").mkdir(exist_ok=True)

        def held_out(iteration: int) -> dict:
            context = ema.applied(adapter.net) if ema is not None else _nullcontext()
            with context:
                metrics, images = evaluate(adapter, rewards, config.prompts.eval, config.eval.samples_per_prompt,
                                           config.eval.seed, config.eval.solver, config.eval.steps, config.algorithm_config.shift)
            save_grid(images[:, :8], run / "samples" / f"iter-{iteration:06d}.png", row_labels=list(config.prompts.eval))
            return metrics

        def export(folder_name: str, extra: dict) -> None:
            context = ema.applied(adapter.net) if ema is not None else _nullcontext()
            with context:
                merged = merged_copy(adapter.net)
                lora = lora_state_dict(adapter.net) if is_lora(adapter.net) else None
            exported = type(adapter)(merged)
            tmp = run / f".tmp-{folder_name}"
            exported.save(tmp, extra=extra)
            if lora is not None:
                save_safetensors(lora, tmp / "lora.safetensors")
            target = run / folder_name
            if target.exists():
                import shutil

                shutil.rmtree(target)
            tmp.rename(target)

        calls = ModelCallCounter(adapter.net)
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
        heldout_metrics: dict = {}
        try:
            for iteration in bar:
                tick = time.perf_counter()
                hook("iteration_start")
                values, skipped = train_iteration(config, adapter, rewards, algorithm, optimizer, params, ema,
                                                   reference_velocity, train_prompts, iteration, hook)
                rollout_evals, train_evals = calls.reset()
                counters["model_evals"] += rollout_evals + 3 * train_evals
                values.update({"model_evals_rollout": float(rollout_evals), "model_evals_train": float(3 * train_evals),
                               "model_evals_per_iter": float(rollout_evals + 3 * train_evals),
                               "s_per_iter": time.perf_counter() - tick})
                if skipped:
                    counters["nonfinite_in_row"] += 1
                    counters["nonfinite_total"] += 1
                    if counters["nonfinite_in_row"] >= config.max_nonfinite_in_row:
                        save_checkpoint(iteration)
                        raise TrainingAborted(f"{counters['nonfinite_in_row']} updates in a row had NaN/inf ({skipped}); "
                                              f"stopping (max_nonfinite_in_row={config.max_nonfinite_in_row}). "
                                              "Lower optim.lr or check the reward.")
                else:
                    counters["nonfinite_in_row"] = 0
                values["skipped_updates_total"] = float(counters["nonfinite_total"])
                done = iteration + 1
                if (config.eval.every and done % config.eval.every == 0) or done == config.iterations:
                    heldout_metrics = held_out(done)
                    calls.reset()
                    values.update({f"heldout/{k}": v for k, v in heldout_metrics.items()})
                    if heldout_metrics["reward"] > counters["best_heldout"]:
                        counters["best_heldout"] = heldout_metrics["reward"]
                        export("best", {"iteration": done, "heldout": heldout_metrics})
                log.log(done, values)
                hook("after_log")
                bar.set_postfix(reward=f"{values['reward_mean']:.3f}",
                                heldout=f"{counters['best_heldout']:.3f}" if counters["best_heldout"] > -math.inf else "-")
                if done % config.checkpoint_every == 0 or done == config.iterations:
                    save_checkpoint(done)
        except KeyboardInterrupt:
            save_checkpoint(iteration)
            log.close()
            raise
        finally:
            calls.remove()
        eval_after = heldout_metrics or (json.loads((run / "eval_after.json").read_text()) if (run / "eval_after.json").is_file() else {})
        export("aligned", {"iterations": config.iterations, "heldout": eval_after, "algorithm": config.algorithm})
        atomic_write_text(run / "eval_after.json", json.dumps(eval_after, indent=2))
        xs, ys = log.series("reward_mean")
        hx, hy = log.series("heldout/reward")
        plot_curves({"training reward (rollouts)": (xs, ys), "held-out reward": (hx, hy)}, run / "reward_curve.png",
                    "iteration", "reward", f"{config.algorithm}: reward")
        log.close()
        return TrainResult(run, config.iterations, eval_before, eval_after, time.perf_counter() - started)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train_iteration(config: TrainConfig, adapter, rewards, algorithm, optimizer, params, ema, reference_velocity,
                     train_prompts: list[str], iteration: int, hook) -> tuple[dict[str, float], str]:
    """One rollout batch and its optimizer steps. Returns logged values and why the update was skipped ('' if not)."""
    prompts, indices = prompt_batch(train_prompts, config.seed, iteration, config.prompts_per_iteration)
    cond = adapter.encode_prompts(prompts)
    rollout = algorithm.rollout(adapter.velocity, cond, prompts, indices, iteration, adapter.latent_shape(), adapter.device)
    P, G = rollout.final.shape[:2]
    images = adapter.decode(rollout.final.flatten(0, 1))
    scores = {k: v.view(P, G) for k, v in rewards.score(images, [p for p in prompts for _ in range(G)]).items()}
    total = rewards.total(scores)
    values = {"reward_mean": float(total.mean()), "reward_std": float(total.std(dim=-1, correction=0).mean()),
              "zero_variance_groups": float((total.std(dim=-1) < 1e-6).float().mean())}
    values.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
    values["out_of_range_train"] = float(((images < -0.1) | (images > 1.1)).float().mean())
    advantages = combine_reward_advantages(scores, rewards.weights, config.reward_normalization, algorithm.advantages)
    advantages, clipped_share = algorithm.clip(advantages)
    values["adv_clipped_share"] = clipped_share
    if not _is_finite(total, advantages):
        return values, "reward or advantages"
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
