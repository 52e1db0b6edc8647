"""Batched inference and dev-set scoring, shared by the training loop's periodic
evaluation and the evaluate stage so that both report the very same numbers."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import datasets
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdrun.data.batching import MODEL_INPUTS, sorted_eval_batches
from kdrun.data.tasks import TaskSpec
from kdrun.metrics import Evaluation, compute_metrics
from kdrun.models.inputs import forward_inputs
from kdrun.precision import Precision

logger = logging.getLogger(__name__)


def model_inputs(
    batch: Mapping[str, torch.Tensor], device: torch.device | None = None, model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The tensors a model's forward takes (drops labels and example ids; and, given
    ``model``, what it does not name, e.g. token_type_ids for DistilBERT)."""
    inputs = {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_INPUTS}
    return inputs if model is None else forward_inputs(model, inputs)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _rows_progress(description: str | None, total: int) -> Iterator[Callable[[int], None]]:
    """Advance by a number of rows. Long predictions (teacher logits over ~10^5 augmented rows take
    minutes on a CPU) get a bar in a terminal and a log line per tenth in log files; with no
    ``description`` (dev sets, seconds) nothing is shown."""
    if description is None:
        yield lambda rows: None
        return
    start, done, next_log = time.perf_counter(), 0, max(total // 10, 1)
    with Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(rows: int) -> None:
            nonlocal done, next_log
            done += rows
            bar.advance(task, rows)
            if done >= next_log or done == total:
                logger.info("%s: %d/%d rows (%.0f rows/s)", description, done, total, done / (time.perf_counter() - start))
                next_log += max(total // 10, 1)

        yield advance


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    features: datasets.Dataset,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    description: str | None = None,
    precision: Precision | None = None,
) -> np.ndarray:
    """Logits for every row of ``features``, in row order (batches are length-sorted internally), as fp32;
    ``description`` shows progress; ``precision`` autocasts the forwards (None: the caller's context)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    lengths = features["length"]
    logits: list[np.ndarray | None] = [None] * len(features)
    with _rows_progress(description, len(features)) as advance:
        for indices in sorted_eval_batches(lengths, batch_size):
            batch = collate([features[i] for i in indices])
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                output = model(**model_inputs(batch, device, model))
            values = output.logits.float().cpu().numpy()
            for row, index in enumerate(indices):
                logits[index] = values[row]
            advance(len(indices))
    model.train(was_training)
    return np.stack(logits) if logits else np.zeros((0, 1), dtype=np.float32)


def logits_to_predictions(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.is_regression else logits.argmax(axis=-1)


def single_class_predictions(task: TaskSpec, predictions: Mapping[str, np.ndarray]) -> str | None:
    """Says which split a classifier answered with one class throughout, or None if it did not."""
    if task.is_regression:
        return None
    constant = [
        f"'{task.label_names[int(values[0])]}' for all {len(values)} {split} examples"
        for split, values in predictions.items()
        if len(values) > 1 and np.unique(values).size == 1
    ]
    return f"it predicts {' and '.join(constant)}" if constant else None


def score_dev_sets(
    model: torch.nn.Module,
    task: TaskSpec,
    dev_sets: Mapping[str, datasets.Dataset],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    precision: Precision | None = None,
) -> Evaluation:
    """Task metrics on each dev split (keys ``<metric>`` for one split, ``<split>/<metric>`` for MNLI's
    two), and, for a training loop choosing its best checkpoint, whether the model may be kept: a
    classifier that gives every example of a split the same class may not, however it scores."""
    predictions: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    outputs: dict[str, np.ndarray] = {}
    for split, features in dev_sets.items():
        outputs[split] = predict_logits(model, features, collate, batch_size, precision=precision)
        predictions[split] = logits_to_predictions(task, outputs[split])
        metrics = compute_metrics(task, predictions[split], np.asarray(features["label"]))
        prefix = f"{split}/" if len(dev_sets) > 1 else ""
        scores.update({f"{prefix}{name}": value for name, value in metrics.items()})
    return Evaluation(scores, single_class_predictions(task, predictions), outputs)


def main_metric_key(task: TaskSpec) -> str:
    """The score that picks the best checkpoint (matched accuracy for MNLI)."""
    return f"{task.eval_splits[0]}/{task.main_metric}" if len(task.eval_splits) > 1 else task.main_metric
