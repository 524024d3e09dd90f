"""docs/models.md's table of every model: its planned-memory columns are the recorded plan tables' figures
(benchmarks/results/*.json, the rows benchmarks/plan_tables.py's MODELS_TABLE names), so the docs cannot drift from
what `ngrpo plan` computed. Reads files only."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "plan_tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("plan_tables_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def docs_rows(marker: str) -> dict[str, list[str]]:
    lines = (ROOT / "docs" / "models.md").read_text().splitlines()
    start = lines.index(marker)
    rows = {}
    for line in lines[start + 3:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


def test_every_planned_memory_cell_equals_the_recorded_plan(tables):
    rows = docs_rows(tables.MARKER)
    assert set(tables.MODELS_TABLE) <= set(rows), set(tables.MODELS_TABLE) - set(rows)
    columns = len(tables.MEMORY_COLUMNS)
    for key, (table, model, pixels) in tables.MODELS_TABLE.items():
        record = json.loads((ROOT / "benchmarks" / "results" / f"{table}.json").read_text())
        cells = rows[key][-columns - 1:-1]
        assert model in rows[key][-1] and table in rows[key][-1], rows[key][-1]
        for cell, (finetune, gpus) in zip(cells, tables.MEMORY_COLUMNS):
            [recorded] = [r for r in record["rows"] if r["model"] == model and str(r["pixels"]) == pixels
                          and r["finetune"] == finetune and r["gpus"] == gpus
                          and r.get("gpu", record.get("gpu")) == "h100-80gb"]
            figure = re.fullmatch(r"(\d+\.\d)( \(no fit\))?", cell)
            assert figure, (key, finetune, gpus, cell)
            assert float(figure.group(1)) == round(recorded["peak_gib"], 1), (key, finetune, gpus, cell)
            assert (figure.group(2) is None) == recorded["fits"], (key, finetune, gpus, cell)


def test_rows_without_a_recorded_plan_say_so(tables):
    """Every supported model has a row; those no recorded plan table covers say so rather than show a figure."""
    rows = docs_rows(tables.MARKER)
    for key in ("digits", "digits-unet", "words", "FLUX.1 [schnell]", "Qwen-Image 2.1"):
        assert rows[key][-len(tables.MEMORY_COLUMNS) - 1:-1] == ["no recorded plan"] * len(tables.MEMORY_COLUMNS)
    assert len(rows) == 18 and all(len(cells) == 14 for cells in rows.values())
