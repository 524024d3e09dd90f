"""docs/config.md is the generated config reference: it must list every key with its current default."""

import json
from pathlib import Path

import pytest

from neighbor_grpo.cli import main
from neighbor_grpo.config.train_config import config_reference

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


def test_design_page_gives_the_real_defaults():
    """docs/design.md's "[D] choices" table: a row naming one config key starts with its default (numbers), and
    the demo value it quotes for reference anchoring is the demo config's."""
    from neighbor_grpo.config.train_config import load_config
    from neighbor_grpo.builtin.demo import DEMO_CONFIG

    design = (DOC.parent / "design.md").read_text(encoding="utf-8")
    defaults = {key: value for key, _, value, _ in config_reference()}
    checked = []
    for line in design.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`") or cells[0].count("`") != 2:
            continue
        key = cells[0].split("`")[1]
        first = cells[1].split()[0].rstrip(",;")
        if key in defaults and isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool):
            assert float(first) == float(defaults[key]), f"design.md gives {key} default {first}, the code {defaults[key]}"
            checked.append(key)
    assert "neighbor_grpo.ref_beta" in checked and "neighbor_grpo.adv_eps" in checked, checked
    ref_row = next(line for line in design.splitlines() if line.startswith("| `neighbor_grpo.ref_beta`"))
    demo_beta = load_config(DEMO_CONFIG).neighbor_grpo.ref_beta
    assert f"{demo_beta:g} in the demo" in ref_row, ref_row
