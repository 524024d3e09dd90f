"""neighbor-grpo: align flow-matching image generators with reward models by Neighbor GRPO (arXiv 2511.16955),
with the SDE-based and newer methods in the same harness.

The public API, what users and plug-in authors import (docs/extending.md):

    from neighbor_grpo import TrainConfig, load_config, train

    config = load_config("configs/flux_hps.yaml", ["iterations=100"])
    result = train(config, "runs/flux", progress=True)

Names are loaded on first use, so `import neighbor_grpo` stays light (no torch model code, no diffusers).
Where the rest lives: `maths` (flow, noise, advantages, solvers), `models` (adapters and LoRA), `rewards`,
`algorithms`, `training` (the loop), `runs` (folders, checkpoints, resume), `parallel` (DDP/FSDP), `plan`
(`ngrpo plan`), `bench` (`ngrpo compare`), `builtin` (the digits task and the demo), `cli` (`ngrpo`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_PUBLIC = {
    "TrainConfig": "neighbor_grpo.config.train_config",
    "ConfigError": "neighbor_grpo.config.train_config",
    "load_config": "neighbor_grpo.config.train_config",
    "train": "neighbor_grpo.training.trainer",
    "TrainResult": "neighbor_grpo.training.trainer",
    "load_model": "neighbor_grpo.training.parts",
    "run_demo": "neighbor_grpo.builtin.demo",
    "FlowAdapter": "neighbor_grpo.models",
    "register_model_adapter": "neighbor_grpo.models",
    "load_adapter": "neighbor_grpo.models",
    "Reward": "neighbor_grpo.rewards",
    "register_reward": "neighbor_grpo.rewards",
    "build_rewards": "neighbor_grpo.rewards",
    "WeightedRewards": "neighbor_grpo.rewards",
    "ALGORITHMS": "neighbor_grpo.algorithms",
    "SOLVERS": "neighbor_grpo.maths.solvers",
    "integrate": "neighbor_grpo.maths.solvers",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from neighbor_grpo.algorithms import ALGORITHMS
    from neighbor_grpo.builtin.demo import run_demo
    from neighbor_grpo.config.train_config import ConfigError, TrainConfig, load_config
    from neighbor_grpo.maths.solvers import SOLVERS, integrate
    from neighbor_grpo.models import FlowAdapter, load_adapter, register_model_adapter
    from neighbor_grpo.rewards import Reward, WeightedRewards, build_rewards, register_reward
    from neighbor_grpo.training.parts import load_model
    from neighbor_grpo.training.trainer import TrainResult, train


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'neighbor_grpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
