"""What `ngrpo compare` trains and scores, per task: the base models it resolves, the proxy every method trains on,
the gold nothing trains on or selects with, the training and held-out prompts, the realism monitor's reference
images and the settings every run of the task shares. The task is chosen from `--base` (`task_for_base`).

- `digits` (builtin:digits, digits-unet, digits-reflow, an ngrpo model folder): proxy `digit_prob`, gold
  `digit_gold` (with its components gold_class and typical), the prompts 0-9 for training and evaluation, realism
  against split A's real digits (the gold reads only split B).
- `words` (builtin:words, a WordsPipeline folder, a LoRA of one): proxy `ocr` (rapidocr, recognition only), gold
  `ocr_tesseract` (an independent reader; the comparison refuses to run without it), training on TRAIN_WORDS and
  evaluated on HELDOUT_WORDS, realism against clean renders of the training words (never the held-out ones: a
  monitor that selects must not read what the table reports on), which measures how word-like a sample looks
  whether or not it is legible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from neighbor_grpo.config.train_config import DIGITS


@dataclass(frozen=True)
class BenchTask:
    name: str
    proxy: dict
    """The reward every method trains on, as a config entry of `rewards` ({name, kwargs})."""
    gold: dict
    """The held-out gold, same form: never trained on, never used to select anything."""
    train_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    """Held-out evaluations, the monitors' bands and the distance probe read these."""
    settings: tuple[str, ...]
    """Config overrides every run of the task shares (prompts per iteration, fine-tuning mode)."""
    resolve_base: Callable[[str, bool], str]
    """(--base, progress) -> the model folder; builds a built-in model on first use. One-line ValueError if unknown."""
    check_rewards: Callable[[bool], None]
    """Builds what the rewards need (the digit classifier) or refuses in one line what is missing (Tesseract)."""
    realism_reference: Callable[[object], torch.Tensor | None]
    """adapter -> the images the realism monitor measures nearest distances to (decoded like samples), or None."""
    realism_note: str
    """What the realism reference is, in words (the results JSON records it)."""


# ---- digits ---------------------------------------------------------------------------------------------------

def resolve_digits_base(base_path: str, progress: bool) -> str:
    """A built-in digits model (`builtin:NAME`, pretrained and cached on first use) or an ngrpo model folder."""
    from neighbor_grpo.builtin.pretrain import BUILTIN_MODELS, ensure_builtin_model

    if base_path == "builtin:digits-reflow":  # the few-step student (builtin/distill.py)
        from neighbor_grpo.builtin.distill import ensure_reflow_model

        return str(ensure_reflow_model(progress=progress))
    if base_path.startswith("builtin:"):
        name = base_path.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"--base {base_path!r}: unknown built-in model; expected one of {', '.join(BASES)} or a "
                             f"model folder")
        return str(ensure_builtin_model(name, progress=progress))
    if not (Path(base_path) / "model.json").is_file():
        raise ValueError(f"--base {base_path!r}: expected builtin:NAME or a model folder of ngrpo (with model.json)")
    return base_path


def build_digit_classifier(progress: bool) -> None:
    """The proxy's classifier, trained and cached on first use."""
    from neighbor_grpo.builtin.pretrain import ensure_classifier

    ensure_classifier(progress=progress)


def split_a_digits(adapter) -> torch.Tensor | None:
    """Split A's real digits as the model decodes them (models that encode images). Split B is the gold's own data
    (rewards/gold.py), so a monitor on B would hand the selection part of the gold."""
    if not hasattr(adapter, "encode_images"):
        return None
    from neighbor_grpo.builtin.data import load_digits_images, train_test_split

    if getattr(adapter, "_split_a_reference", None) is None:
        size = adapter.net_config.latent_size
        images, labels = load_digits_images(size)
        adapter._split_a_reference = adapter.decode(adapter.encode_images(images[train_test_split(len(labels))[0]]))
    return adapter._split_a_reference


# ---- words ----------------------------------------------------------------------------------------------------

