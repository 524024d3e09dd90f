"""Build the built-in default: the digit classifier (the reward model) and the base flow-matching model (whose
training loop, `train_flow_matching`, also trains distill.py's reflow student).

The base model is pretrained with a share of labels replaced at random, so it follows prompts only partly
(prompt accuracy ~0.5) and alignment has something real to fix.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neighbor_grpo.builtin.cache import cache_root, settings_key, writable_cache_root
from neighbor_grpo.builtin.data import load_digits_images, train_test_split
from neighbor_grpo.runs.exports import write_manifest
from neighbor_grpo.maths.flow import interpolate
from neighbor_grpo.models.digits import DigitsAdapter, DigitsNetConfig
from neighbor_grpo.models.digits_unet import DigitsUNetAdapter, DigitsUNetConfig
from neighbor_grpo.rewards.digit_classifier import ClassifierSettings, DigitClassifier, default_classifier_dir  # noqa: F401


@dataclass
class BaseModelSettings:
    net: DigitsNetConfig = field(default_factory=DigitsNetConfig)
    label_noise: float = 0.4
    """Share of training labels replaced by a uniformly random digit."""
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    seed: int = 0


@dataclass
class UNetBaseModelSettings(BaseModelSettings):
    """The compute-bound U-Net (models/digits_unet.py), pretrained like the MLP, with the same 40% label noise so
    that alignment has the same room. Fewer steps: each costs ~10x the MLP's (255 CPU-seconds in all, one thread)."""

    net: DigitsUNetConfig = field(default_factory=DigitsUNetConfig)
    steps: int = 2000
    lr: float = 2e-3


BUILTIN_MODELS = {"digits": BaseModelSettings, "digits-unet": UNetBaseModelSettings}
"""`model.path: builtin:NAME` (and `ngrpo pretrain --model NAME`) -> its default pretraining settings."""


def adapter_class_for(net_config) -> type[DigitsAdapter]:
    return DigitsUNetAdapter if isinstance(net_config, DigitsUNetConfig) else DigitsAdapter


def default_base_dir(settings: BaseModelSettings = BaseModelSettings()) -> Path:
    prefix = "digits-unet-base" if isinstance(settings.net, DigitsUNetConfig) else "digits-base"
    return cache_root() / f"{prefix}-{settings_key(settings)}"


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to one pixel (augmentation for the classifier)."""
    padded = F.pad(images, (max_shift,) * 4)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def train_classifier(settings: ClassifierSettings = ClassifierSettings(), progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train the digit classifier on the shared train split; returns it and its held-out accuracy."""
    images, labels = load_digits_images(settings.image_size)
    train_idx, test_idx = train_test_split(len(labels))
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = DigitClassifier(settings.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_idx) + settings.batch_size - 1) // settings.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch)
    x_train, y_train = images[train_idx], labels[train_idx]
    for _ in tqdm(range(settings.epochs), desc="reward classifier", unit="epoch", disable=not progress):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = F.cross_entropy(model(_random_shift(x_train[batch], generator)), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(-1) == labels[test_idx]).float().mean().item()
    return model, accuracy


def train_base_model(settings: BaseModelSettings = BaseModelSettings(), progress: bool = True) -> DigitsAdapter:
    """Rectified-flow pretraining (loss ||v - (eps - x0)||^2) with noisy labels; returns the EMA weights."""
    images, labels = load_digits_images(settings.net.latent_size)
    train_idx, _ = train_test_split(len(labels))
    x_data = DigitsAdapter.encode_images(images[train_idx])
    y_data = labels[train_idx].clone()
    generator = torch.Generator().manual_seed(settings.seed)
    replace = torch.rand(len(y_data), generator=generator) < settings.label_noise
    y_data[replace] = torch.randint(0, 10, (int(replace.sum()),), generator=generator)

    def data_and_noise(size: int):
        batch = torch.randint(0, len(y_data), (size,), generator=generator)
        return x_data[batch], torch.randn(x_data[batch].shape, generator=generator), y_data[batch]

    adapter_class = adapter_class_for(settings.net)
    adapter = adapter_class.create(settings.net, seed=settings.seed)
    ema = adapter_class.create(settings.net, seed=settings.seed)
    ema.net.load_state_dict(adapter.net.state_dict())
    ema.net.requires_grad_(False)
    train_flow_matching(adapter, ema, data_and_noise, settings.steps, settings.batch_size, settings.lr,
                        settings.ema_decay, generator, f"base model ({adapter_class.adapter_name})", progress,
                        one_cycle=True)
    return ema


def train_flow_matching(model, ema, draw, steps: int, batch_size: int, lr: float, ema_decay: float,
                        generator: torch.Generator, desc: str, progress: bool = True, one_cycle: bool = False) -> None:
    """The loop of pretraining and of reflow: AdamW on the flow-matching loss ||v(x_s, s, y) - (z - x0)||^2,
    x_s = (1 - s) x0 + s z, s ~ U(0, 1), over `steps` batches `draw(batch_size) -> (x0, z, y)`; `ema`'s weights
    follow `model`'s with `ema_decay`. `one_cycle`: a one-cycle learning-rate schedule (5% warm-up)."""
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05) if one_cycle else None
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        x0, z, y = draw(batch_size)
        s = torch.rand(batch_size, generator=generator)
        x_s = interpolate(x0, z, s.view(-1, *([1] * (x0.dim() - 1))))
        loss = F.mse_loss(model.velocity(x_s, s, y), z - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.net.parameters(), model.net.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def ensure_classifier(progress: bool = True, settings: ClassifierSettings = ClassifierSettings()) -> tuple[Path, float]:
    """The cached classifier folder (built on first use) and its held-out accuracy."""
    folder = default_classifier_dir(settings)
    meta = folder / "classifier.json"
    if not meta.is_file():
        writable_cache_root()  # before the training, not when its result is saved
        model, accuracy = train_classifier(settings, progress=progress)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save(tmp, extra={"heldout_accuracy": accuracy, "settings": asdict(settings)})
        _publish(tmp, folder)
    return folder, json.loads(meta.read_text())["heldout_accuracy"]


def ensure_base_model(progress: bool = True, settings: BaseModelSettings = BaseModelSettings()) -> Path:
    """The cached base model folder, built on first use."""
    folder = default_base_dir(settings)
    if not (folder / "model.json").is_file():
        writable_cache_root()  # before minutes of pretraining, not when its result is saved
        started = time.perf_counter()
        adapter = train_base_model(settings, progress=progress)
        seconds = time.perf_counter() - started
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        adapter.save(tmp, extra={"pretrain": asdict(settings), "pretrain_seconds": round(seconds, 1),
                                 "pretrain_threads": torch.get_num_threads()})
        write_manifest(tmp)
        _publish(tmp, folder)
    return folder


def ensure_builtin_model(name: str, progress: bool = True) -> Path:
    """The cached base model of `builtin:NAME` at its default settings, built on first use (builtin:words: the
    committed one when its settings are the defaults)."""
    if name == "words":
        from neighbor_grpo.builtin.words_pretrain import ensure_words_model

        return ensure_words_model(progress=progress)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model.path: unknown built-in model 'builtin:{name}'; expected one of "
                         f"{', '.join('builtin:' + n for n in [*BUILTIN_MODELS, 'words'])}")
    return ensure_base_model(progress=progress, settings=BUILTIN_MODELS[name]())


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a finished folder into place; if another process won the race, keep theirs."""
    import shutil

    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
