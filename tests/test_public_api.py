"""The public API: `neighbor_grpo`'s own names, loaded lazily, documented, and the old module paths that
docs/extending.md named still working for one release with a DeprecationWarning."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import neighbor_grpo

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.mark.parametrize("name", neighbor_grpo.__all__)
def test_each_public_name_is_the_defining_modules_object(name):
    defining = importlib.import_module(neighbor_grpo._PUBLIC[name])
    assert getattr(neighbor_grpo, name) is getattr(defining, name)
    assert name in dir(neighbor_grpo)


def test_the_public_names_are_documented():
    section = EXTENDING.read_text().split("## The public API", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in neighbor_grpo.__all__ if f"`{name}" not in section]
    assert not missing, f"docs/extending.md's public API table lacks {missing}"


def test_an_unknown_name_is_an_attribute_error_and_subpackages_still_import():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        neighbor_grpo.trian  # noqa: B018
    from neighbor_grpo import bench, maths  # folders are not shadowed by the lazy names

    assert maths.__name__ == "neighbor_grpo.maths" and bench.__name__ == "neighbor_grpo.bench"


def test_importing_the_package_loads_nothing_heavy():
    code = ("import sys, neighbor_grpo; heavy = [m for m in sys.modules if m.startswith(('torch', 'diffusers', "
            "'neighbor_grpo.'))]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_old_paths_warn_and_give_the_same_objects():
    from neighbor_grpo.config.train_config import TrainConfig, load_config
    from neighbor_grpo.training import trainer

    sys.modules.pop("neighbor_grpo.trainer", None)
    with pytest.warns(DeprecationWarning, match="neighbor_grpo.trainer moved"):
        old = importlib.import_module("neighbor_grpo.trainer")
    assert old.train is trainer.train and old.load_model is trainer.load_model
    with pytest.warns(DeprecationWarning, match="neighbor_grpo.config.TrainConfig moved"):
        from neighbor_grpo.config import TrainConfig as old_config
    with pytest.warns(DeprecationWarning, match="neighbor_grpo.config.load_config moved"):
        from neighbor_grpo.config import load_config as old_load
    assert old_config is TrainConfig and old_load is load_config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImportError):
            from neighbor_grpo.config import no_such_name  # noqa: F401


def test_the_cli_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "neighbor_grpo.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: ngrpo" in done.stdout
