import numpy as np
import torch
from PIL import Image

from neighbor_grpo.logs import save_grid


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
