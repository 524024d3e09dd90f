"""A few-step student of the built-in model, for the few-step ablation (issue 27): reflow (Liu et al., "Flow
Straight and Fast", ICLR 2023, 2-rectified flow).

The teacher's deterministic ODE couples each noise z with its sample x0 = ODE_teacher(z). The student, started from
the teacher's weights, is trained with the flow-matching loss on the straight path between the pair,
`|| v(x_s, s, c) - (z - x0) ||^2` with `x_s = (1 - s) x0 + s z`: the coupled paths do not cross, so they become
straight and 1-4 Euler steps land near the teacher's many-step samples. The student stays an ordinary velocity model
(every algorithm and solver uses it unchanged). `model.path: builtin:digits-reflow` builds it on first use
(cached like the base model); `ngrpo distill` builds one with other settings.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from neighbor_grpo.builtin.cache import cache_root, settings_key
from neighbor_grpo.builtin.pretrain import _publish, ensure_builtin_model, train_flow_matching
from neighbor_grpo.maths.flow import sigma_grid
from neighbor_grpo.maths.solvers import integrate
from neighbor_grpo.runs.exports import write_manifest


@dataclass
class ReflowSettings:
    teacher: str = "digits"
    """The built-in model distilled (builtin:NAME)."""
    pairs: int = 8192
    """(noise, teacher sample) pairs, labels uniform over the ten digits."""
    teacher_steps: int = 32
    """DPM-Solver++(2M) steps of the teacher's ODE that makes each pair's sample."""
    train_steps: int = 4000
    batch_size: int = 128
    lr: float = 3e-4
    ema_decay: float = 0.999
    seed: int = 0


@torch.no_grad()
def teacher_pairs(teacher, count: int, steps: int, generator: torch.Generator, solver: str = "dpm++2m"):
    """(noises, labels, samples): `count` teacher samples from seeded noises, in batches of 1024."""
    shape = teacher.latent_shape()
    noises = torch.randn(count, *shape, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    grid = sigma_grid(steps, 1.0)
    samples = torch.cat([integrate(lambda x, s, y=labels[i:i + 1024]: teacher.velocity(x, s, y), noises[i:i + 1024],
                                   grid, solver).states[-1] for i in range(0, count, 1024)])
    return noises, labels, samples


@torch.no_grad()
def few_step_error(adapter, noises: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    """Mean squared distance between `steps`-step Euler samples of `adapter` and the teacher's many-step samples."""
    samples = integrate(lambda x, s: adapter.velocity(x, s, labels), noises, sigma_grid(steps, 1.0), "euler").states[-1]
    return float((samples - targets).pow(2).mean())


def reflow(teacher, settings: ReflowSettings = ReflowSettings(), progress: bool = True, check_steps=(1, 2, 4)):
    """The reflowed student (EMA weights) of `teacher`, and each step count's few-step error on 512 held-out
    pairs before (the teacher itself) and after: {steps: {"teacher": e, "student": e}}."""
    generator = torch.Generator().manual_seed(settings.seed)
    noises, labels, samples = teacher_pairs(teacher, settings.pairs, settings.teacher_steps, generator)
    held_out = teacher_pairs(teacher, 512, settings.teacher_steps, generator)

    def coupled_pairs(size: int):  # (sample, its own noise, label): the teacher's coupling, not fresh noise
        batch = torch.randint(0, settings.pairs, (size,), generator=generator)
        return samples[batch], noises[batch], labels[batch]

    student = copy.deepcopy(teacher)
    student.net.requires_grad_(True).train()
    ema = copy.deepcopy(student)
    ema.net.requires_grad_(False)
    train_flow_matching(student, ema, coupled_pairs, settings.train_steps, settings.batch_size, settings.lr,
                        settings.ema_decay, generator, "reflow", progress)
    ema.net.eval()
    errors = {k: {"teacher": few_step_error(teacher, *held_out, k), "student": few_step_error(ema, *held_out, k)}
              for k in check_steps}
    return ema, errors


def default_reflow_dir(settings: ReflowSettings = ReflowSettings()) -> Path:
    return cache_root() / f"{settings.teacher}-reflow-{settings_key(settings)}"


def ensure_reflow_model(progress: bool = True, settings: ReflowSettings = ReflowSettings(),
                        folder: Path | None = None, teacher=None) -> Path:
    """The cached reflowed student of builtin:`settings.teacher` (or of the adapter `teacher`, into `folder`), built
    on first use; its model.json records the settings, the seconds it took and the few-step errors before and after."""
    from neighbor_grpo.models import load_adapter

    folder = Path(folder) if folder is not None else default_reflow_dir(settings)
    if not (folder / "model.json").is_file():
        teacher = teacher or load_adapter(ensure_builtin_model(settings.teacher, progress=progress))
        started = time.perf_counter()
        student, errors = reflow(teacher, settings, progress)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        student.save(tmp, extra={"reflow": asdict(settings), "reflow_seconds": round(time.perf_counter() - started, 1),
                                 "reflow_threads": torch.get_num_threads(), "few_step_error": errors})
        write_manifest(tmp)
        _publish(tmp, folder)
    return folder
