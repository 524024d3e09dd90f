"""Where built models are kept and reused, and how a settings object names its folder there."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path


def cache_root() -> Path:
    """Where built models are kept and reused: $NGRPO_CACHE, else ~/.cache/neighbor_grpo."""
    return Path(os.environ.get("NGRPO_CACHE", Path.home() / ".cache" / "neighbor_grpo"))


def writable_cache_root() -> Path:
    """The cache root, made if missing, after checking a file can be written there: an unwritable cache is found
    before minutes of pretraining, not when its result is saved."""
    root = cache_root()
    where = f"NGRPO_CACHE {str(root)!r}" if "NGRPO_CACHE" in os.environ else f"the model cache {str(root)!r}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".ngrpo-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"{where}: cannot write there ({error.strerror or error}); the built-in models are built and "
                         "kept there: set NGRPO_CACHE to a folder you can write in") from None
    return root


def settings_key(settings) -> str:
    """A short hash of a settings dataclass: a new setting builds a new folder instead of reusing a stale one."""
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]
