"""Figures kdrun writes beside its results (PNG for reading, SVG for papers); matplotlib, no screen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORMATS = ("png", "svg")


def save_figure(figure: plt.Figure, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.svg; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    for path in paths:
        figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(figure)
    return paths


def plot_sensitivities(
    means: Sequence[float], stds: Sequence[float], stem: Path, bits: Sequence[int] | None = None, title: str = ""
) -> list[Path]:
    """Q-BERT's per-layer top Hessian eigenvalue (mean +- std over batches), bars coloured by the bits chosen."""
    layers = list(range(1, len(means) + 1))
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.2))
    palette = plt.get_cmap("viridis")
    widths = sorted(set(bits)) if bits else []
    colours = [palette(widths.index(b) / max(1, len(widths) - 1)) for b in bits] if bits else ["tab:blue"] * len(layers)
    axes.bar(layers, means, yerr=stds, color=colours, capsize=3)
    for width in widths:
        axes.bar([], [], color=palette(widths.index(width) / max(1, len(widths) - 1)), label=f"{width}-bit")
    if widths:
        axes.legend(frameon=False)
    axes.set_xlabel("encoder layer")
    axes.set_ylabel("top Hessian eigenvalue")
    axes.set_xticks(layers)
    axes.set_title(title)
    return save_figure(figure, stem)
