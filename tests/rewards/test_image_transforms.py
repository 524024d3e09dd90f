"""The rewards' tensor image transforms against their upstream references: HPSv2's own letterbox transform and
ImageReward's torchvision transform (pixels committed in tests/rewards/data by make_transform_references.py, which
ran the upstream code), and transformers' CLIPImageProcessor (run here)."""

import numpy as np
import pytest
import torch

from neighbor_grpo.rewards.image_transforms import (centre_crop_offset, centre_crop_transform, letterbox_padding,
                                                    longest_side_size, resize_center_crop_normalize,
                                                    resize_longest_pad_normalize, shortest_side_size)
from neighbor_grpo.rewards.model_loading import CLIP_MEAN, CLIP_STD

from transform_references import SAMPLED, as_float, image_sizes, load_reference

# a float transform of the same bytes: equal to float32 rounding of the same kernel
SAME_KERNEL_ATOL = 2e-5
# Against PIL's uint8 resize (rounded to 1/255 after each of its two passes; 1/255 is about 0.015 here, in
# normalised units) values cannot be equal: measured mean |difference| 0.0045-0.0048, max 0.06-0.17 on these
# images. A wrong size or offset gives a mean of 0.033 (224 x 299 for 4:3) to 0.09 (crop one pixel off).
PIL_MEAN_ATOL, PIL_MAX_ATOL = 0.01, 0.2

HPS = load_reference("hpsv2_transform_reference.npz")
HPS_SIZES = image_sizes(HPS)
CROPS = load_reference("torchvision_crop_reference.npz")
CROP_SIZES = image_sizes(CROPS)


@pytest.mark.parametrize("size", HPS_SIZES)
def test_hpsv2_transform_equals_hpsv2s_own(size):
    image = as_float(HPS[f"image_{size}"])
    at_224 = resize_longest_pad_normalize(image, 224, CLIP_MEAN, CLIP_STD)[0]
    at_32 = resize_longest_pad_normalize(image, 32, CLIP_MEAN, CLIP_STD)[0]
    assert at_224.shape == (3, 224, 224) and at_32.shape == (3, 32, 32)
    np.testing.assert_allclose(at_224[:, SAMPLED, SAMPLED].numpy(), HPS[f"hps224_{size}"], atol=SAME_KERNEL_ATOL, rtol=0)
    np.testing.assert_allclose(at_32.numpy(), HPS[f"hps32_{size}"], atol=SAME_KERNEL_ATOL, rtol=0)


@pytest.mark.parametrize("size", [s for s in HPS_SIZES if s.split("x")[0] != s.split("x")[1]])
def test_the_hpsv2_reference_tells_letterbox_from_centre_crop(size):
    """The old transform (centre crop) is far from HPSv2's pixels on every non-square image."""
    cropped = resize_center_crop_normalize(as_float(HPS[f"image_{size}"]), 224, 224, CLIP_MEAN, CLIP_STD)[0]
    assert np.abs(cropped[:, SAMPLED, SAMPLED].numpy() - HPS[f"hps224_{size}"]).mean() > 0.3


def test_longest_side_rounds_as_python_and_pads_the_odd_pixel_right_and_bottom():
    assert longest_side_size(47, 64, 224) == (164, 224)  # 164.5 -> 164: half to even, as upstream's round()
    assert longest_side_size(45, 64, 224) == (158, 224)  # 157.5 -> 158
    assert longest_side_size(30, 20, 224) == (224, 149)  # an upscale
    assert letterbox_padding(164, 224, 224) == (0, 0, 30, 30)
    assert letterbox_padding(224, 149, 224) == (37, 38, 0, 0)  # (left, right, top, bottom)


