"""What a resume may change. A checkpoint records the inputs it was made from (the whole config and the SHA-256 of
every input file the run read); resuming compares them with the current ones and refuses any difference except
`iterations` growing and the short list of settings a user may change on purpose with `--accept-changes`.

The same rule holds for the CLI (`ngrpo train --resume RUN --accept-changes optim.lr=3e-5`) and the Python API
(`train(config, RUN, resume=True, accept_changes={"optim.lr": 3e-5})`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from neighbor_grpo.config.train_config import ConfigError, TrainConfig, from_dict, to_dict, validate
from neighbor_grpo.runs.io import atomic_write_text, sha256_file

# Settings that change what the run does from now on but not the state it resumes from; `eval.*` is every key of
# the eval section. Anything else (the algorithm, the rewards, the prompts, the model...) would make the resumed
# run a different run.
ACCEPTABLE = ("optim.lr", "optim.max_grad_norm", "iterations", "eval.*", "checkpoint_every", "keep_checkpoints")
INPUT_FILES = ("prompts.file", "prompts.eval_file")


class ResumeRefused(ValueError):
    """The run's inputs differ from those its checkpoint was made from."""


def flatten(data: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}, so a difference is named by its dotted key."""
    flat = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_acceptable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1])) for allowed in ACCEPTABLE)


def input_fingerprint(config: TrainConfig) -> dict:
    """What a checkpoint records about its inputs: the whole config and the SHA-256 of each input file."""
    files = {}
    for key in INPUT_FILES:
        path = flatten(to_dict(config)).get(key)
        if path:
            files[key] = sha256_file(path) if Path(path).is_file() else None
    return {"config": to_dict(config), "files": files}


def apply_changes(config: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """`config` with the accepted changes {dotted key: value} applied; a key outside ACCEPTABLE is refused."""
    if not isinstance(changes, dict):
        raise ConfigError(f"accept_changes: expected a mapping {{dotted key: value}}, got {type(changes).__name__}")
    data = to_dict(config)
    for key, value in changes.items():
        if not is_acceptable(key):
            raise ConfigError(f"--accept-changes {key}: only {', '.join(ACCEPTABLE)} can change on resume; "
                              "start a new run to change anything else")
        node, *path = data, *key.split(".")
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            raise ConfigError(f"--accept-changes {key}: no such config key")
        node[path[-1]] = value
    changed = from_dict(TrainConfig, data)
    validate(changed)
    return changed


def parse_changes(items: list[str]) -> dict[str, Any]:
    """['optim.lr=3e-5', 'iterations=80'] -> {'optim.lr': 3e-05, 'iterations': 80} (values read as YAML scalars)."""
    changes = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--accept-changes {item!r}: expected key=value, e.g. optim.lr=3e-5")
        if key.strip() in changes:  # last-wins would silently drop the first value
            raise ConfigError(f"--accept-changes {key.strip()}: given twice ({key.strip()}={changes[key.strip()]!r} "
                              f"and {item!r}); keep one of them")
        try:
            changes[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--accept-changes {item!r}: the value is not a YAML scalar") from None
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded: dict, config: TrainConfig, done: int) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's recorded inputs and the current ones, each as
    'key: old -> new'. `done`: iterations the checkpoint holds (`iterations` may grow, never below it)."""
    current = input_fingerprint(config)
    old, new = flatten(recorded.get("config") or {}), flatten(current["config"])
    refused, allowed = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<unset>"), new.get(key, "<unset>")
        if before == after:
            continue
        line = f"{key}: {_short(before)} -> {_short(after)}"
        if key == "iterations" and isinstance(after, int) and after < done:
            refused.append(f"{line} (the checkpoint already holds {done} iterations)")
        else:
            (allowed if key == "iterations" or is_acceptable(key) else refused).append(line)
    for key, digest in (recorded.get("files") or {}).items():
        if key in current["files"] and current["files"][key] != digest and old.get(key) == new.get(key):
            now = current["files"][key]
            refused.append(f"{key} ({new.get(key)}): sha256 {str(digest)[:12]} -> "
                           f"{now[:12] + ' (the file changed)' if now else 'missing (the file is gone)'}")
    return refused, allowed


