"""Run folders: what --overwrite may replace, building beside the final place, committing by rename, leftovers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from neighbor_grpo.runs.ownership import (MARKER, OwnershipError, check_file_outputs, check_folder_target, legacy_kind,
                                     marker_kind)
from neighbor_grpo.runs.runfolder import RunFolder, RunFolderError, clean_leftovers


def snapshot(folder):
    """Every file with its bytes, but the lock file (a run records its pid there)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def make_old_run(folder, marker=True):
    """A finished run as this version (marker) or an earlier one (no marker) leaves it."""
    (folder / "checkpoints" / "iter-000002").mkdir(parents=True)
    (folder / "checkpoints" / "iter-000002" / "manifest.json").write_text("{}")
    (folder / "aligned").mkdir()
    (folder / "aligned" / "model.json").write_text("{}")
    for name in ("config.yaml", "run.json", "metrics.csv", "eval_before.json", "eval_after.json", ".lock"):
        (folder / name).write_text(name)
    if marker:
        (folder / MARKER).write_text(json.dumps({"kind": "run", "version": "0.1.0"}))
    return snapshot(folder)


def test_a_new_folder_is_built_beside_and_appears_only_on_commit(tmp_path):
    final = tmp_path / "runs" / "r1"
    with RunFolder(final) as folder:
        assert folder.path == tmp_path / "runs" / f".r1.new-{os.getpid()}"
        assert not final.exists() and marker_kind(folder.path) == "run"
        (folder.path / "config.yaml").write_text("x")
        assert folder.commit() == final
    assert (final / "config.yaml").read_text() == "x" and marker_kind(final) == "run"
    assert sorted(p.name for p in final.parent.iterdir()) == ["r1"]  # no staging or set-aside folder left


def test_a_failed_start_up_leaves_nothing_not_even_the_parents_it_made(tmp_path):
    final = tmp_path / "a" / "b" / "run"
    with pytest.raises(ZeroDivisionError):
        with RunFolder(final) as folder:
            (folder.path / "config.yaml").write_text("x")
            1 / 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "earlier-version-layout"])
