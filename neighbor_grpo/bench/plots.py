"""A comparison's two PNG plots: gold and proxy against forward-equivalents, and the over-optimisation view (gold
against proxy and against the distance from the base model); every seed a thin line, one colour per method."""

from __future__ import annotations

from pathlib import Path

from neighbor_grpo.runs.io import atomic_write_bytes


def series(run: dict, key: str) -> list[float]:
    """One value of every evaluation of a run's curve."""
    return [record[key] for record in run["curve"]]


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, panels, figsize=(5.2 * panels, 4), dpi=110, squeeze=False)


def _save(plt, fig, path: Path) -> None:
    import io

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _draw(ax, results: dict, x_key: str, y_key: str, xlabel: str, ylabel: str) -> None:
    """Every seed as a thin line, one colour per method."""
    for k, (m, by_seed) in enumerate(results["runs"].items()):
        color = f"C{k}"
        for i, run in enumerate(by_seed.values()):
            ax.plot(series(run, x_key), series(run, y_key), color=color, alpha=0.6, linewidth=1,
                    label=m if i == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_report(results: dict, folder: Path, stem: str) -> None:
    """{stem}_curves.png: gold and proxy vs forward-equivalents (target line); {stem}_overoptimization.png: gold vs
    proxy and gold vs distance from the base model."""
    plt, fig, axes = _figure(2)
    _draw(axes[0][0], results, "fe", "gold", "training forward-equivalents", "held-out gold")
    axes[0][0].axhline(results["target"]["gold"], color="k", linestyle="--", linewidth=1)
    _draw(axes[0][1], results, "fe", "proxy", "training forward-equivalents", "held-out proxy (trained on)")
    _save(plt, fig, folder / f"{stem}_curves.png")
    plt, fig, axes = _figure(2)
    _draw(axes[0][0], results, "proxy", "gold", "held-out proxy", "held-out gold")
    _draw(axes[0][1], results, "distance", "gold", "distance from base: mean ||v - v_ref||^2", "held-out gold")
    axes[0][1].axvline(results["common_distance"], color="k", linestyle="--", linewidth=1)
    _save(plt, fig, folder / f"{stem}_overoptimization.png")
