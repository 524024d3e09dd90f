import csv
import os

import numpy as np
import torch
from PIL import Image

from neighbor_grpo.training.logs import MetricsLog, read_metrics, save_grid


def grid_array(path):
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def test_small_images_are_enlarged_with_a_label_column(tmp_path):
    images = torch.zeros(2, 3, 1, 8, 8)
    images[1] = 1.0
    save_grid(images, tmp_path / "g.png", row_labels=["0", "1"], scale=4)
    mode, array = grid_array(tmp_path / "g.png")
    assert mode == "L" and array.shape == (2 * (32 + 2) + 2, 14 + 3 * (32 + 2) + 2)
    assert array[2 + 5, 14 + 2 + 5] == 0 and array[2 + 34 + 5, 14 + 2 + 5] == 255  # tile pixels, row by row


def test_large_colour_images_are_shrunk_on_a_white_canvas_with_captions(tmp_path):
    images = torch.zeros(2, 2, 3, 512, 512)
    images[:, :, 0] = 1.0  # pure red tiles
    prompts = ["a photo of a cat sitting on a red sofa in the living room, golden hour, " * 3, "a sign"]
    save_grid(images, tmp_path / "g.png", row_labels=prompts, max_tile=128)
    mode, array = grid_array(tmp_path / "g.png")
    assert mode == "RGB" and array.shape[:2] == (2 * (12 + 128 + 2) + 2, 2 * (128 + 2) + 2)
    assert tuple(array[0, -1]) == (255, 255, 255)  # background is white, not red
    assert tuple(array[2 + 12 + 64, 2 + 64]) == (255, 0, 0)
    assert (array[2:2 + 12] < 128).any()  # the caption was drawn above the first row


def test_values_outside_the_range_are_clamped(tmp_path):
    save_grid(torch.full((1, 1, 1, 4, 4), 7.0), tmp_path / "hi.png")
    save_grid(torch.full((1, 1, 1, 4, 4), -3.0), tmp_path / "lo.png")
    assert grid_array(tmp_path / "hi.png")[1][5, 5] == 255 and grid_array(tmp_path / "lo.png")[1][5, 5] == 0


# ---- metrics.csv ------------------------------------------------------------------------------------------------

def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def log_run(folder, iterations, start=0):
    """What the trainer logs: eval_before's held-out row at 0, then one training row per iteration."""
    log = MetricsLog(folder, start_iteration=start, tensorboard=False)
    if start == 0:
        log.log(0, {"heldout/reward": 0.5})
    for done in range(start + 1, iterations + 1):
        log.log(done, {"reward_mean": done / 10, "loss": -float(done)})
    return log


def test_rows_are_appended_in_place_and_the_file_reads_as_one_table(tmp_path):
    log = log_run(tmp_path, 2)
    path = tmp_path / "metrics.csv"
    inode, size = os.stat(path).st_ino, path.stat().st_size
    log.log(3, {"reward_mean": 0.3, "loss": -3.0})
    assert os.stat(path).st_ino == inode and path.stat().st_size > size  # appended, not replaced by a new file
    assert path.read_bytes().endswith(b"3,,0.3,-3\r\n")  # the row lands after what was there (csv's line ends)
    rows = csv_rows(path)
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0] == {"iteration": "0", "heldout/reward": "0.5", "reward_mean": "", "loss": ""}
    assert rows[3] == {"iteration": "3", "heldout/reward": "", "reward_mean": "0.3", "loss": "-3"}
    assert read_metrics(path) == (["iteration", "heldout/reward", "reward_mean", "loss"], rows)
    assert log.series("reward_mean") == ([1, 2, 3], [0.1, 0.2, 0.3])


def test_a_new_column_mid_run_rewrites_the_header_once(tmp_path):
    log = log_run(tmp_path, 3)
    path = tmp_path / "metrics.csv"
    log.log(4, {"reward_mean": 0.4, "loss": -4.0, "heldout/reward": 0.9, "heldout/accuracy": 1.0})
    rows = csv_rows(path)
    assert list(rows[0]) == ["iteration", "heldout/reward", "reward_mean", "loss", "heldout/accuracy"]
    assert [r["heldout/accuracy"] for r in rows] == ["", "", "", "", "1"]
    assert [r["heldout/reward"] for r in rows] == ["0.5", "", "", "", "0.9"]
    inode = os.stat(path).st_ino
    log.log(5, {"reward_mean": 0.5})  # fewer columns than the header: appended with empty cells
    assert os.stat(path).st_ino == inode
    assert csv_rows(path)[-1] == {"iteration": "5", "heldout/reward": "", "reward_mean": "0.5", "loss": "",
                                  "heldout/accuracy": ""}


def test_resume_drops_rows_after_the_checkpoint_and_never_repeats_one(tmp_path):
    log_run(tmp_path, 5)  # killed after logging 5 with the newest checkpoint at 3
    log_run(tmp_path, 6, start=3)
    assert [r["iteration"] for r in csv_rows(tmp_path / "metrics.csv")] == ["0", "1", "2", "3", "4", "5", "6"]
    reference = tmp_path / "straight"
    reference.mkdir()
    log_run(reference, 6)
    assert (tmp_path / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def test_a_row_torn_by_a_crash_is_never_read_and_is_dropped_on_resume(tmp_path):
    log_run(tmp_path, 3)
    path = tmp_path / "metrics.csv"
    whole = path.read_bytes()
    with open(path, "ab") as handle:  # a crash (power loss) in the middle of appending iteration 4's row
        handle.write(b"4,,0.4")
    header, rows = read_metrics(path)
    assert [r["iteration"] for r in rows] == ["0", "1", "2", "3"]
    path.write_bytes(whole + b"4,,0.4,-4,7,8\r\n")  # a line with more fields than the header is not a row either
    assert [r["iteration"] for r in read_metrics(path)[1]] == ["0", "1", "2", "3"]
    path.write_bytes(whole + b"4,,0.4")
    log_run(tmp_path, 5, start=3)  # resumed from the checkpoint after 3
    assert [r["iteration"] for r in csv_rows(path)] == ["0", "1", "2", "3", "4", "5"]
    assert [r["reward_mean"] for r in csv_rows(path)] == ["", "0.1", "0.2", "0.3", "0.4", "0.5"]
