"""Where built models are kept and reused, and how a settings object names its folder there."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path


def cache_root() -> Path:
    """Where built models are kept and reused: $NGRPO_CACHE, else ~/.cache/neighbor_grpo."""
    return Path(os.environ.get("NGRPO_CACHE", Path.home() / ".cache" / "neighbor_grpo"))


def settings_key(settings) -> str:
    """A short hash of a settings dataclass: a new setting builds a new folder instead of reusing a stale one."""
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
