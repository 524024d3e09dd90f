"""`ocr`: how well the text asked for in the prompt is written in the image, read by RapidOCR (ONNX models shipped
inside the rapidocr-onnxruntime wheel, so nothing downloads). The formula follows Flow-GRPO's OCR reward.

Two readers: `detect` (the default, for real images) runs RapidOCR's whole pipeline, text detection then recognition
of each box; `recognize` reads the whole image as one text line with the recognition model alone. For small
single-line images (a rendered word) the second is ~100x cheaper (about 15 CPU-ms against 1.3-1.6 CPU-s, because
detection upscales a 32x128 image to about 736x2944) and more accurate (detection splits one-line crops into wrong
boxes: 0.70 exact on clean words, against 1.00)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from neighbor_grpo.rewards import register_reward

QUOTED_TEXT = r'"([^"]+)"'
OCR_MODES = ("detect", "recognize")
LINE_SHAPE = [3, 48, 192]
"""Recognition input (C, H, W) in `recognize` mode: RapidOCR's default width 320 would pad a 1:4 word image with
40% blank; 192 fits it."""


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1), two-row dynamic programme."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalise_text(text: str) -> str:
    """Flow-GRPO compares without spaces and case."""
    return text.replace(" ", "").lower()


def text_accuracy(recognised: str, target: str) -> float:
    """1 - edit distance / len(target), in [0, 1], as Flow-GRPO: the target found anywhere in the recognised text
    counts as exact (extra text in the image is not penalised), and the distance is capped at len(target), so
    recognising a lot of unrelated text costs no more than recognising nothing."""
    recognised, target = normalise_text(recognised), normalise_text(target)
    if not target:
        return 1.0
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


def target_text(prompt: str, pattern: str, fallback_to_prompt: bool) -> str:
    """The text to be written: group 1 of the first match of `pattern` (default: the first "double-quoted" span, as
    Flow-GRPO's prompt.split('"')[1]); without a match, the whole prompt or an error."""
    match = re.search(pattern, prompt)
    if match:
        return match.group(1)
    if fallback_to_prompt:
        return prompt
    raise ValueError(f"prompt {prompt!r} has no target text matching {pattern!r}")


def to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8 in OpenCV's BGR order, what RapidOCR takes for arrays."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()[..., ::-1])


class LineRecognizer:
    """RapidOCR's recognition model alone (its `TextRecognizer`, no detection): an image is one text line.
    Called like the RapidOCR engine, so OcrTextAccuracy reads with either."""

    def __init__(self, recognizer):
        self.recognizer = recognizer

    def __call__(self, image: np.ndarray, use_cls: bool = False):
        # one image per call: in a batch RapidOCR pads every line to the widest one, so a score would depend on
        # its batch-mates (and on one thread batching is no faster)
        [(text, confidence)], elapsed = self.recognizer(image)
        return ([(None, text, float(confidence))] if text else []), elapsed


class OcrTextAccuracy:
    """Score = text_accuracy(all text RapidOCR reads, top to bottom, joined; the prompt's target text).

    Images: (batch, C, H, W) in [0, 1], any size (RapidOCR resizes internally for detection; text smaller than
    about 10 px high is rarely read). Runs on CPU through onnxruntime, one image at a time."""

    def __init__(self, engine, pattern: str = QUOTED_TEXT, fallback_to_prompt: bool = True,
                 min_confidence: float = 0.0):
        self.engine, self.pattern, self.fallback_to_prompt = engine, pattern, fallback_to_prompt
        self.min_confidence = min_confidence

    def read_text(self, image: torch.Tensor) -> str:
        lines, _timings = self.engine(to_bgr_uint8(image), use_cls=False)
        return "".join(text for _box, text, confidence in (lines or []) if confidence > self.min_confidence)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = [text_accuracy(self.read_text(image), target_text(prompt, self.pattern, self.fallback_to_prompt))
                  for image, prompt in zip(images, prompts)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


@register_reward("ocr")
def make_ocr(pattern: str = QUOTED_TEXT, fallback_to_prompt: bool = True, min_confidence: float = 0.0,
             config_path: str | None = None, engine_options: dict | None = None,
             mode: str = "detect") -> OcrTextAccuracy:
    """`pattern`: regex whose group 1 is the target text (default: first double-quoted span). `fallback_to_prompt`:
    score against the whole prompt when nothing matches (False: refuse such prompts). `min_confidence`: ignore
    recognised lines at or below it (Flow-GRPO: 0; RapidOCR itself already drops lines under its `text_score`, 0.5).
    `config_path`: a RapidOCR YAML config (e.g. other models). `engine_options`: RapidOCR keyword overrides, e.g.
    {"intra_op_num_threads": 4, "det_limit_side_len": 736, "text_score": 0.5}. `mode`: `detect` (RapidOCR's
    detection + recognition pipeline, for real images) or `recognize` (the recognition model alone on the whole
    image, input 3x48x192: for short single-line text such as builtin:words; RapidOCR's `text_score` does not
    apply, `min_confidence` does)."""
    if mode not in OCR_MODES:
        raise ValueError(f"rewards.ocr.mode: expected one of {', '.join(OCR_MODES)}; got {mode!r}")
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as error:
        raise ImportError('the ocr reward needs rapidocr-onnxruntime: pip install "neighbor-grpo[ocr]"') from error
    re.compile(pattern)  # a bad pattern fails when the reward is built, not mid-training
    if mode == "recognize":
        return OcrTextAccuracy(_line_recognizer(config_path, engine_options), pattern, fallback_to_prompt,
                               min_confidence)
    engine = RapidOCR(config_path=config_path, **(engine_options or {}))
    return OcrTextAccuracy(engine, pattern, fallback_to_prompt, min_confidence)


def _line_recognizer(config_path: str | None, engine_options: dict | None) -> LineRecognizer:
    """RapidOCR's `TextRecognizer` built from the same YAML (its own, or `config_path`) and keyword overrides as the
    full engine, without loading the detection and direction models."""
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import UpdateParameters, read_yaml, update_model_path

    config = update_model_path(read_yaml(config_path or DEFAULT_CFG_PATH))
    config["Rec"]["rec_img_shape"] = list(LINE_SHAPE)
    if engine_options:
        config = UpdateParameters()(config, **engine_options)
    return LineRecognizer(TextRecognizer(config["Rec"]))
