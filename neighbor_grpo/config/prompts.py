"""Prompt sets: read from text, JSONL or CSV files, and a fixed train/eval split.

Formats (picked by the file's extension):
  .txt            one prompt per line; blank lines are skipped
  .jsonl          one JSON value per line: a string, or an object whose `field` (default "prompt") is the prompt
  .csv / .tsv     a header row; the column named `field` holds the prompts (the first column if absent)
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

FORMATS = (".txt", ".jsonl", ".csv", ".tsv")


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
        prompts = _jsonl_prompts(text, field, f"{where} {str(path)!r}")
    else:
        prompts = _table_prompts(text, field, "\t" if suffix == ".tsv" else ",", f"{where} {str(path)!r}")
    if not prompts:
        raise ValueError(f"{where} {str(path)!r}: holds no prompts")
    return prompts


def _jsonl_prompts(text: str, field: str, where: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}, line {number}: not valid JSON ({error.msg})") from None
        if isinstance(value, dict):
            if not isinstance(value.get(field), str):
                raise ValueError(f"{where}, line {number}: expected a string field {field!r}; the object has "
                                 f"{sorted(value)[:6]}")
            value = value[field]
        if not isinstance(value, str):
            raise ValueError(f"{where}, line {number}: expected a string or an object with {field!r}, "
                             f"got {type(value).__name__}")
        if value.strip():
            prompts.append(value.strip())
    return prompts


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
