"""The gold reward of the built-in digits model: a judge nothing trains on, fixed before any comparison.

gold = gold_class x typical, per image:
- `gold_class`: P(prompted digit) under an RBF support-vector classifier (another family than the proxy CNN),
  fitted on split B only (the 359 held-out digits, never seen by the base model or the proxy) with +-1 pixel
  shift augmentation and Platt (sigmoid) calibration over 5 folds grouped by original digit.
- `typical`: 1 if the image's nearest B digit of the prompted class is no further away than the 95th percentile of
  the leave-one-out nearest-neighbour distances among B's digits of that class, else 0 - "looks like a real
  digit of that class", so a classifier-fooling image scores 0 however sure the classifier is.

Both see the image as a user does (`user_view`): clamped to [0, 1], quantised to 8 bits, then 2x2 average-pooled
from the model's 16x16 output to the 8x8 grid of the original digits. B's digits go through the same path
(bilinear 8 -> 16 as the model's decoder does, then `user_view`). Settings are fixed in `GoldSettings`; the fit
is deterministic, cached once, and checked against its recorded fingerprint on every load.
Validity numbers: benchmarks/gold_validation.py, docs/benchmarks.md ("Gold metric").
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from neighbor_grpo.builtin.data import gold_split_b, load_digits_images, prompt_to_label
from neighbor_grpo.rewards import register_reward


@dataclass(frozen=True)
class GoldSettings:
    """Pre-registered before any model output was scored; changing any field makes a different gold."""

    image_size: int = 16
    """The built-in model's output resolution; images are pooled from it to `pooled_size`."""
    pooled_size: int = 8
    svc_c: float = 10.0
    svc_gamma: str = "scale"
    max_shift: int = 1
    """Augmentation: every shift in [-max_shift, max_shift]^2 pixels (on the pooled grid) of every B digit."""
    calibration_folds: int = 5
    typical_quantile: float = 0.95
    seed: int = 0


def user_view(images: torch.Tensor, settings: GoldSettings = GoldSettings()) -> torch.Tensor:
    """(N, C, H, W) model outputs -> (N, pooled^2) float64 features: what a user sees, on the digits' own grid."""
    x = images.detach().float().cpu()
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != settings.image_size or x.shape[-2] != settings.image_size:
        raise ValueError(f"digit_gold: images must be {settings.image_size}x{settings.image_size} (the built-in "
                         f"digits model's output), got {tuple(x.shape[-2:])}")
    x = torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0  # an 8-bit image file
    x = F.adaptive_avg_pool2d(x, settings.pooled_size)
    return x.flatten(1).double().numpy()


def shifted_copies(features: np.ndarray, labels: np.ndarray, max_shift: int, size: int):
    """Every +-max_shift pixel shift (zero fill) of every image; returns features, labels and the source index."""
    grid = torch.from_numpy(features).view(-1, 1, size, size)
    padded = F.pad(grid, (max_shift,) * 4)
    span = 2 * max_shift + 1
    copies = [padded[..., dy:dy + size, dx:dx + size] for dy in range(span) for dx in range(span)]
    out = torch.cat(copies).flatten(1).numpy()
    n = len(labels)
    return out, np.tile(labels, span * span), np.tile(np.arange(n), span * span)


