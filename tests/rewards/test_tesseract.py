"""The text-rendering gold, Tesseract (ocr_tesseract): a benchmark dependency, so these skip where it is absent."""

import pytest
import torch

from neighbor_grpo.rewards import tesseract
from neighbor_grpo.rewards.tesseract import tesseract_missing

pytestmark = pytest.mark.usefixtures("single_thread")
needs_tesseract = pytest.mark.skipif(tesseract_missing() is not None,
                                     reason=f"Tesseract is a benchmark dependency: {tesseract_missing()}")


@needs_tesseract
def test_tesseract_reads_clean_words_and_nothing_in_noise():
    from neighbor_grpo.builtin.words import COMMON_WORDS, render_words, word_prompt

    reader = tesseract.make_ocr_tesseract()
    words = COMMON_WORDS[::4]
    images = render_words(words, image_size=(32, 128), generator=torch.Generator().manual_seed(0))
    assert (reader(images, [word_prompt(w) for w in words]) == 1).float().mean() >= 0.95  # measured 1.00
    noise = torch.cat([torch.rand(4, 1, 32, 128, generator=torch.Generator().manual_seed(1)), torch.ones(1, 1, 32, 128)])
    assert reader(noise, ['the word "cat"'] * 5).tolist() == [0.0] * 5


def test_without_the_engine_the_reward_names_what_to_install(monkeypatch):
    monkeypatch.setattr(tesseract.shutil, "which", lambda name: None)  # as on a machine without tesseract-ocr
    assert "apt-get install tesseract-ocr" in tesseract_missing()
    with pytest.raises(ImportError, match="ocr_tesseract reward needs Tesseract: .*apt-get install tesseract-ocr"):
        tesseract.make_ocr_tesseract()