def check_resume(run: Path, recorded: dict, config: TrainConfig, done: int, accepted: set[str],
                 source: str) -> list[str]:
    """Refuse (ResumeRefused) what the run cannot replay; return the accepted differences ('key: old -> new').
    A difference in ACCEPTABLE passes only when named in `accepted` (--accept-changes), except `iterations`."""
    refused, allowed = differences(recorded, config, done)
    flat = flatten(to_dict(config))
    for line in allowed:
        key = line.split(":")[0]
        if key != "iterations" and key not in accepted:
            refused.append(f"{line} (to keep it: --accept-changes {key}={_short(flat[key])})")
    if refused:
        settings = any(line.split(":")[0] not in INPUT_FILES and " (" not in line.split(":")[0] for line in refused)
        hint = (f"; only {', '.join(ACCEPTABLE)} can change on resume, with --accept-changes KEY=VALUE (Python: "
                "train(..., resume=True, accept_changes={KEY: VALUE}))") if settings else ""
        raise ResumeRefused(f"--resume {str(run)!r}: the inputs differ from those of {source}: {'; '.join(refused)}. "
                            f"Undo the change or start a new run{hint}")
    return [line for line in allowed if line.split(":")[0] in accepted or line.startswith("iterations:")]


def record_changes(run: Path, config: TrainConfig, iteration: int, changes: list[str]) -> None:
    """config.yaml takes the accepted changes; run.json's `config_history` gets {iteration, changes}, and
    `exact_replay` turns false unless only `iterations` grew."""
    atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    path = run / "run.json"
    metadata = json.loads(path.read_text()) if path.is_file() else {}
    metadata.setdefault("config_history", []).append({"iteration": iteration, "changes": changes})
    if any(not line.startswith("iterations:") for line in changes):
        metadata["exact_replay"] = False
    atomic_write_text(path, json.dumps(metadata, indent=2))


def recovery(run: Path, config: TrainConfig) -> str:
    """What to do after a blow-up, as one sentence: the setting furthest from its default when it is not the
    learning rate (a run with `awm.advantage_max=50` is not helped by a lower lr), else the lower-lr command."""
    from neighbor_grpo.training.guards import furthest_setting

    blamed = furthest_setting(config)
    if blamed and blamed[0] != "optim.lr":
        key, value, default, factor = blamed
        if is_acceptable(key):
            how = (f"continue with it at its default: ngrpo train --resume {run} --accept-changes {key}={default:g} "
                   f"(Python: train(config, {str(run)!r}, resume=True, accept_changes={{{key!r}: {default:g}}}))")
        else:
            how = f"start a new run with it nearer its default ({key} cannot change on resume)"
        return f"Likely setting: {key}={value:g} ({factor:.3g}x its default {default:g}, the furthest from its default); {how}"
    return f"Continue from the last good checkpoint with a lower learning rate: {lower_lr_command(run, config)}"


def lower_lr_command(run: Path, config: TrainConfig) -> str:
    """The command that continues an aborted run with a third of its learning rate, at most the default one (a
    third of lr=1e6 blows up again) (CLI and Python)."""
    lr = float(f"{min(config.optim.lr / 3, type(config)().optim.lr):.3g}")
    return (f"ngrpo train --resume {run} --accept-changes optim.lr={lr:g} "
            f"(Python: train(config, {str(run)!r}, resume=True, accept_changes={{'optim.lr': {lr:g}}}))")


def recorded_inputs(run: Path, state: dict | None) -> tuple[dict, int, str]:
    """(recorded inputs, iterations done, where they come from): the checkpoint's, or - with no checkpoint, or one
    written by a version that recorded none - the run's config.yaml (nothing to replay then: files are not checked)."""
    if state and state.get("inputs"):
        return state["inputs"], int(state["iteration"]), f"checkpoint iter-{int(state['iteration']):06d}"
    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    try:  # keys a newer version added are absent from an older run's config.yaml: they take their defaults
        saved = to_dict(from_dict(TrainConfig, saved))
    except (ConfigError, TypeError):
        pass  # not a config this version reads: the comparison names the differences
    return {"config": saved, "files": {}}, int(state["iteration"]) if state else 0, "the run's config.yaml"


def resume_config(run: Path, config: TrainConfig, accept_changes: dict[str, Any] | None,
                  checkpoint: Path | None) -> TrainConfig:
    """The config a resume continues with: `config` plus `accept_changes`, checked against what the checkpoint
    (else config.yaml) recorded. Accepted differences are written to config.yaml and run.json."""
    if accept_changes:
        config = apply_changes(config, accept_changes)
    state = json.loads((checkpoint / "state.json").read_text()) if checkpoint is not None else None
    recorded, done, source = recorded_inputs(run, state)
    accepted = check_resume(run, recorded, config, done, set(accept_changes or {}), source)
    if accepted:
        record_changes(run, config, done, accepted)
    return config
