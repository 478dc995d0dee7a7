"""Accuracy-vs-speedup plots (PNG) for benchmark and family results; needs the ``[plot]`` extra (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .saving import atomic_write


def plot_tradeoff(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                  x_label: str = "measured speedup", y_label: str = "perplexity", title: str | None = None,
                  log_y: bool = True, reference: float | None = None) -> Path:
    """One line per method through its (x, y) points, sorted by x; ``reference`` draws the dense value."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError('plots need matplotlib: pip install "optimum-prune[plot]"') from err
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = "osD^v<>"
    for i, (name, points) in enumerate(series.items()):
        pts = sorted(points)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle=":", linewidth=1, label="dense")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, fig.savefig, suffix=".png")  # savefig reads the format off the suffix
    finally:
        plt.close(fig)
