"""What a run is made from, before anything is built: the typed configuration (`train_config`: dataclasses, YAML
in, overrides, validation), each algorithm's settings section (`algorithm_settings`), prompt sets (`prompts`) and
the plug-in resolver behind the model and reward registries (`plugins`).

Layer 0 (docs/design.md): imports only the standard library, third-party packages and each other.

`neighbor_grpo.config.TrainConfig` (and every other name of `train_config`) still resolves here for one release,
with a DeprecationWarning: import it from `neighbor_grpo` (the public API) or `neighbor_grpo.config.train_config`.
"""

from __future__ import annotations

import importlib
import warnings


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    train_config = importlib.import_module("neighbor_grpo.config.train_config")
    if not hasattr(train_config, name):
        raise AttributeError(f"module 'neighbor_grpo.config' has no attribute {name!r}")
    public = "neighbor_grpo" if name in ("TrainConfig", "load_config", "ConfigError") else \
        "neighbor_grpo.config.train_config"
    warnings.warn(f"neighbor_grpo.config.{name} moved: import it from {public} (the old path goes in 0.3)",
                  DeprecationWarning, stacklevel=2)
    return getattr(train_config, name)
