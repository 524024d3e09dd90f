"""benchmarks/hostile_cases.py classifies what it replays: a few of its cheap cases (no model needed) end as the
clear one-line refusals they should, and its classifier calls a refusal that left no error line, an exit 0 where a
refusal was due, and a changed protected file what they are."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hostile_cases.py"


@pytest.fixture(scope="module")
def hostile():
    spec = importlib.util.spec_from_file_location("hostile_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostile_cases"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train a key without =", "plan --gpus 0", "report a JSON list",
                                  "report --out an existing file"])
def test_cheap_cases_are_clear_one_line_refusals(hostile, tmp_path, name):
    case = next(c for c in hostile.CASES if c.name == name)
    env = {**os.environ, "PYTHONPATH": str(hostile.ROOT), "OMP_NUM_THREADS": "1", "NGRPO_CACHE": str(tmp_path / "c")}
    kind, detail, _ = hostile.run_case(case, tmp_path, env, timeout=120)
    assert kind == "clear", detail
    assert ": error: " in detail


def test_the_classifier_names_silent_lost_and_traceback_outcomes(hostile, tmp_path):
    case = hostile.Case("x", [], protect=["mine.txt"])
    (tmp_path / "mine.txt").write_text("mine")
    before = {"mine.txt": hostile.snapshot(tmp_path / "mine.txt")}
    result = lambda rc, err="": subprocess.CompletedProcess([], rc, "", err)  # noqa: E731
    assert hostile.classify(case, result(2, "ngrpo train: error: no\n"), tmp_path, before)[0] == "clear"
    assert hostile.classify(case, result(0), tmp_path, before)[0] == "silent"
    assert hostile.classify(case, result(1, "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n"), tmp_path,
                            before)[0] == "traceback"
    assert hostile.classify(case, result(1, "some library text\n"), tmp_path, before)[0] == "silent"
    assert hostile.classify(case, None, tmp_path, before)[0] == "hang"
    (tmp_path / "mine.txt").write_text("changed")
    assert hostile.classify(case, result(2, "ngrpo train: error: no\n"), tmp_path, before)[0] == "lost"
