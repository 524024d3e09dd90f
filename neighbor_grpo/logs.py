"""Metrics as CSV and TensorBoard (consistent across resumes), sample grids and reward curves as PNG."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from neighbor_grpo.io import atomic_write_bytes, atomic_write_text


class MetricsLog:
    """Append-only CSV + TensorBoard. Rows are keyed by iterations done; on resume from a checkpoint taken after
    `start_iteration` iterations, later rows are dropped and TensorBoard events after it purged."""

    def __init__(self, folder: Path, start_iteration: int = 0, tensorboard: bool = True, wandb_run=None):
        self.path = folder / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(float(row["iteration"])) <= start_iteration]
            self._rewrite()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_iteration + 1 if start_iteration else None)
        self.wandb_run = wandb_run

    def _rewrite(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys.extend(k for k in row if k not in keys)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def log(self, iteration: int, values: dict[str, float]) -> None:
        row = {"iteration": iteration, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        self.rows.append(row)
        self._rewrite()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    self.writer.add_scalar(key, float(value), iteration)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=iteration)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(int(float(r["iteration"])), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_grid(images: torch.Tensor, path: Path, row_labels: list[str] | None = None, scale: int = 4) -> None:
    """A PNG grid of raw images (P, S, C, H, W) in [0, 1] (clamped), one row per prompt."""
    from PIL import Image, ImageDraw

    P, S, C, H, W = images.shape
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pad, label_w = 2, (14 if row_labels else 0)
    canvas = Image.new("L" if C == 1 else "RGB", (label_w + S * (W * scale + pad) + pad, P * (H * scale + pad) + pad), 255)
    for p in range(P):
        for s in range(S):
            tile = pixels[p, s]
            array = tile[0].numpy() if C == 1 else tile.permute(1, 2, 0).numpy()
            image = Image.fromarray(array).resize((W * scale, H * scale), Image.NEAREST)
            canvas.paste(image, (label_w + pad + s * (W * scale + pad), pad + p * (H * scale + pad)))
        if row_labels:
            ImageDraw.Draw(canvas).text((2, pad + p * (H * scale + pad) + H * scale // 2 - 5), row_labels[p][:2], fill=0)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """A PNG line plot, one line per named curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (xs, ys) in curves.items():
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
