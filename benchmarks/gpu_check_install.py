"""The GPU check's install step: a carried wheel (diffusers, on a GPU image that lacks it) installed with
`pip install --no-deps --no-index`, or nothing when the module already imports (benchmarks/gpu_check.py)."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path


def find_wheel(path: str, module: str) -> Path:
    """`path` itself, or the one wheel of `module` in the folder `path`."""
    where = Path(path)
    if where.is_dir():
        wheels = sorted(where.glob(f"{module.replace('-', '_')}-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"gpu_check: --wheel {path}: expected exactly one {module}-*.whl in this folder, "
                             f"found {[w.name for w in wheels]}")
        return wheels[0]
    if not where.is_file() or where.suffix != ".whl":
        raise SystemExit(f"gpu_check: --wheel {path}: no such .whl file or folder")
    return where


def ensure_module(module: str, wheel: str | None, target: str | None = None) -> dict:
    """Import `module`, installing `wheel` with `pip install --no-deps --no-index` first when it is missing (into
    `target` and onto sys.path when given, else into this Python's environment). Returns what was done."""
    tick = time.perf_counter()
    if importlib.util.find_spec(module) is not None:
        return {"action": "none (already importable)", "wheel": None, "seconds": 0.0}
    if not wheel:
        raise SystemExit(f"gpu_check: {module} is not installed here; carry its wheel and pass --wheel PATH "
                         f"(made with: pip download {module}==VERSION --no-deps -d benchmarks/wheels)")
    path = find_wheel(wheel, module)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
               "--disable-pip-version-check", str(path)]
    if target:
        command += ["--target", target]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise SystemExit(f"gpu_check: --wheel {path}: pip install failed ({last})")
    if target and target not in sys.path:
        sys.path.insert(0, target)
    importlib.invalidate_caches()
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"gpu_check: --wheel {path}: installed, but {module} still does not import")
    return {"action": "pip install --no-deps --no-index", "wheel": str(path), "target": target,
            "seconds": time.perf_counter() - tick}
