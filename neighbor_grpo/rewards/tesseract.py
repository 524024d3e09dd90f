"""`ocr_tesseract`: the OCR reward's formula read by Tesseract 5 (Debian's `tesseract-ocr`, through pytesseract) —
an independent reader with its own weights that nothing in this project trains on or against: the gold of the
text-rendering task (builtin:words), where `ocr` (rapidocr, PaddleOCR's models) is the proxy.

Set up for one short word per image as issue #24 measured it: page segmentation `--psm 7` (one text line), a
lowercase letter whitelist, the image upscaled and framed by a white border. Upscaled 3x, not the issue's 2x: on
builtin:words' clean renders at the model's resolution (16x64 decoded to 32x128) it reads 0.93 of the words exactly
against 0.89 (2x) and 0.90 (4x); renders drawn at 32x128 directly it reads 1.00. Stricter than rapidocr (clean words
100%, but blur sigma 2 only ~35%): a large rapidocr-minus-tesseract gap is the signature of glyphs only PaddleOCR
accepts. A benchmark dependency, not a test one: `apt-get install tesseract-ocr` and `pip install pytesseract`.
"""

from __future__ import annotations

import shutil
from typing import Sequence

import numpy as np
import torch

from neighbor_grpo.rewards import register_reward
from neighbor_grpo.rewards.ocr import QUOTED_TEXT, target_text, text_accuracy

INSTALL = "apt-get install tesseract-ocr (the engine) and pip install pytesseract"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tesseract_missing() -> str | None:
    """Why Tesseract cannot run here (what to install), or None when it can."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return f"the Python package pytesseract is missing: {INSTALL}"
    if shutil.which("tesseract") is None:
        return f"the tesseract program is missing: {INSTALL}"
    return None


class TesseractTextAccuracy:
    """Score = text_accuracy(what Tesseract reads, the prompt's target text), images (batch, C, H, W) in [0, 1]."""

    def __init__(self, pattern: str = QUOTED_TEXT, upscale: int = 3, border: int = 16, whitelist: str = LETTERS):
        import pytesseract

        self.tesseract, self.pattern, self.upscale, self.border = pytesseract, pattern, upscale, border
        self.config = f"--psm 7 -c tessedit_char_whitelist={whitelist}"

    def read_text(self, image: torch.Tensor) -> str:
        from PIL import Image, ImageOps

        gray = (image.detach().float().clamp(0, 1).mean(0) * 255).round().to(torch.uint8).cpu().numpy()
        picture = Image.fromarray(np.ascontiguousarray(gray))
        picture = picture.resize((picture.width * self.upscale, picture.height * self.upscale), Image.BICUBIC)
        picture = ImageOps.expand(picture, border=self.border, fill=255)
        return self.tesseract.image_to_string(picture, config=self.config).strip()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = [text_accuracy(self.read_text(image), target_text(prompt, self.pattern, True))
                  for image, prompt in zip(images, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register_reward("ocr_tesseract")
def make_ocr_tesseract(pattern: str = QUOTED_TEXT, upscale: int = 3, border: int = 16,
                       whitelist: str = LETTERS) -> TesseractTextAccuracy:
    """`pattern`: regex whose group 1 is the target text (as `ocr`); `upscale`, `border` (px, white) and `whitelist`
    (the characters Tesseract may read) set up its input as issue #24 measured."""
    missing = tesseract_missing()
    if missing:
        raise ImportError(f"the ocr_tesseract reward needs Tesseract: {missing}")
    return TesseractTextAccuracy(pattern, upscale, border, whitelist)
