"""Figures kdrun writes beside its results (PNG for reading, SVG for papers); matplotlib, no screen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

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
    colour_of = {width: palette(index / max(1, len(widths) - 1)) for index, width in enumerate(widths)}
    colours = [colour_of[b] for b in bits] if bits else ["tab:blue"] * len(layers)
    axes.bar(layers, means, yerr=stds, color=colours, capsize=3)
    if widths:
        # Explicit patches: an empty bar() gives a legend entry in the default colour, not the width's.
        axes.legend(handles=[Patch(color=colour_of[w], label=f"{w}-bit") for w in widths], frameon=False)
    axes.set_xlabel("encoder layer")
    axes.set_ylabel("top Hessian eigenvalue")
    axes.set_xticks(layers)
    axes.set_title(title)
    return save_figure(figure, stem)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both cost (x, lower is better) and score (y, higher is better), by x."""
    ordered = sorted(points, key=lambda p: (p[1], -p[2]))
    front: list[tuple[str, float, float]] = []
    for point in ordered:
        if not front or point[2] > front[-1][2]:
            front.append(point)
    return front


def plot_pareto(points: Sequence[tuple[str, float, float]], x_label: str, y_label: str, stem: Path, title: str = "") -> list[Path]:
    """Score against a cost (parameters, size or latency) for every model of a sweep, the Pareto front joined."""
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    axes.scatter([p[1] for p in points], [p[2] for p in points], color="tab:gray", zorder=2)
    front = pareto_front(points)
    axes.plot([p[1] for p in front], [p[2] for p in front], color="tab:red", marker="o", zorder=3, label="Pareto front")
    for label, x, y in points:
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.legend(frameon=False, loc="lower right")
    return save_figure(figure, stem)


def score_metrics(history: Sequence[dict]) -> list[str]:
    """The logged dev metrics that are scores (every value in [-1, 1]: accuracy, F1, MCC, correlations).
    Counts and losses (the MLM head's ``masked_tokens``, ``mlm_loss``) stay in the history but are not
    drawn: on one axis with a score they would flatten it to a line."""
    names = sorted({k for h in history for k in h if k.startswith("eval_")})
    values = {name: [h[name] for h in history if name in h] for name in names}
    return [name for name in names if all(isinstance(v, (int, float)) and -1.0 <= v <= 1.0 for v in values[name])]


def plot_training_curves(histories: dict[str, list[dict]], stem: Path, title: str = "") -> list[Path]:
    """Training loss (and every logged dev metric) against optimizer steps, one panel row per stage."""
    figure, all_axes = plt.subplots(len(histories), 2, figsize=(9, 2.6 * len(histories)), squeeze=False)
    for (stage, history), (loss_axes, eval_axes) in zip(histories.items(), all_axes):
        losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if losses:
            loss_axes.plot(*zip(*losses), color="tab:blue")
        loss_axes.set_title(f"{stage}: training loss", fontsize=9)
        loss_axes.set_xlabel("step")
        metrics = score_metrics(history)
        for metric in metrics:
            values = [(h["step"], h[metric]) for h in history if metric in h]
            eval_axes.plot(*zip(*values), marker="o", label=metric.removeprefix("eval_"))
        eval_axes.set_title(f"{stage}: dev", fontsize=9)
        eval_axes.set_xlabel("step")
        if metrics:
            eval_axes.legend(frameon=False, fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, stem)