def test_overwrite_replaces_a_run_of_ours_only_on_commit(tmp_path, marker):
    final = tmp_path / "run"
    final.mkdir()
    old = make_old_run(final, marker)
    with RunFolder(final, overwrite=True) as folder:
        (folder.path / "config.yaml").write_text("new")
        assert snapshot(final) == old  # until start-up succeeded, the old run is untouched
        folder.commit()
    assert (final / "config.yaml").read_text() == "new" and not (final / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_with_a_failed_start_up_keeps_the_old_run(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    old = make_old_run(final)
    with pytest.raises(FileNotFoundError):
        with RunFolder(final, overwrite=True):
            raise FileNotFoundError("model.path 'typo': no such model")
    assert snapshot(final) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("extra", ["notes.txt", "checkpoints/mine.txt.bak", "data"])
def test_overwrite_refuses_a_folder_with_anything_an_earlier_version_did_not_write(tmp_path, extra):
    final = tmp_path / "run"
    final.mkdir()
    make_old_run(final, marker=False)
    (final / extra).parent.mkdir(parents=True, exist_ok=True)
    (final / extra).write_text("mine")
    before = snapshot(final)
    assert legacy_kind(final) is None
    with pytest.raises(OwnershipError, match=r"was not made by ngrpo .*--overwrite replaces only folders ngrpo made"):
        RunFolder(final, overwrite=True)
    assert snapshot(final) == before


@pytest.mark.parametrize("extra", ["NOTES.md", "analysis/plot.py"])
def test_overwrite_refuses_a_run_of_ours_holding_files_a_user_added_and_names_them(tmp_path, extra):
    # issue 22 item 1: `train --out runs/r1 --overwrite` deleted NOTES.md and analysis/ added after the first run
    final = tmp_path / "r1"
    final.mkdir()
    make_old_run(final, marker=True)
    (final / extra).parent.mkdir(parents=True, exist_ok=True)
    (final / extra).write_text("mine")
    before = snapshot(final)
    with pytest.raises(OwnershipError) as caught:
        RunFolder(final, overwrite=True)
    top = extra.split("/")[0]
    assert f"holds 1 entry ngrpo did not write [{top!r}]" in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(final) == before


def test_a_copied_marker_does_not_make_a_user_folder_replaceable(tmp_path):
    final = tmp_path / "photos"
    final.mkdir()
    (final / "cat.png").write_bytes(b"\x89PNG")
    (final / "2024").mkdir()
    (final / MARKER).write_text(json.dumps({"kind": "run", "version": "0.1.0"}))
    before = snapshot(final)
    with pytest.raises(OwnershipError, match=r"did not write \['2024', 'cat.png'\]"):
        RunFolder(final, overwrite=True)
    assert snapshot(final) == before


def test_a_comparison_folder_is_ours_only_with_its_own_outputs(tmp_path):
    folder = tmp_path / "cmp"
    (folder / "r_models").mkdir(parents=True)
    for name in ("r.json", "r.md", "r_curves.png", "r_overoptimization.png", "r.partial.json"):
        (folder / name).write_text("x")
    (folder / "r_models" / "neighbor_grpo_lr0.0003_k0_seed0.safetensors").write_text("x")
    for path in (folder, folder / "r_models"):
        (path / MARKER).write_text(json.dumps({"kind": "compare", "version": "0.1.0"}))
    assert check_folder_target(folder, overwrite=True) and check_folder_target(folder / "r_models", overwrite=True)
    (folder / "r_models" / "notes.txt").write_text("mine")
    with pytest.raises(OwnershipError, match=r"did not write \['r_models'\]"):
        check_folder_target(folder, overwrite=True)
    with pytest.raises(OwnershipError, match=r"did not write \['notes.txt'\]"):
        check_folder_target(folder / "r_models", overwrite=True)


def test_overwrite_refuses_a_user_folder_with_one_line_and_touches_nothing(tmp_path):
    final = tmp_path / "photos"
    final.mkdir()
    (final / "cat.png").write_bytes(b"\x89PNG")
    with pytest.raises(OwnershipError) as caught:
        RunFolder(final, overwrite=True)
    assert "\n" not in str(caught.value) and "'cat.png'" in str(caught.value)
    assert sorted(p.name for p in final.iterdir()) == ["cat.png"]  # not even a lock file


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "home", "root", "git", "nested_git", "symlink"])
def test_overwrite_always_refuses_protected_folders_even_of_ours(tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    run.mkdir()
    make_old_run(run)
    target = run
    if where == "cwd":
        monkeypatch.chdir(run)
        target = "."
    elif where == "parent_of_cwd":
        (run / "aligned" / "deep").mkdir()
        monkeypatch.chdir(run / "aligned" / "deep")
        target = "../.."
    elif where == "home":
        monkeypatch.setenv("HOME", str(run))
    elif where == "root":
        target = "/"
    elif where == "git":
        (run / ".git").mkdir()
    elif where == "nested_git":
        (run / "checkpoints" / "iter-000002" / ".git").write_text("gitdir: elsewhere")
    elif where == "symlink":
        (tmp_path / "link").symlink_to(run)
        target = tmp_path / "link"
    before = snapshot(run)
    with pytest.raises(OwnershipError, match="the tool never replaces it"):
        RunFolder(target, overwrite=True)
    assert snapshot(run) == before


def test_without_overwrite_a_non_empty_folder_is_refused_and_an_empty_one_is_used(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("a")
    with pytest.raises(OwnershipError, match="is not empty; pass --resume"):
        RunFolder(mine)
    empty = tmp_path / "empty"
    empty.mkdir()
    with RunFolder(empty) as folder:
        folder.commit()
    assert marker_kind(empty) == "run"


def test_a_file_or_a_path_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("keep")
    for target in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(OwnershipError, match="is a file, not a folder"):
            RunFolder(target, overwrite=True)
    assert (tmp_path / "f").read_text() == "keep"


KILL_AFTER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    from neighbor_grpo.runs.runfolder import RunFolder
    folder = RunFolder(sys.argv[1], overwrite=True)
    (folder.path / "config.yaml").write_text("new")
    if sys.argv[2] == "set-aside":  # die between the two renames of commit()
        final = Path(sys.argv[1]).resolve()
        os.replace(final, final.parent / f".{final.name}.old-{os.getpid()}")
    os._exit(9)
''')


@pytest.mark.parametrize("moment", ["start-up", "set-aside"])
def test_leftovers_of_a_killed_process_are_cleaned_and_the_old_run_put_back(tmp_path, moment):
    final = tmp_path / "run"
    final.mkdir()
    old = make_old_run(final)
    subprocess.run([sys.executable, "-c", KILL_AFTER, str(final), moment], env=dict(os.environ), check=False)
    assert any(p.name.startswith(".run.") for p in tmp_path.iterdir())
    clean_leftovers(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert snapshot(final) == old


def test_a_staging_folder_of_a_live_process_is_left_alone(tmp_path):
    final = tmp_path / "run"
    with RunFolder(final) as folder:
        clean_leftovers(final)  # the lock of the staging folder is held: not a leftover
        assert folder.path.is_dir()
        folder.commit()


# ---- file outputs -------------------------------------------------------------------------------------------------

def test_file_outputs_are_refused_when_they_exist_unless_overwrite(tmp_path):
    out = tmp_path / "r.json"
    check_file_outputs([out, out.with_suffix(".png")], overwrite=False)  # nothing there: fine
    out.with_suffix(".png").write_bytes(b"png")
    with pytest.raises(OwnershipError, match=r"exist\(s\); pass --overwrite"):
        check_file_outputs([out, out.with_suffix(".png")], overwrite=False)
    check_file_outputs([out, out.with_suffix(".png")], overwrite=True)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(OwnershipError, match="is a folder; expected a file path"):
        check_file_outputs([tmp_path / "d.json"], overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OwnershipError, match="is a file, not a folder"):
        check_file_outputs([tmp_path / "f" / "r.json"], overwrite=True)
    (tmp_path / "link.json").symlink_to(tmp_path / "f")
    for special in (tmp_path / "link.json", "/dev/null"):  # never replaced by a file, even with --overwrite
        with pytest.raises(OwnershipError, match="is not a regular file"):
            check_file_outputs([__import__("pathlib").Path(special)], overwrite=True)


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path):
    probe = "/sys/ngrpo-run"  # sysfs: nobody, not even root, can make files there
    with pytest.raises(OwnershipError, match="cannot write in"):
        check_folder_target(probe, overwrite=False)
    with pytest.raises(OwnershipError, match="cannot write in"):
        check_file_outputs([__import__("pathlib").Path(probe) / "r.json"], overwrite=False)
