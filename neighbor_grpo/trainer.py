"""Deprecated path, kept for one release (goes in 0.3): the training loop moved to
`neighbor_grpo.training.trainer`; its public names are `neighbor_grpo.train` and `neighbor_grpo.TrainResult`."""

import warnings

from neighbor_grpo.training.trainer import *  # noqa: F401,F403  (every name the old module had)
from neighbor_grpo.training.trainer import TrainResult, load_model, train

warnings.warn("neighbor_grpo.trainer moved: use neighbor_grpo.train (or neighbor_grpo.training.trainer); "
              "the old path goes in 0.3", DeprecationWarning, stacklevel=2)

__all__ = ["TrainResult", "load_model", "train"]
