"""Prompt sets: read from text, JSONL or CSV files, and a fixed train/eval split.

Formats (picked by the file's extension):
  .txt            one prompt per line; blank lines are skipped
  .jsonl          one JSON value per line: a string, or an object whose `field` (default "prompt") is the prompt;
                  an object may also give `image`, the source image of an editing instruction (a path, relative
                  to the JSONL file's folder): that row becomes an `EditPrompt`
  .csv / .tsv     a header row; the column named `field` holds the prompts (the first column if absent)
"""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FORMATS = (".txt", ".jsonl", ".csv", ".tsv")
IMAGE_FIELD = "image"  # the JSONL key of an editing row's source image


class EditPrompt(str):
    """An editing instruction that carries its source image (an absolute path). It is the instruction's text
    wherever a prompt string is used (logs, rewards' prompts, tokenizers), but two edit prompts are equal only when
    text and image are: a prompt cache or a train/eval split keyed by prompts keeps them apart."""

    image: str

    def __new__(cls, text: str, image: str | Path):
        prompt = super().__new__(cls, text)
        prompt.image = str(image)
        return prompt

    def __eq__(self, other) -> bool:
        return str.__eq__(self, other) and getattr(other, "image", None) == self.image

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((str(self), self.image))

    def __getnewargs__(self):
        return str(self), self.image

    def __repr__(self) -> str:
        return f"EditPrompt({str(self)!r}, image={self.image!r})"


def source_image_paths(prompts: Sequence[str]) -> list[str] | None:
    """Each prompt's source image, or None when no prompt has one; a batch mixing both is an error."""
    paths = [getattr(p, "image", None) for p in prompts]
    if all(path is None for path in paths):
        return None
    if any(path is None for path in paths):
        raise ValueError("prompts: editing prompts (with a source image) and text-only prompts are mixed in one "
                         "prompt set; give every JSONL row an `image`, or none")
    return paths


@functools.lru_cache(maxsize=256)
def _source_image(path: str, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError) as error:
        raise ValueError(f"source image {path!r}: not a readable image ({error})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def load_source_images(prompts: Sequence[str], height: int, width: int) -> torch.Tensor | None:
    """The prompts' source images as float (batch, 3, height, width) in [0, 1] (resized with Lanczos, as diffusers'
    image processors do), or None when the prompts carry none. Each file is read once per size."""
    paths = source_image_paths(prompts)
    if paths is None:
        return None
    return torch.stack([_source_image(path, int(height), int(width)) for path in paths])


def read_prompt_file(path: str | Path, field: str = "prompt", where: str = "prompts.file") -> list[str]:
    """All prompts of one file, in file order; errors name `where` (the config key or flag), the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where} {str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{where} {str(path)!r}: unknown format {suffix or '(no extension)'!r}; expected one of "
                         f"{list(FORMATS)} (.txt one prompt per line, .jsonl objects with {field!r}, .csv a {field!r} column)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} {str(path)!r}: not UTF-8 text ({error})") from error
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = _jsonl_prompts(text, field, f"{where} {str(path)!r}", path.parent)
    else:
        prompts = _table_prompts(text, field, "\t" if suffix == ".tsv" else ",", f"{where} {str(path)!r}")
    if not prompts:
        raise ValueError(f"{where} {str(path)!r}: holds no prompts")
    return prompts


def _jsonl_prompts(text: str, field: str, where: str, folder: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}, line {number}: not valid JSON ({error.msg})") from None
        image = None
        if isinstance(value, dict):
            if not isinstance(value.get(field), str):
                raise ValueError(f"{where}, line {number}: expected a string field {field!r}; the object has "
                                 f"{sorted(value)[:6]}")
            image = value.get(IMAGE_FIELD)
            if image is not None:
                image = _source_image_path(image, folder, f"{where}, line {number}")
            value = value[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}, line {number}: expected a string or an object with {field!r}, "
                             f"got {type(value).__name__}")
        if value.strip():
            prompts.append(value.strip() if image is None else EditPrompt(value.strip(), image))
    if len({isinstance(p, EditPrompt) for p in prompts}) > 1:
        raise ValueError(f"{where}: some rows give an `{IMAGE_FIELD}` and some do not; an editing prompt set needs a "
                         "source image on every row")
    return prompts


def _source_image_path(image: object, folder: Path, where: str) -> str:
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: expected `{IMAGE_FIELD}` to be a path to the source image, got {image!r}")
    path = Path(image).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise FileNotFoundError(f"{where}: source image {str(path)!r}: no such file")
    return str(path.resolve())


def _table_prompts(text: str, field: str, delimiter: str, where: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    column = header.index(field) if field in header else 0
    if field not in header and len(header) > 1:
        raise ValueError(f"{where}: no column {field!r} in the header {header[:6]}; name the prompt column with "
                         f"prompts.field (or --prompt-field)")
    prompts = []
    for number, row in enumerate(body, start=2):
        if len(row) <= column:
            if any(cell.strip() for cell in row):
                raise ValueError(f"{where}, line {number}: expected at least {column + 1} column(s), got {len(row)}")
            continue
        if row[column].strip():
            prompts.append(row[column].strip())
    return prompts


def split_prompts(prompts: list[str], eval_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A fixed random split (keyed by `seed`) into (train, eval); every distinct prompt lands on one side only,
    so a duplicated line never leaks a held-out prompt into training."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"prompts.eval_fraction: expected a value in [0, 1), got {eval_fraction!r}")
    distinct = list(dict.fromkeys(prompts))
    n_eval = int(round(len(distinct) * eval_fraction))
    if eval_fraction > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= len(distinct):
        raise ValueError(f"prompts.eval_fraction {eval_fraction}: leaves no training prompt out of {len(distinct)} "
                         "distinct prompts")
    order = np.random.default_rng(seed).permutation(len(distinct))
    held_out = {distinct[i] for i in order[:n_eval]}
    return [p for p in prompts if p not in held_out], [p for p in distinct if p in held_out]


def resolve_prompt_sets(prompts_config) -> tuple[list[str], list[str]]:
    """(train, eval) prompts from a PromptsConfig: the inline lists, a file (optionally split), an eval file;
    the eval list is cut to `eval_limit` prompts when that is set."""
    c = prompts_config
    train, held_out = list(c.train), list(c.eval)
    if c.file is not None:
        train = read_prompt_file(c.file, c.field, "prompts.file")
        if c.eval_fraction > 0:
            train, held_out = split_prompts(train, c.eval_fraction, c.split_seed)
    if c.eval_file is not None:
        held_out = read_prompt_file(c.eval_file, c.field, "prompts.eval_file")
    if c.eval_limit is not None:
        held_out = held_out[: c.eval_limit]
    return train, held_out
