"""The model cache is checked before any model is built in it (issue 22 item 6: an unwritable NGRPO_CACHE was found
only after 8+ minutes of pretraining, and left a `.NAME.new-PID` folder beside the run)."""

import time

import pytest

from neighbor_grpo.cli import main


@pytest.mark.parametrize("command", [["train", "iterations=1"], ["pretrain"], ["demo"]])
def test_an_unwritable_cache_is_one_line_before_any_pretraining(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("NGRPO_CACHE", str(tmp_path / "afile" / "cache"))  # below a file: nothing can be made there
    out = ["--out", str(tmp_path / "runs" / "r1")] if command[0] != "pretrain" else []
    started = time.perf_counter()
    assert main([*command, *out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"NGRPO_CACHE '{tmp_path}/afile/cache': cannot write there (Not a directory)" in err
    assert time.perf_counter() - started < 30  # not after the pretraining
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run folder, staging folder or parents
