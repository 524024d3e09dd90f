"""The `builtin:words` data: common short English words rendered on the fly as black text on white (nothing is
downloaded; the font is DejaVu Sans Bold where the machine has it, else Pillow's built-in scalable font).

Recipe measured in issue #24: 3-4 letter words, centred with at most 3 px of jitter and 10% size jitter, rendered
at 32x128 and downscaled to 16x64 (the model's pixels). Training and held-out words are disjoint: the base model and
any alignment only ever see `TRAIN_WORDS`; legibility is reported on `HELDOUT_WORDS`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

COMMON_WORDS = tuple("""
the for but you any had was our day has his man now see way boy its put she use add ago aim art bad bar big box buy
cat cut dry eat end far few fix fun god guy hit ice key lad lay lie lot map mom nor oil pen pie pop red run sea sit
sky sun tea tie top try web win yet also ball bank bath beat best blue body book both burn cake calm card case cell
club cold cook copy cost dark date deal deep diet down drop duck duty earn easy else ever fact fair farm fear file
film fine firm five flow foot four from full gain gate girl glad gold good grow half hand hard hear help hero hill
hole hope hour idea iron jazz jump keep king lake last lead less lift line live lock look loss luck main male mark
meal meat menu milk mine mode more move must near need next nine note only pack pain park pass path pick plan plot
pool port pull push rain rare read rest rich ring risk rock roof rule sale same save seed self send shoe shot shut
side sing size slow soft some soon soup star step such sure talk tank team tend test than them they this tone tour
tree true type upon user very vote wait walk want wash weak week west when wide wild wind wing wise with word yard
zero
""".split())
HELDOUT_EVERY = 5
"""Every fifth word (in the list's order) is held out: 20% of the words, spread over the alphabet and lengths."""
TRAIN_WORDS = tuple(w for i, w in enumerate(COMMON_WORDS) if i % HELDOUT_EVERY)
HELDOUT_WORDS = tuple(w for i, w in enumerate(COMMON_WORDS) if not i % HELDOUT_EVERY)
RENDER_SIZE = (32, 128)
"""(height, width) the words are drawn at, before downscaling to the model's pixels."""
FONT_SIZE = 24
FONT_FILE = "DejaVuSans-Bold.ttf"
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")


def word_prompt(word: str) -> str:
    """The prompt asking for a word, in Flow-GRPO's form: the `ocr` reward scores the double-quoted text."""
    return f'the word "{word}"'


TRAIN_PROMPTS = tuple(word_prompt(w) for w in TRAIN_WORDS)
HELDOUT_PROMPTS = tuple(word_prompt(w) for w in HELDOUT_WORDS)


def prompt_to_word(prompt: str) -> str:
    """'the word "cat"' -> 'cat' (a bare word is accepted too); refused with the expected form otherwise."""
    text = prompt.split('"')[1] if prompt.count('"') >= 2 else prompt.strip()
    if not text or len(text) > MAX_LETTERS or not all(c in ALPHABET for c in text):
        raise ValueError(f'prompt {prompt!r}: builtin:words draws one word of 1-{MAX_LETTERS} lowercase letters '
                         'a-z, asked as the word "cat" (or just cat)')
    return text


ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MAX_LETTERS = 8
"""The character encoder's sequence length: the data has 3-4 letters, room is left for longer words."""


@functools.lru_cache(maxsize=8)
def load_font(size: int):
    """DejaVu Sans Bold at `size` px if installed, else Pillow's built-in scalable font (Pillow >= 10.1)."""
    from PIL import ImageFont

    for folder in FONT_DIRS:
        if (Path(folder) / FONT_FILE).is_file():
            return ImageFont.truetype(str(Path(folder) / FONT_FILE), size)
    return ImageFont.load_default(size=size)


def render_word(word: str, size_scale: float = 1.0, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """`word` in black on white at RENDER_SIZE, centred then moved by `shift` = (dx, dy) px, as (H, W) uint8."""
    from PIL import Image, ImageDraw

    height, width = RENDER_SIZE
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    font = load_font(max(8, round(FONT_SIZE * size_scale)))
    draw.text((width / 2 + shift[0], height / 2 + shift[1]), word, fill=0, font=font, anchor="mm")
    return np.asarray(image)


def render_words(words, image_size: tuple[int, int] = (16, 64), generator: torch.Generator | None = None,
                 max_shift: int = 3, size_jitter: float = 0.1) -> torch.Tensor:
    """Words as images in [0, 1], shape (n, 1, *image_size): drawn at RENDER_SIZE with random shifts of up to
    `max_shift` px and font sizes within +-`size_jitter` (none without a generator), then area-downscaled."""
    images = []
    for word in words:
        scale, shift = 1.0, (0, 0)
        if generator is not None:
            scale = 1.0 + size_jitter * (2 * torch.rand((), generator=generator).item() - 1)
            shift = tuple(torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist())
        images.append(torch.from_numpy(render_word(word, scale, shift).copy()))
    pixels = torch.stack(images).unsqueeze(1).float() / 255.0
    if tuple(pixels.shape[-2:]) != tuple(image_size):
        pixels = F.interpolate(pixels, size=image_size, mode="area")
    return pixels


def decode_word_latents(latents: torch.Tensor) -> torch.Tensor:
    """Model pixels (batch, 1, 16, 64) in [-1, 1] -> images (batch, 1, 32, 128), nominal [0, 1], NOT clamped: a
    fixed bilinear 2x upsampling to the size the words were drawn at (and the OCR reward reads best)."""
    images = (latents.float() + 1.0) / 2.0
    return F.interpolate(images, size=RENDER_SIZE, mode="bilinear", align_corners=False)
