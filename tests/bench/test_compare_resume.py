"""compare --resume's pieces on hand-made partial files (the end-to-end resume: tests/bench/test_compare.py)."""

import json

import pytest

from neighbor_grpo.bench.resume import ReusingPool, finished_runs, read_partial, run_key

KNOBS = {"a": [{"label": "k=1"}, {"label": "k=2"}], "b": [{"label": "only"}]}
HEADER = {"settings": {"budget_fe": 100.0, "seeds": [0, 1]}, "eval_points": [10.0, 20.0], "rules": {"x": 1}}


def run(lr, seed, knob):
    return {"lr": lr, "seed": seed, "knob": knob, "curve": []}


def test_a_partial_from_before_the_finished_list_gives_the_runs_of_finished_rows():
    saved = {"runs": {"a": {"0": run(3e-4, 0, "k=2")}, "b": {}},
             "tuning_runs": {"a": [run(1e-4, 100, "k=1"), run(3e-4, 100, "k=2"), run(1e-4, 100, "gone")]}}
    assert set(finished_runs(saved, KNOBS)) == {("a", 3e-4, 1, 0), ("a", 1e-4, 0, 100), ("a", 3e-4, 1, 100)}


def test_the_finished_list_covers_rows_still_tuning_and_keys_round_lrs():
    saved = {"finished_runs": [{"row": "b", "knob_index": 0, "run": run(0.1 + 0.2, 100, "only")}]}
    assert run_key("b", 0.3, 0, 100) in finished_runs(saved, KNOBS)


def test_a_partial_of_other_settings_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "r.partial.json"
    path.write_text(json.dumps({**HEADER, "settings": {"budget_fe": 50.0, "seeds": [0, 1]}}))
    with pytest.raises(ValueError, match=r"other settings.budget_fe \(50.0; this command: 100.0\)"):
        read_partial(path, HEADER)
    path.write_text(json.dumps({**HEADER, "eval_points": [10.0]}))
    with pytest.raises(ValueError, match=r"other eval_points"):
        read_partial(path, HEADER)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable results JSON"):
        read_partial(path, HEADER)
    path.write_text(json.dumps({"settings": {}}))
    with pytest.raises(ValueError, match="has no 'eval_points'"):
        read_partial(path, HEADER)
    path.write_text(json.dumps(HEADER))
    assert read_partial(path, HEADER) == HEADER


def test_only_runs_with_intact_weights_are_answered_without_the_pool(tmp_path):
    from neighbor_grpo.runs.io import sha256_file

    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"weights")
    finished = {run_key("a", 1e-3, 0, 7): {**run(1e-3, 7, "k=1"), "model": {"sha256": sha256_file(weights)}}}

    class Pool:
        workers, submitted = 2, []

        def submit(self, job):
            self.submitted.append(job)

    pool = ReusingPool(Pool(), finished)
    job = {"kind": "run", "spec": {"row": "a", "lr": 1e-3, "knob_index": 0, "seed": 7, "model_path": str(weights)}}
    assert pool.submit(job).result()["seed"] == 7 and pool.reused == 1 and not Pool.submitted
    weights.write_bytes(b"changed")
    pool.submit(job)
    assert Pool.submitted == [job] and pool.reused == 1