def loo_nn_radius(members: np.ndarray, quantile: float) -> float:
    """The `quantile` of each member's distance to its nearest other member (leave-one-out)."""
    d = np.linalg.norm(members[:, None, :] - members[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(np.quantile(d.min(axis=1), quantile))


def _b_features(settings: GoldSettings) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digits_images(settings.image_size)
    b = gold_split_b(len(labels))
    return user_view(images[b], settings), labels[b].numpy()


def fit_gold(settings: GoldSettings = GoldSettings()):
    """The calibrated SVC and the per-class typical radii, fitted on split B alone (deterministic)."""
    return fit_gold_on(*_b_features(settings), settings)


def fit_gold_on(features: np.ndarray, labels: np.ndarray, settings: GoldSettings = GoldSettings()):
    """The gold's construction on any reference set of user-view digits (B, or a resample of B: the stability
    check of neighbor_grpo.rewards.gold_stability)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GroupKFold
    from sklearn.svm import SVC

    x, y, source = shifted_copies(features, labels, settings.max_shift, settings.pooled_size)
    # folds grouped by original digit: the calibration never sees a shifted copy of a digit it is scored on
    folds = list(GroupKFold(settings.calibration_folds).split(x, y, groups=source))
    svc = SVC(C=settings.svc_c, gamma=settings.svc_gamma, random_state=settings.seed)
    classifier = CalibratedClassifierCV(svc, method="sigmoid", cv=folds, ensemble=False).fit(x, y)
    radii = [loo_nn_radius(features[labels == c], settings.typical_quantile) for c in range(10)]
    return classifier, radii


def _fingerprint(classifier, features: np.ndarray) -> str:
    """Hash of the fitted classifier's probabilities on B (rounded): a refit that differs is caught."""
    probs = np.round(classifier.predict_proba(features), 6)
    return hashlib.sha256(probs.tobytes()).hexdigest()[:16]


def _data_key(features: np.ndarray, labels: np.ndarray, settings: GoldSettings) -> str:
    text = json.dumps(asdict(settings), sort_keys=True).encode() + features.tobytes() + labels.tobytes()
    return hashlib.sha256(text).hexdigest()[:10]


def ensure_gold(settings: GoldSettings = GoldSettings()) -> Path:
    """The cached gold folder (fitted on first use, published atomically), verified against its fingerprint."""
    from neighbor_grpo.builtin.pretrain import _publish, cache_root

    features, labels = _b_features(settings)
    folder = cache_root() / f"digit-gold-{_data_key(features, labels, settings)}"
    if not (folder / "gold.json").is_file():
        classifier, radii = fit_gold(settings)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "gold.pkl").write_bytes(pickle.dumps({"classifier": classifier, "radii": radii}))
        meta = {"settings": asdict(settings), "fingerprint": _fingerprint(classifier, features), "radii": radii}
        (tmp / "gold.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, folder)
    return folder


class GoldReward:
    """gold = gold_class x typical per image; `components` gives all three, `extra_metrics` their means."""

    def __init__(self, classifier, radii: Sequence[float], settings: GoldSettings = GoldSettings(),
                 reference: tuple[np.ndarray, np.ndarray] | None = None):
        self.classifier, self.radii, self.settings = classifier, np.asarray(radii, dtype=np.float64), settings
        features, labels = _b_features(settings) if reference is None else reference
        self._b_by_class = [features[labels == c] for c in range(10)]

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        labels = np.array([prompt_to_label(p) for p in prompts])
        features = user_view(images, self.settings)
        gold_class = self.classifier.predict_proba(features)[np.arange(len(labels)), labels]
        nearest = np.array([np.linalg.norm(self._b_by_class[c] - f, axis=1).min() for f, c in zip(features, labels)])
        typical = (nearest <= self.radii[labels]).astype(np.float64)
        out = {"gold": gold_class * typical, "gold_class": gold_class, "typical": typical}
        return {k: torch.as_tensor(v, dtype=torch.float32, device=images.device) for k, v in out.items()}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.components(images, prompts)["gold"]

    def extra_metrics(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        return {name: float(value.mean()) for name, value in self.components(images, prompts).items()}


def load_gold(folder: str | Path | None = None, settings: GoldSettings = GoldSettings()) -> GoldReward:
    """Load the cached gold and refuse it if its probabilities no longer match the recorded fingerprint."""
    folder = Path(folder) if folder else ensure_gold(settings)
    meta_path = folder / "gold.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no gold reward here (expected gold.json and gold.pkl)")
    meta = json.loads(meta_path.read_text())
    saved = pickle.loads((folder / "gold.pkl").read_bytes())
    features, _ = _b_features(settings)
    if _fingerprint(saved["classifier"], features) != meta["fingerprint"]:
        raise ValueError(f"{folder}: the gold classifier's probabilities differ from its recorded fingerprint "
                         f"{meta['fingerprint']} (another scikit-learn?); delete that folder to refit")
    return GoldReward(saved["classifier"], saved["radii"], settings)


@register_reward("digit_gold")
def make_digit_gold_reward(path: str | None = None) -> GoldReward:
    """The built-in model's gold (never trained on: use it in eval.monitor_rewards)."""
    return load_gold(path)
