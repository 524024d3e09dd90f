"""Checks that keep a run from ending in a silent wrong result: non-finite weights are never checkpointed or
exported, and a run whose updates almost never changed the weights is reported as a failure, not as a result."""

from __future__ import annotations

import torch

INEFFECTIVE_SHARE = 0.9
"""A run fails when at least this share of its updates were skipped or changed no parameter."""


class TrainingAborted(RuntimeError):
    """Too many updates in a row were skipped for NaN/inf; a checkpoint was saved first."""


class NonFiniteWeights(RuntimeError):
    """The trained weights hold NaN/inf: nothing is checkpointed or exported from them."""


class NonFiniteModel(RuntimeError):
    """The weights are finite but the final held-out samples are NaN/inf: no aligned/ is written (exit 1)."""


class TrainingIneffective(RuntimeError):
    """Almost no update changed the weights; the CLI exits with status 1 and no aligned/ is written."""


def all_finite(tensors) -> bool:
    """True when every floating-point tensor of the iterable is finite (DTensors: this process's shard)."""
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def training_state(params, optimizer, ema) -> list:
    """Every tensor a checkpoint saves from the live run: trainable weights, optimizer moments, EMA shadow."""
    moments = [value for slots in optimizer.state.values() for value in slots.values() if torch.is_tensor(value)]
    return [*params, *moments, *(ema.shadow.values() if ema is not None else ())]


def weights_checksum(params) -> float:
    """A float64 sum over the (local shards of the) parameters: it changes whenever an update moved any of them."""
    with torch.no_grad():
        sums = [(p.to_local() if hasattr(p, "to_local") else p).detach().double().sum() for p in params]
    return float(torch.stack(sums).sum()) if sums else 0.0


FURTHEST_FACTOR = 10.0
"""A setting is blamed for a blow-up when it is at least this many times away from its default."""


def furthest_setting(config) -> tuple[str, float, float, float] | None:
    """(key, value, default, factor) of the float setting of `optim` or the run's algorithm section that is the most
    times away from its default (both > 0; a default of 0 is an off switch, not a scale); None when none is
    FURTHEST_FACTOR times away or more. It is the first suspect after a blow-up: not always the learning rate."""
    from neighbor_grpo.config.train_config import to_dict

    current, default = to_dict(config), to_dict(type(config)())
    found = None
    for section in ("optim", config.algorithm):
        for name, value in current.get(section, {}).items():
            base = default.get(section, {}).get(name)
            if not (isinstance(value, float) and isinstance(base, float) and value > 0 and base > 0):
                continue
            factor = max(value / base, base / value)
            if factor >= FURTHEST_FACTOR and (found is None or factor > found[3]):
                found = (f"{section}.{name}", value, base, factor)
    return found


def likely_setting(config, nonfinite: int, idle: int) -> str:
    """The setting most likely to blame for a run whose updates were skipped (non-finite) or changed nothing."""
    lr = config.optim.lr
    if nonfinite * 2 >= idle:
        tau = getattr(config.algorithm_config, "tau", None)
        if config.algorithm == "neighbor_grpo" and tau is not None:
            return (f"neighbor_grpo.tau={tau:g} (a fixed temperature this small makes the leaping policy's ratios "
                    "non-finite; null derives it from tau_rel)")
        blamed = furthest_setting(config)
        if blamed and blamed[0] != "optim.lr":
            key, value, base, factor = blamed
            return (f"{key}={value:g} ({factor:.3g}x its default {base:g}, the setting furthest from its default) or "
                    "the rewards (the updates had NaN/inf)")
        return f"optim.lr={lr:g} or the rewards (the updates had NaN/inf: lower the learning rate or check the reward)"
    return (f"optim.lr={lr:g} (too small to move the weights) or the rewards (check zero_variance_groups in "
            "metrics.csv: a group whose candidates all score alike has no advantage to learn from)")


def check_effective(config, counters: dict) -> None:
    """Raise TrainingIneffective when >= 90% of the run's updates were skipped or changed no parameter."""
    idle, total = counters.get("idle_updates", 0), config.iterations
    if total and idle >= INEFFECTIVE_SHARE * total:
        raise TrainingIneffective(
            f"{idle} of {total} updates were skipped or changed no parameter ({counters.get('nonfinite_total', 0)} "
            f"non-finite); the run learned nothing, so no aligned/ was written. Likely setting: "
            f"{likely_setting(config, counters.get('nonfinite_total', 0), idle)}")
