"""GLUE evaluation metrics.

Delegates to scikit-learn and scipy rather than re-implementing them, so numbers are
comparable with published GLUE results computed the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdrun.data.tasks import TaskSpec

__all__ = ["Evaluation", "compute_metrics", "main_metric_value"]


def _as_class_indices(predictions: np.ndarray) -> np.ndarray:
    """Accept logits (n, C) or indices (n,) so callers need not argmax themselves."""
    preds = np.asarray(predictions)
    if preds.ndim == 2:
        return preds.argmax(axis=-1)
    if preds.ndim != 1:
        raise ValueError(f"classification predictions must be 1-D or 2-D, got shape {preds.shape}")
    if not np.issubdtype(preds.dtype, np.integer):
        rounded = np.rint(preds)
        if not np.array_equal(rounded, preds):
            raise ValueError("1-D classification predictions must be class indices")
        preds = rounded
    return preds.astype(np.int64)


def _as_scores(predictions: np.ndarray) -> np.ndarray:
    """Regression heads output (n, 1); flatten that but refuse genuinely 2-D input."""
    preds = np.asarray(predictions, dtype=np.float64)
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1:
        raise ValueError(f"regression predictions must be 1-D or (n, 1), got shape {preds.shape}")
    return preds


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's dev metrics, and whether the training loop may keep it as the best model.

    A score alone cannot say: a classifier that answers "equivalent" to every MRPC pair scores 81.2 F1,
    more than a weak student that actually reads its input, and keeping it would put a constant
    predictor into a paper table (it did, in a TinyBERT Table 3 run)."""

    metrics: dict[str, float]
    # Why this checkpoint must not be kept as the best however well it scores; None when it may be.
    not_selectable_because: str | None = None
    # The model's outputs per dev split (row order), for comparing formats of one model.
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)


def compute_metrics(
    task: TaskSpec, predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Compute ``task.metrics`` as plain floats (JSON/logging friendly).

    Unlabeled examples (label -1 / NaN, i.e. test splits) are rejected because a
    silently wrong score is worse than an error.
    """
    if task.is_regression:
        preds = _as_scores(predictions)
        gold = np.asarray(labels, dtype=np.float64).reshape(-1)
        if np.isnan(gold).any():
            raise ValueError("labels contain NaN (unlabeled examples); cannot compute metrics")
    else:
        preds = _as_class_indices(predictions)
        gold = np.asarray(labels).reshape(-1).astype(np.int64)
        if (gold < 0).any():
            raise ValueError("labels contain -1 (unlabeled examples); cannot compute metrics")
    if preds.shape[0] != gold.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {gold.shape[0]} labels")
    if gold.shape[0] == 0:
        raise ValueError("cannot compute metrics on an empty set")

    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            # GLUE reports F1 of the positive class (duplicate / equivalent = 1).
            out[name] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(gold, preds))
        elif name in ("pearson", "spearman"):
            fn = pearsonr if name == "pearson" else spearmanr
            # Constant predictions (early in training) give NaN; scipy warns, we
            # just report the NaN instead of spamming the log.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = float(fn(preds, gold)[0])
        else:  # pragma: no cover - TaskSpec validates metric names
            raise ValueError(f"unknown metric {name!r}")
    return out


def main_metric_value(task: TaskSpec, metrics: dict[str, float]) -> float:
    """The number used to pick the best checkpoint (higher is better for all GLUE metrics)."""
    try:
        return float(metrics[task.main_metric])
    except KeyError:
        raise ValueError(
            f"metrics for task {task.name!r} lack its main metric {task.main_metric!r} "
            f"(have: {', '.join(metrics) or 'nothing'})"
        ) from None
