"""docs/config.md is the generated config reference: it must list every key with its current default."""

import json
from pathlib import Path

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.config import config_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"
REGENERATE = "docs/config.md is stale: regenerate the table with `ngrpo config` (see the note at its end)"


@pytest.fixture(scope="module")
def doc():
    assert DOC.is_file(), f"{DOC} is missing"
    return DOC.read_text(encoding="utf-8")


def table_rows(text):
    """Rows of the reference table keyed by the config key in the first column."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            key = line.split("`")[1]
            rows[key] = line
    return rows


def test_doc_starts_with_a_sentence_and_has_the_table(doc):
    first = doc.lstrip().splitlines()[0]
    assert first[:1].isalpha() and not first.startswith(("#", "|")), first
    assert "| key | type | default | meaning |\n|---|---|---|---|\n" in doc
    assert "ngrpo config > docs/config.md" in doc


def test_doc_lists_every_config_key(doc):
    rows = table_rows(doc)
    missing = [key for key, *_ in config_reference() if key not in rows]
    assert not missing, f"{REGENERATE}; missing keys: {missing}"
    unknown = sorted(set(rows) - {key for key, *_ in config_reference()})
    assert not unknown, f"{REGENERATE}; keys that no longer exist: {unknown}"


def test_doc_shows_the_current_defaults(doc):
    rows = table_rows(doc)
    stale = [key for key, _type, default, _doc in config_reference()
             if key in rows and f"`{json.dumps(default)}`" not in rows[key]]
    assert not stale, f"{REGENERATE}; defaults changed for: {stale}"


def test_doc_holds_the_exact_ngrpo_config_output(doc, capsys):
    assert main(["config"]) == 0
    output, _ = capsys.readouterr()
    assert output.strip() in doc, REGENERATE


def test_every_row_of_the_reference_table_has_four_cells(capsys):
    assert main(["config"]) == 0
    output, _ = capsys.readouterr()
    broken = []
    for line in output.splitlines():
        cells = line.replace("\\|", "").strip().strip("|").split("|")
        if len(cells) != 4:
            broken.append(line.split("|")[1].strip())
    assert not broken, f"rows that do not render as 4 columns: {broken}"