def is_words_folder(path: Path) -> bool:
    """A WordsPipeline diffusers folder, or an ngrpo folder (a LoRA export, a checkpoint) of the words adapter."""
    for name, key, value in (("model_index.json", "_class_name", "WordsPipeline"), ("model.json", "adapter", "words")):
        try:
            if json.loads((path / name).read_text()).get(key) == value:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def resolve_words_base(base_path: str, progress: bool) -> str:
    """builtin:words (the committed base, or the cached one pretrained on first use) or a words model folder."""
    if base_path == "builtin:words":
        from neighbor_grpo.builtin.words_pretrain import ensure_words_model

        return str(ensure_words_model(progress=progress))
    if not is_words_folder(Path(base_path)):
        raise ValueError(f"--base {base_path!r}: expected builtin:words or a WordsPipeline folder")
    return base_path


def require_tesseract(progress: bool) -> None:
    """The words gold is Tesseract: without it there is no table, so refuse before anything runs."""
    from neighbor_grpo.rewards.tesseract import tesseract_missing

    missing = tesseract_missing()
    if missing:
        raise ValueError(f"--base: the words comparison's gold (ocr_tesseract) needs Tesseract; {missing}")


def training_words(adapter) -> torch.Tensor:
    """The training words rendered cleanly (centred, no jitter) and decoded like samples: word-like pixels, whether
    or not a reader can read them, and never the held-out words the table reports on."""
    from neighbor_grpo.builtin.words import TRAIN_WORDS, render_words

    if getattr(adapter, "_training_words_reference", None) is None:
        pixels = render_words(TRAIN_WORDS, image_size=tuple(adapter.latent_shape()[1:]))
        adapter._training_words_reference = adapter.decode(pixels * 2.0 - 1.0)
    return adapter._training_words_reference


def _words_task() -> BenchTask:
    from neighbor_grpo.builtin.words import HELDOUT_PROMPTS, TRAIN_PROMPTS

    one_thread = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}  # each worker is one thread
    return BenchTask(
        name="words", proxy={"name": "ocr", "kwargs": {"mode": "recognize", "engine_options": one_thread}},
        gold={"name": "ocr_tesseract"}, train_prompts=TRAIN_PROMPTS, eval_prompts=HELDOUT_PROMPTS,
        # the demo's LoRA and words per iteration (builtin/configs/words_demo.yaml): the adapter path real diffusers
        # models train through; 4 words give DanceGRPO (2,544 FE an iteration) 4 iterations at --budget-fe 10000
        settings=("prompts_per_iteration=4", "optim.finetune=lora", "optim.lora_rank=8", "optim.lora_alpha=8.0"),
        resolve_base=resolve_words_base, check_rewards=require_tesseract, realism_reference=training_words,
        realism_note="clean renders of the training words (never the held-out words the gold is scored on)")


DIGITS_TASK = BenchTask(
    name="digits", proxy={"name": "digit_prob"}, gold={"name": "digit_gold"}, train_prompts=tuple(DIGITS),
    eval_prompts=tuple(DIGITS), settings=("prompts_per_iteration=8",), resolve_base=resolve_digits_base,
    check_rewards=build_digit_classifier, realism_reference=split_a_digits,
    realism_note="split A (the base model's training digits; the gold reads only split B)")
TASKS: dict[str, Callable[[], BenchTask]] = {"digits": lambda: DIGITS_TASK, "words": _words_task}
BASES = ("builtin:digits", "builtin:digits-unet", "builtin:digits-reflow", "builtin:words")


def task_for_base(base_path: str) -> BenchTask:
    """The task a --base belongs to: builtin:words and words folders are `words`, everything else `digits`."""
    if base_path == "builtin:words" or (not base_path.startswith("builtin:") and is_words_folder(Path(base_path))):
        return TASKS["words"]()
    return TASKS["digits"]()


def load_rewards(task: BenchTask, device: str) -> tuple:
    """(proxy, gold): the trained-on rewards (a WeightedRewards) and the held-out gold reward object."""
    from neighbor_grpo.rewards import REWARDS, build_rewards

    name = task.gold["name"]
    if name not in REWARDS:
        raise RuntimeError(f"gold reward {name!r} is not registered; the comparison scores every method on it")
    return build_rewards([task.proxy], device=device), build_rewards([task.gold], device=device).rewards[name]


def gold_components(gold, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{"gold": per-image score, and the gold's components where it has them (digit_gold: gold_class, typical)}."""
    if hasattr(gold, "components"):
        return gold.components(images, prompts)
    return {"gold": gold(images, prompts)}
