"""The ocr reward with RapidOCR's real bundled models on text rendered with PIL."""

import pytest
import torch

from neighbor_grpo.rewards import build_rewards
from neighbor_grpo.rewards.ocr import edit_distance, target_text, text_accuracy, QUOTED_TEXT

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread (tests/conftest.py)

pytest.importorskip("rapidocr_onnxruntime")


def rendered(text, size=(256, 96)):
    """Black text on white as a (3, H, W) tensor in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    try:
        font = ImageFont.load_default(size=36)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        font = ImageFont.load_default()
    ImageDraw.Draw(image).text((12, 28), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def ocr_reward():
    # one onnxruntime thread and a smaller detection size keep this quick on a shared 2-core machine
    options = {"intra_op_num_threads": 1, "det_limit_side_len": 320}
    return build_rewards([{"name": "ocr", "kwargs": {"engine_options": options}}]).rewards["ocr"]


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("abc", "abc") == 0


def test_text_accuracy_follows_flow_grpo():
    assert text_accuracy("Hello World", "helloworld") == 1.0  # case and spaces ignored
    assert text_accuracy("the sign says HELLO today", "hello") == 1.0  # contained counts as exact
    assert text_accuracy("HELO", "hello") == pytest.approx(0.8)
    assert text_accuracy("", "hello") == 0.0
    assert text_accuracy("a very long unrelated sentence", "hi") == 0.0  # distance capped at len(target)


def test_target_text_rule():
    assert target_text('a sign that says "HELLO" at dawn', QUOTED_TEXT, True) == "HELLO"
    assert target_text('"first" and "second"', QUOTED_TEXT, True) == "first"
    assert target_text("no quotes here", QUOTED_TEXT, True) == "no quotes here"
    assert target_text("text: OPEN", r"text: (\w+)", True) == "OPEN"
    with pytest.raises(ValueError, match="no quotes here"):
        target_text("no quotes here", QUOTED_TEXT, False)


def test_right_text_scores_high_and_wrong_text_low(ocr_reward):
    images = torch.stack([rendered("HELLO"), rendered("OPEN 24"), rendered("HELLO"), rendered("OPEN 24")])
    prompts = ['a sign that says "HELLO"', 'a neon sign "open 24"', 'a sign that says "GOODBYE"',
               'a sign that says "ZEBRA"']
    scores = ocr_reward(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores[0] == 1.0 and scores[1] == 1.0, scores
    assert scores[2] < 0.5 and scores[3] < 0.5, scores


def test_blank_image_scores_zero_and_grey_images_work(ocr_reward):
    images = torch.stack([torch.ones(1, 96, 256), rendered("HELLO").mean(0, keepdim=True)])
    assert ocr_reward(images, ['"HELLO"', '"HELLO"']).tolist() == [0.0, 1.0]


def test_bad_pattern_is_refused_when_built():
    import re

    with pytest.raises(re.error):
        build_rewards([{"name": "ocr", "kwargs": {"pattern": "(unclosed"}}])


@pytest.fixture(scope="module")
def line_reader():
    options = {"intra_op_num_threads": 1}
    return build_rewards([{"name": "ocr", "kwargs": {"mode": "recognize", "engine_options": options}}]).rewards["ocr"]


def test_recognize_mode_reads_clean_rendered_words(line_reader):
    """Recognition only (no detection) on builtin:words' own renders, jittered as in its training data, at the size
    its model decodes to (16x64 pixels upsampled to 32x128): exact on at least 95% of the words (100% measured)."""
    from neighbor_grpo.builtin.words import COMMON_WORDS, decode_word_latents, render_words, word_prompt

    words = COMMON_WORDS[::3]
    pixels = render_words(words, generator=torch.Generator().manual_seed(0))
    scores = line_reader(decode_word_latents(pixels * 2 - 1), [word_prompt(w) for w in words])
    assert (scores == 1).float().mean() >= 0.95, [w for w, s in zip(words, scores) if s < 1]
    # the same images asked for other words score lower: the reader reads, it does not echo the prompt
    shuffled = [word_prompt(w) for w in words[1:] + words[:1]]
    assert (line_reader(decode_word_latents(pixels * 2 - 1), shuffled) == 1).float().mean() < 0.1


def test_recognize_mode_scores_noise_and_blank_images_zero(line_reader):
    generator = torch.Generator().manual_seed(1)
    images = torch.cat([torch.rand(8, 1, 32, 128, generator=generator), torch.ones(2, 1, 32, 128),
                        torch.zeros(2, 1, 32, 128)])
    assert line_reader(images, ['the word "cat"'] * len(images)).tolist() == [0.0] * len(images)


def test_an_unknown_mode_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"rewards.ocr.mode: expected one of detect, recognize; got 'fast'"):
        build_rewards([{"name": "ocr", "kwargs": {"mode": "fast"}}])
