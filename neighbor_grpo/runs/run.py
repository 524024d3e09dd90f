"""A run's life beside the training loop: its folder (locked, prepared or resumed, tidied), its logs, held-out
evaluations, exports (base/, best/, aligned/) and checkpoints. Only the main process writes; every method is
called by every process, because under FSDP evaluation, export and checkpoints gather the sharded weights."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from neighbor_grpo.runs.checkpoint import checkpoint_to_resume, prune_checkpoints
from neighbor_grpo.config.train_config import TrainConfig, to_dict
from neighbor_grpo.parallel.distributed import Processes, all_true, barrier, broadcast_object
from neighbor_grpo.parallel.wrapping import full_tensor
from neighbor_grpo.runs.exports import write_manifest
from neighbor_grpo.training.guards import NonFiniteModel, NonFiniteWeights, TrainingAborted, all_finite, check_effective, training_state
from neighbor_grpo.runs.io import atomic_write_text
from neighbor_grpo.training.logs import MetricsLog, plot_curves, save_grid
from neighbor_grpo.models import net_swapped
from neighbor_grpo.training.monitors import NonFiniteSamples, evaluate
from neighbor_grpo.training.parts import TrainingParts
from neighbor_grpo.runs.resume import input_fingerprint, recovery, resume_config
from neighbor_grpo.runs.run_files import PREVIOUS_BEST, export_iteration, prepare_run_folder, remove_tree, tidy_for_resume
from neighbor_grpo.runs.runfolder import RunFolder
from neighbor_grpo.runs.training_state import TrainingState, load_state, new_counters, save_state

class _NoLog:
    """What the other processes log: nothing (metrics, TensorBoard and wandb belong to the main process)."""

    def log(self, iteration: int, values: dict) -> None:
        pass

    def series(self, key: str) -> tuple[list, list]:
        return [], []

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


class _VelocityAdapter:
    """The adapter with another velocity function (autocast) for held-out sampling; everything else its own."""

    def __init__(self, adapter, velocity: Callable):
        self._adapter, self.velocity = adapter, velocity

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)


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


@contextlib.contextmanager
def open_run(run_dir: str | Path, config: TrainConfig, processes: Processes, resume: bool, overwrite: bool,
             hook: Callable[[str], None], accept_changes: dict | None = None):
    """The run folder, locked by the main process and prepared before the others go on. Resuming, the checkpoint
    to continue from is chosen and the config checked against the inputs it recorded (resume.resume_config):
    `run.config` is the config the run continues with (with `accept_changes` applied)."""
    if accept_changes and not resume:
        raise ValueError("accept_changes (--accept-changes) applies to a resumed run only (resume=True, --resume)")
    main, latest = processes.is_main, None
    with (RunFolder(run_dir, resume=resume, overwrite=overwrite) if main else _SharedFolder(run_dir)) as folder:
        if main:
            resume = prepare_run_folder(folder.path, config, resume, processes)
            if resume:
                latest = checkpoint_to_resume(folder.path / "checkpoints")  # refuses if every one is damaged
                config = resume_config(folder.path, config, accept_changes, latest)
        # the others wait here until the folder is ready; all continue with the same checkpoint and config
        resume, latest, config = broadcast_object((resume, latest, config), processes)
        yield Run(folder, config, processes, resume, hook, latest, bool(accept_changes))


class Run:
    """The run folder during training; `counters` and `heldout` are live, `boundary` is the state a checkpoint
    saves (taken after each iteration, before the next optimizer step)."""

    def __init__(self, folder, config: TrainConfig, processes: Processes, resuming: bool, hook,
                 latest: Path | None = None, changed: bool = False):
        self.folder, self.config, self.processes, self.resuming, self.hook = folder, config, processes, resuming, hook
        self.path = folder.path  # until commit(): where a new run is built (beside --out, when it replaces one)
        self.latest, self.changed = latest, changed  # the checkpoint a resume continues from; settings accepted
        self.main = processes.is_main
        self.checkpoints = self.path / "checkpoints"
        self.last_saved: int | None = None  # iteration of the newest checkpoint this run can resume from
        self.counters, self.heldout = new_counters(), {}
        self.boundary = TrainingState(inputs=input_fingerprint(config))
        self.stepped = False  # an optimizer step was taken since the boundary: the live state is past it
        self.log = _NoLog()

    def commit(self) -> None:
        """Start-up succeeded: a new run folder replaces --out only now (runfolder.RunFolder.commit)."""
        self.path = self.folder.commit()
        self.checkpoints = self.path / "checkpoints"

    def attach(self, adapter, parts: TrainingParts, rewards, heldout_prompts: list[str], monitors=None) -> None:
        """What the run evaluates and exports; `monitors` are scored on held-out samples only (eval.monitor_rewards)."""
        self.adapter, self.parts, self.rewards, self.heldout_prompts = adapter, parts, rewards, heldout_prompts
        self.monitors = monitors
        self.sampler = _VelocityAdapter(adapter, parts.velocity)
        self._step_hook = parts.optimizer.register_step_pre_hook(lambda *args: setattr(self, "stepped", True))

    def save_base(self, adapter) -> None:
        """base/: the model before training (a valid --checkpoint), written once."""
        if self.main and not (self.path / "base" / "model.json").is_file():
            shutil.rmtree(self.path / ".tmp-base", ignore_errors=True)
            adapter.save(self.path / ".tmp-base")
            write_manifest(self.path / ".tmp-base")
            remove_tree(self.path / "base")
            os.replace(self.path / ".tmp-base", self.path / "base")

    def restore(self) -> int:
        """Resuming: load the newest good checkpoint (if any), tidy the folder to agree with it; the iterations done."""
        start, processes, latest = 0, self.processes, self.latest
        if latest is not None:  # every process reads the same checkpoint (a folder all of them can see)
            state = load_state(latest, self.adapter.net, self.parts, lr=self.config.optim.lr)
            start, self.counters, self.heldout, self.last_saved = state.iteration, state.counters, state.heldout, state.iteration
            if self.changed:  # a changed setting (a lower lr after an abort) gets a fresh count of NaN skips
                self.counters["nonfinite_in_row"] = 0
        if self.main:
            tidy_for_resume(self.path, start, self.counters)
            if self.checkpoints.is_dir():
                prune_checkpoints(self.checkpoints, self.config.keep_checkpoints)  # also drops half-written temporaries
            metadata = json.loads((self.path / "run.json").read_text())
            metadata.setdefault("resumes", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_iteration": start,
                                                       "processes": processes.world_size})
            atomic_write_text(self.path / "run.json", json.dumps(metadata, indent=2))
        self.counters = broadcast_object(self.counters, processes)  # tidying may have reset the best-so-far
        return start

    def open_log(self, start: int) -> None:
        wandb_run = None
        if self.config.wandb and self.main:
            import wandb

            wandb_run = wandb.init(project=self.config.wandb_project, config=to_dict(self.config), dir=str(self.path),
                                   resume="allow")
        if self.main:
            self.log = MetricsLog(self.path, start_iteration=start, wandb_run=wandb_run)
            (self.path / "samples").mkdir(exist_ok=True)

    def mark_boundary(self, done: int) -> None:
        self.boundary = self.boundary.at_boundary(done, self.counters, self.heldout)
        self.stepped = False

    def evaluate(self, iteration: int) -> dict:
        """Held-out metrics: the main process evaluates (under FSDP all take part in the forward passes); all get them."""
        metrics, failure, parts, config = {}, None, self.parts, self.config
        if self.main or self.processes.sharded:
            context = parts.ema.applied(self.adapter.net) if parts.ema is not None else contextlib.nullcontext()
            try:
                with context:
                    metrics, images = evaluate(self.sampler, self.rewards, self.heldout_prompts,
                                               config.eval.samples_per_prompt, config.eval.seed, config.eval.solver,
                                               config.eval.steps, parts.shift, self.monitors)
                if self.main:
                    save_grid(images[:16, :8], self.path / "samples" / f"iter-{iteration:06d}.png",
                              row_labels=list(self.heldout_prompts[:16]))
            except FloatingPointError as error:  # a NaN/inf held-out score: no held-out metrics this time
                metrics, failure = {}, (str(error) if isinstance(error, NonFiniteSamples) else None)
                if failure is None or iteration < config.iterations:
                    warnings.warn(f"held-out evaluation after iteration {iteration} skipped: {error}")
        metrics, failure = broadcast_object((metrics, failure), self.processes)
        if failure is not None and iteration >= config.iterations > 0:
            # finite weights whose samples are NaN/inf are no model: the run fails rather than export it
            raise NonFiniteModel(f"the final held-out samples (after iteration {iteration}) are not finite: {failure}; "
                                 f"the weights are finite but the model they make is not, so no aligned/ was written. "
                                 f"{recovery(self.path, config)}")
        return metrics

    def evaluate_before(self, start: int) -> dict:
        """The base model's held-out metrics: evaluated at iteration 0, or read back when resuming after it."""
        if start > 0:
            path = self.path / "eval_before.json"
            return json.loads(path.read_text()) if path.is_file() else {}
        metrics = self.evaluate(0)
        if self.main:
            atomic_write_text(self.path / "eval_before.json", json.dumps(metrics, indent=2))
        self.log.log(0, {f"heldout/{k}": v for k, v in metrics.items()})
        return metrics

    def evaluate_due(self, done: int) -> dict:
        """After iteration `done`, if an evaluation is due: the held-out metrics as logged values, and best/ exported
        when the held-out reward is the best so far."""
        every = self.config.eval.every
        if not ((every and done % every == 0) or done == self.config.iterations):
            return {}
        self.heldout = self.evaluate(done)
        if self.heldout.get("reward", -math.inf) > self.counters["best_heldout"]:
            self.counters["best_heldout"], self.counters["best_iteration"] = self.heldout["reward"], done
            self.export("best", {"iteration": done, "heldout": self.heldout})
        return {f"heldout/{k}": v for k, v in self.heldout.items()}

    def export(self, folder_name: str, extra: dict) -> None:
        """An export (best/, aligned/) with the EMA weights if any, written aside and renamed into place."""
        extra = {**extra, "run_config": to_dict(self.config)}
        parts, run = self.parts, self.path
        context = parts.ema.applied(self.adapter.net) if parts.ema is not None else contextlib.nullcontext()
        tmp = run / f".tmp-{folder_name}"
        with context, _plain_net(self.adapter, parts):
            if not all_true(torch.tensor([all_finite(self.adapter.net.parameters())]), self.processes)[0]:
                raise NonFiniteWeights(f"the weights to export as {folder_name}/ hold NaN/inf; nothing exported. "
                                       f"{recovery(run, self.config)}")
            if self.main:  # the adapter writes its own export format (a LoRA it merges or saves beside the weights)
                shutil.rmtree(tmp, ignore_errors=True)
                self.adapter.save(tmp, extra=extra)
                write_manifest(tmp)
        if self.main:
            target, previous = run / folder_name, run / PREVIOUS_BEST
            committed = export_iteration(target)
            if (folder_name == "best" and target.is_dir() and not previous.exists() and committed is not None
                    and self.last_saved is not None and committed <= self.last_saved):
                os.replace(target, previous)  # keep the committed best until a checkpoint commits this one
            else:
                remove_tree(target)
            os.replace(tmp, target)
        barrier(self.processes)

    def checkpoint(self, wait: bool = True) -> None:
        """Save the boundary state with the live weights (every process calls it; the main process writes). Weights,
        optimizer moments or EMA with NaN/inf are never saved: NonFiniteWeights names the command that continues."""
        parts = self.parts
        if not all_true(torch.tensor([all_finite(training_state(parts.params, parts.optimizer, parts.ema))]),
                        self.processes)[0]:
            raise NonFiniteWeights(f"the weights or optimizer state hold NaN/inf after iteration "
                                   f"{self.boundary.iteration}; they are neither checkpointed nor exported. "
                                   f"{recovery(self.path, self.config)}")
        save_state(self.checkpoints, self.boundary, self.adapter.net, self.parts, fault_hook=self.hook)
        self.last_saved = self.boundary.iteration
        if self.main:
            shutil.rmtree(self.path / PREVIOUS_BEST, ignore_errors=True)  # best/ is committed by this checkpoint
            self.hook("after_checkpoint")
            prune_checkpoints(self.checkpoints, self.config.keep_checkpoints)
        if wait:
            barrier(self.processes)

    def checkpoint_due(self, done: int) -> bool:
        return done % self.config.checkpoint_every == 0 or done == self.config.iterations

    def stopped(self, error: BaseException) -> None:
        """The run stops on `error`: save the boundary if nothing was updated since (its state is then exact; not
        under FSDP, where saving needs every process), and say where a resume continues from."""
        boundary = self.boundary.iteration
        if (not self.stepped and boundary > 0 and boundary != self.last_saved and not self.processes.sharded
                and not isinstance(error, NonFiniteWeights)):
            try:
                self.checkpoint(wait=False)
            except Exception as save_error:
                warnings.warn(f"could not save a checkpoint after {type(error).__name__}: {save_error}")
        if self.main:
            where = (f"resume continues from the checkpoint after iteration {self.last_saved} "
                     f"({str(self.checkpoints / f'iter-{self.last_saved:06d}')!r})" if self.last_saved is not None
                     else "no checkpoint yet, so resume starts over")
            how = (recovery(self.path, self.config) if isinstance(error, (NonFiniteWeights, NonFiniteModel, TrainingAborted))
                   else f"Continue with `ngrpo train --resume {self.path}`")
            print(f"ngrpo: the run stopped ({type(error).__name__}) with {boundary} iterations complete; "
                  f"{where}. {how}.", file=sys.stderr, flush=True)
        self.log.close()

    def finish(self) -> dict:
        """aligned/ exported, eval_after.json and the reward curve written; the final held-out metrics."""
        check_effective(self.config, self.counters)  # a run that learned nothing writes no aligned/
        after_file = self.path / "eval_after.json"
        eval_after = self.heldout or (json.loads(after_file.read_text()) if after_file.is_file() else {})
        self.export("aligned", {"iterations": self.config.iterations, "heldout": eval_after,
                                "algorithm": self.config.algorithm})
        if self.main:
            atomic_write_text(after_file, json.dumps(eval_after, indent=2))
            xs, ys = self.log.series("reward_mean")
            hx, hy = self.log.series("heldout/reward")
            plot_curves({"training reward (rollouts)": (xs, ys), "held-out reward": (hx, hy)},
                        self.path / "reward_curve.png", "iteration", "reward", f"{self.config.algorithm}: reward")
        self.log.close()
        barrier(self.processes)  # no process returns before the main one has written everything
        return eval_after
