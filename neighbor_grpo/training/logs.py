"""Metrics as CSV and TensorBoard (consistent across resumes), sample grids and reward curves as PNG."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import torch

from neighbor_grpo.runs.io import atomic_write_bytes, atomic_write_text


def read_metrics(path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of a metrics.csv. Only complete lines count: a row cut short by a crash or power loss
    while it was appended (no final newline, or fewer fields than the header) is left out, never half-read."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    complete = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(complete, newline="")))
    if not lines:
        return [], []
    header = lines[0]
    return header, [dict(zip(header, line)) for line in lines[1:] if len(line) == len(header)]


class MetricsLog:
    """metrics.csv + TensorBoard (+ wandb), consistent across resumes. Rows are keyed by iterations done; on
    resume from a checkpoint taken after `start_iteration` iterations, later rows (and a torn last line) are
    dropped and TensorBoard events after it purged.

    Each row is appended with one write and fsynced before the iteration's checkpoint can be written, so a row
    of an iteration a checkpoint holds is on disk. The file is rewritten whole (atomically) only when a row
    brings a column the header lacks (the first training row after `eval_before`'s), and once on resume."""

    def __init__(self, folder: Path, start_iteration: int = 0, tensorboard: bool = True, wandb_run=None):
        self.path = folder / "metrics.csv"
        self.columns: list[str] = []
        self.rows: list[dict] = []
        if self.path.exists():
            self.columns, rows = read_metrics(self.path)
            self.rows = [row for row in rows if int(float(row["iteration"])) <= start_iteration]
            self._rewrite()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_iteration + 1 if start_iteration else None)
        self.wandb_run = wandb_run

    def _csv_text(self, rows: list[dict], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, self._csv_text(self.rows, header=True))

    def _append(self, row: dict) -> None:
        """One write() of the whole line with O_APPEND: a kill leaves the line whole or absent."""
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            data = self._csv_text([row], header=False).encode("utf-8")
            if os.write(handle, data) != len(data):
                raise OSError(f"{self.path}: short write while appending a metrics row")
            os.fsync(handle)
        finally:
            os.close(handle)

    def log(self, iteration: int, values: dict[str, float]) -> None:
        row = {"iteration": iteration, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}}
        self.rows.append(row)
        new_columns = [key for key in row if key not in self.columns]
        if new_columns or not self.path.exists():
            self.columns.extend(new_columns)
            self._rewrite()
        else:
            self._append(row)
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


def frame_tiles(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """Videos (P, S, T, C, H, W) -> (P, S * k, C, H, W): k <= `frames` evenly spaced frames of each sample (first and
    last included), the samples one after another along the row."""
    T = videos.shape[2]
    picked = torch.linspace(0, T - 1, min(frames, T)).round().long().unique()
    return videos[:, :, picked].flatten(1, 2)


def save_grid(images: torch.Tensor, path: Path, row_labels: list[str] | None = None, scale: int = 4,
              max_tile: int = 256) -> None:
    """A PNG grid of raw images (P, S, C, H, W) in [0, 1] (clamped), one row per prompt. Small images are enlarged
    `scale` times (nearest), large ones shrunk to `max_tile` pixels; short labels go left of their row, long ones
    (text prompts) above it, cut to the row's width."""
    from PIL import Image, ImageDraw

    if images.dim() == 6:  # videos (P, S, T, C, H, W): a few frames of each, side by side
        images = frame_tiles(images)
    P, S, C, H, W = images.shape
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    factor = min(float(scale), max_tile / max(H, W))
    tile_h, tile_w = max(1, round(H * factor)), max(1, round(W * factor))
    resample = Image.NEAREST if factor >= 1 else Image.LANCZOS
    short = row_labels is not None and all(len(label) <= 2 for label in row_labels)
    pad, label_w = 2, (14 if short else 0)
    caption_h = 12 if row_labels is not None and not short else 0
    row_h = caption_h + tile_h + pad
    canvas = Image.new("L" if C == 1 else "RGB", (label_w + S * (tile_w + pad) + pad, P * row_h + pad),
                       255 if C == 1 else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for p in range(P):
        top = pad + p * row_h
        for s in range(S):
            tile = pixels[p, s]
            array = tile[0].numpy() if C == 1 else tile.permute(1, 2, 0).numpy()
            image = Image.fromarray(array).resize((tile_w, tile_h), resample)
            canvas.paste(image, (label_w + pad + s * (tile_w + pad), top + caption_h))
        if short:
            draw.text((2, top + tile_h // 2 - 5), row_labels[p], fill=0)
        elif row_labels is not None:
            characters = max(4, (canvas.width - 2 * pad) // 6)  # PIL's default bitmap font is about 6 px per character
            label = row_labels[p] if len(row_labels[p]) <= characters else row_labels[p][: characters - 3] + "..."
            draw.text((pad, top), label, fill=0)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


VIDEO_SUFFIXES = (".mp4", ".gif")


def save_video(video: torch.Tensor, path: Path, fps: int = 16) -> None:
    """One video (T, C, H, W) in [0, 1] (clamped) as an MP4 (H.264 through imageio's ffmpeg plugin) or an animated GIF,
    by the path's suffix; written to a temporary sibling and moved into place."""
    try:
        import imageio.v3 as iio
    except ImportError as error:
        raise ImportError('writing .mp4/.gif needs imageio: pip install "neighbor-grpo[video]"') from error
    path = Path(path)
    if path.suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: expected a file ending in .mp4 or .gif")
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}{path.suffix}")
    try:
        if path.suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:  # libx264 wants even sides; macro_block_size 1 keeps small test videos as they are
            iio.imwrite(tmp, frames, extension=".mp4", plugin="FFMPEG", fps=fps, macro_block_size=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
