"""Write prediction files in the format the GLUE benchmark server accepts.

The server is strict about file names and label spelling, and the conventions
differ per task (names for the NLI tasks, integers elsewhere, a score for STS-B),
so they are encoded here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdrun.data.tasks import TaskSpec

__all__ = ["submission_file_name", "write_glue_submission"]

# Tasks whose gold labels the server expects as strings, not class indices.
_STRING_LABEL_TASKS = frozenset({"mnli", "qnli", "rte"})

_FILE_NAMES: dict[tuple[str, str], str] = {
    ("cola", "test"): "CoLA.tsv",
    ("sst2", "test"): "SST-2.tsv",
    ("mrpc", "test"): "MRPC.tsv",
    ("stsb", "test"): "STS-B.tsv",
    ("qqp", "test"): "QQP.tsv",
    ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv",
    ("qnli", "test"): "QNLI.tsv",
    ("rte", "test"): "RTE.tsv",
    ("wnli", "test"): "WNLI.tsv",
}


def submission_file_name(task: TaskSpec, split: str) -> str:
    """Server-side file name; only test splits can be submitted."""
    try:
        return _FILE_NAMES[(task.name, split)]
    except KeyError:
        raise ValueError(
            f"no GLUE submission file for task {task.name!r} split {split!r}; "
            f"submittable splits: {', '.join(task.test_splits)}"
        ) from None


def _format_predictions(task: TaskSpec, predictions: np.ndarray) -> list[str]:
    preds = np.asarray(predictions)
    if task.is_regression:
        scores = preds.astype(np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1:
            raise ValueError(f"STS-B predictions must be 1-D or (n, 1), got {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError("STS-B predictions contain NaN or inf")
        return [f"{s:.3f}" for s in np.clip(scores, 0.0, 5.0)]
    if preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1:
        raise ValueError(f"predictions must be class indices (n,) or logits (n, C), got {preds.shape}")
    classes = preds.astype(np.int64)
    if ((classes < 0) | (classes >= task.num_labels)).any():
        raise ValueError(f"class indices out of range 0..{task.num_labels - 1}")
    if task.name in _STRING_LABEL_TASKS:
        return [task.label_names[c] for c in classes.tolist()]
    return [str(c) for c in classes.tolist()]


def write_glue_submission(
    task: TaskSpec,
    split: str,
    ids: Sequence[int],
    predictions: np.ndarray,
    out_dir: Path,
) -> Path:
    """Write ``<out_dir>/<server file name>`` and return its path.

    Rows are written sorted by ``id`` (the test file's ``index``), which is the order
    the server expects, whatever order the predictions were produced in.
    """
    name = submission_file_name(task, split)
    id_list = [int(i) for i in ids]
    values = _format_predictions(task, predictions)
    if len(id_list) != len(values):
        raise ValueError(f"{len(id_list)} ids but {len(values)} predictions")
    if len(set(id_list)) != len(id_list):
        raise ValueError("ids contain duplicates")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    rows = sorted(zip(id_list, values), key=lambda r: r[0])
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("index\tprediction\n")
        f.writelines(f"{i}\t{v}\n" for i, v in rows)
    return path
