"""The bands file: what a comparison records of it (content, path, the commit that fixed it) and its one-line
refusals; the committed protocol file's bands are the base model's worst sample of its own spread."""

import json
import subprocess
from pathlib import Path

import pytest

from neighbor_grpo.bench import rules as rules
from neighbor_grpo.bench.bands import bands_record, read_bands

PROTOCOL_BANDS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bands" / "digits-unet.json"


def test_a_bands_file_outside_git_is_recorded_as_not_fixed_by_a_commit(tmp_path):
    path = tmp_path / "bands.json"
    path.write_text(json.dumps({"bands": {"realism": [None, 0.2]}}))
    record = bands_record(path)
    assert record["commit"] is None and record["changed_since_commit"] and record["bands"] == {"realism": [None, 0.2]}


def test_the_committed_protocol_bands_record_their_commit_and_match_their_spread():
    record = bands_record(PROTOCOL_BANDS)
    expected = subprocess.run(["git", "log", "-1", "--format=%H", "--", PROTOCOL_BANDS.name], cwd=PROTOCOL_BANDS.parent,
                              capture_output=True, text=True).stdout.strip()
    assert record["commit"] == expected and len(expected) == 40
    # the bands are what the recorded per-sample spread gives at the recorded quantile: nothing tuned by hand
    assert record["unit"] == "per_sample" and record["realism_split"] == "A" and record["solver"] == "euler"
    derived = rules.bands_from_base_spread(record["per_sample"], record["quantile"])  # stored to 7 digits
    assert record["bands"].keys() == derived.keys()
    for name, (low, high) in derived.items():
        assert record["bands"][name] == [pytest.approx(low, abs=1e-6) if low is not None else None,
                                         pytest.approx(high, abs=1e-6) if high is not None else None], name


@pytest.mark.parametrize("content, words", [
    ("not json", "expected a bands file"),
    (json.dumps({"bands": {"gold": [None, 1.0]}}), "monitor 'gold'"),
    (json.dumps({"nothing": 1}), "expected a bands file"),
])
def test_a_bad_bands_file_is_one_line_naming_it(tmp_path, content, words):
    path = tmp_path / "b.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="--bands") as error:
        read_bands(path)
    assert words in str(error.value) and "\n" not in str(error.value)