def test_hpsv2_pads_black_before_normalising():
    white_strip = torch.ones(1, 3, 8, 32)
    pixels = resize_longest_pad_normalize(white_strip, 32, CLIP_MEAN, CLIP_STD)[0]
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1)
    torch.testing.assert_close(pixels[:, :12].flatten(1), black.expand(3, 12 * 32))
    torch.testing.assert_close(pixels[:, 20:].flatten(1), black.expand(3, 12 * 32))
    torch.testing.assert_close(pixels[:, 12:20], ((1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
                               .view(3, 1, 1).expand(3, 8, 32))


HEIGHT_WIDTHS = [(48, 64), (64, 48), (54, 96), (96, 54), (74, 99), (480, 640), (720, 1280), (1080, 1920),
                 (333, 500), (101, 103), (224, 224), (16, 16), (7, 300)]


@pytest.mark.parametrize("height, width", HEIGHT_WIDTHS)
def test_shortest_side_truncates_as_transformers_and_torchvision(height, width):
    image_transforms = pytest.importorskip("transformers.image_transforms")
    expected = image_transforms.get_resize_output_image_size(np.zeros((height, width, 3)), 224,
                                                            default_to_square=False)
    assert shortest_side_size(height, width, 224) == tuple(expected)


def test_four_by_three_and_sixteen_by_nine_sizes():
    assert shortest_side_size(480, 640, 224) == (224, 298)  # round() gave 299
    assert shortest_side_size(1080, 1920, 224) == (224, 398)
    assert shortest_side_size(640, 480, 224) == (298, 224)


def test_crop_offsets_follow_each_reference():
    assert [centre_crop_offset(excess, "floor") for excess in (74, 75, 77, 174)] == [37, 37, 38, 87]
    assert [centre_crop_offset(excess, "half_even") for excess in (74, 75, 77, 174)] == [37, 38, 38, 87]
    with pytest.raises(ValueError, match="crop_rounding 'nearest'"):
        centre_crop_transform(224, 224, CLIP_MEAN, CLIP_STD, crop_rounding="nearest")


def pil_error(ours: torch.Tensor, reference: np.ndarray) -> tuple[float, float]:
    difference = np.abs(ours.numpy() - reference)
    return float(difference.mean()), float(difference.max())


@pytest.mark.parametrize("size", CROP_SIZES)
def test_centre_crop_matches_imagerewards_torchvision_transform(size):
    """ImageReward (and OpenAI CLIP's preprocess for the aesthetic head): torchvision Resize + CenterCrop on PIL."""
    ours = resize_center_crop_normalize(as_float(CROPS[f"image_{size}"]), 224, 224, CLIP_MEAN, CLIP_STD,
                                        crop_rounding="half_even")[0, :, SAMPLED, SAMPLED]
    mean_error, max_error = pil_error(ours, CROPS[f"crop224_{size}"])
    assert mean_error < PIL_MEAN_ATOL and max_error < PIL_MAX_ATOL


def test_the_torchvision_reference_tells_the_crop_offset_apart():
    """74 x 99 resizes to 224 x 299: transformers' offset (37) is one pixel left of torchvision's (38)."""
    floor = resize_center_crop_normalize(as_float(CROPS["image_74x99"]), 224, 224, CLIP_MEAN, CLIP_STD,
                                         crop_rounding="floor")[0, :, SAMPLED, SAMPLED]
    assert pil_error(floor, CROPS["crop224_74x99"])[0] > 2 * PIL_MEAN_ATOL


def clip_image_processor():
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


@pytest.mark.parametrize("size", CROP_SIZES)
def test_centre_crop_matches_transformers_clip_image_processor(size):
    """clip_score and pickscore: transformers' CLIPImageProcessor (PIL resize, excess // 2 crop offset)."""
    image = CROPS[f"image_{size}"]
    reference = clip_image_processor()(images=image, return_tensors="np")["pixel_values"][0]
    ours = resize_center_crop_normalize(as_float(image), 224, 224, CLIP_MEAN, CLIP_STD)[0]
    assert ours.shape == reference.shape == (3, 224, 224)
    mean_error, max_error = pil_error(ours, reference)
    assert mean_error < PIL_MEAN_ATOL and max_error < PIL_MAX_ATOL


def test_rounding_the_long_side_up_is_caught():
    """The former rule (round(): 224 x 299 for 4:3) is outside the tolerance the processor test uses."""
    image = CROPS["image_48x64"]
    reference = clip_image_processor()(images=image, return_tensors="np")["pixel_values"][0]
    stretched = torch.nn.functional.interpolate(as_float(image), size=(224, 299), mode="bicubic", antialias=True)
    stretched = resize_center_crop_normalize(stretched, 224, 224, CLIP_MEAN, CLIP_STD)[0]
    assert pil_error(stretched, reference)[0] > 2 * PIL_MEAN_ATOL
