"""Load GLUE splits into one fixed ``datasets.Dataset`` schema.

Two sources are supported: a local directory in the GLUE distribution layout
(``<glue_dir>/SST-2/train.tsv``, as written by ``download_glue_data.py``) and the
``nyu-mll/glue`` dataset on the Hugging Face hub. Both produce exactly the columns
``id``, ``text_a``, ``text_b``, ``label`` so that everything downstream (tokenizing,
teacher-logit caching keyed by ``id``, metrics) is source-agnostic.

Text is kept byte-for-byte as in the source (SST-2's trailing space included): the
hub copy keeps it too, so both sources yield identical strings.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from kdrun.data.tasks import TaskSpec

__all__ = [
    "GlueDataNotFound",
    "GlueFormatError",
    "features_for",
    "load_glue_split",
    "resolve_glue_dir",
    "sample_examples",
]

HUB_DATASET = "nyu-mll/glue"

_LAYOUT_HINT = (
    "the directory must contain one folder per task in the GLUE distribution layout, "
    "e.g. <dir>/SST-2/train.tsv and <dir>/SST-2/dev.tsv "
    "(the layout written by the classic download_glue_data.py script)"
)
_FIX_HINT = (
    "point kdrun at it with `kdrun data.glue_dir=/path/to/glue_data ...` "
    "or `export GLUE_DIR=/path/to/glue_data`"
)


class GlueFormatError(ValueError):
    """A GLUE TSV file does not have the expected shape; the message names file and line."""


class GlueDataNotFound(FileNotFoundError):
    """No GLUE data could be found (local path missing, or hub unreachable)."""


@dataclass(frozen=True)
class _TsvLayout:
    """Where the fields live in a task's TSV files (GLUE files are not uniform)."""

    text_cols: tuple[str, ...]
    label_col: str
    test_id_col: str = "index"
    # Column names for train/dev files that ship without a header row (CoLA).
    headerless: tuple[str, ...] | None = None
    # MNLI: the gold label is the last field; rows are allowed to omit trailing
    # annotator columns, so only a lower bound on the field count is enforced.
    label_last: bool = False


_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout(("sentence",), "label", headerless=("source", "label", "star", "sentence")),
    "sst2": _TsvLayout(("sentence",), "label"),
    "mrpc": _TsvLayout(("#1 String", "#2 String"), "Quality"),
    "stsb": _TsvLayout(("sentence1", "sentence2"), "score"),
    "qqp": _TsvLayout(("question1", "question2"), "is_duplicate", test_id_col="id"),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label", label_last=True),
    "qnli": _TsvLayout(("question", "sentence"), "label"),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label"),
    "wnli": _TsvLayout(("sentence1", "sentence2"), "label"),
}

# Accept the hub's split names as aliases of the GLUE file names.
_SPLIT_ALIASES = {
    "validation": "dev",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
}


def features_for(task: TaskSpec) -> datasets.Features:
    """The fixed output schema; the label dtype is the only per-task difference."""
    label = datasets.Value("float32") if task.is_regression else datasets.Value("int64")
    return datasets.Features(
        {
            "id": datasets.Value("int64"),
            "text_a": datasets.Value("string"),
            "text_b": datasets.Value("string"),
            "label": label,
        }
    )


def resolve_glue_dir(glue_dir: str | os.PathLike[str] | None) -> str | None:
    """Explicit ``glue_dir`` wins; otherwise fall back to ``$GLUE_DIR``; empty means unset."""
    if glue_dir is not None and str(glue_dir) != "":
        return str(glue_dir)
    env = os.environ.get("GLUE_DIR", "")
    return env or None


def load_glue_split(
    task: TaskSpec, split: str, glue_dir: str | os.PathLike[str] | None
) -> datasets.Dataset:
    """Load one split of ``task`` with columns ``id, text_a, text_b, label``.

    ``split`` is a GLUE file name (``train``, ``dev``, ``test``, MNLI's
    ``dev_matched`` ...). ``glue_dir=None`` (and no ``$GLUE_DIR``) means the hub.
    Unlabeled test rows get label -1 (NaN for STS-B).
    """
    split = _normalize_split(task, split)
    root = resolve_glue_dir(glue_dir)
    if root is None:
        return _load_from_hub(task, split)
    return _load_from_dir(task, split, Path(root).expanduser())


def sample_examples(
    ds: datasets.Dataset, max_examples: int | None, seed: int
) -> datasets.Dataset:
    """Seeded random subset, kept in file order.

    Random rather than the head of the file because GLUE files are often sorted
    (e.g. by source or genre), so a prefix would be a biased sample. Sorting the
    chosen positions keeps runs comparable and the ``id`` order monotone.
    """
    if max_examples is None or max_examples >= len(ds):
        return ds
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None, got {max_examples}")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(ds), size=max_examples, replace=False))
    return ds.select(picked.tolist())


# --------------------------------------------------------------------------- helpers


def _normalize_split(task: TaskSpec, split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in task.splits:
        raise ValueError(
            f"Task {task.name!r} has no split {split!r}; valid splits: {', '.join(task.splits)}"
        )
    return split


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def _honour_offline_env() -> Iterator[None]:
    """Apply ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` as they are *now*.

    ``datasets`` and ``huggingface_hub`` read these variables once at import time, so
    setting them later (a launcher, a test) would otherwise be ignored and the user
    would wait through ~20 s of network retries before getting an error.
    """
    if not (_truthy_env("HF_HUB_OFFLINE") or _truthy_env("HF_DATASETS_OFFLINE")):
        yield
        return
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    targets = [
        (ds_config, "HF_HUB_OFFLINE"),
        (ds_config, "HF_DATASETS_OFFLINE"),
        (hub_constants, "HF_HUB_OFFLINE"),
    ]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in targets if hasattr(mod, attr)]
    try:
        for mod, attr, _ in saved:
            setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, old in saved:
            setattr(mod, attr, old)


def _hub_split_name(split: str) -> str:
    return split.replace("dev", "validation", 1) if split.startswith("dev") else split


def _short_reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load_from_hub(task: TaskSpec, split: str) -> datasets.Dataset:
    hub_split = _hub_split_name(split)
    try:
        with _honour_offline_env():
            raw = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except Exception as exc:  # any failure here means "no data available"
        raise GlueDataNotFound(
            f"Could not load GLUE task {task.name!r} (split {split!r}): no local GLUE "
            f"directory was given (neither data.glue_dir nor the GLUE_DIR environment "
            f"variable is set) and the Hugging Face hub dataset {HUB_DATASET} could not "
            f"be loaded ({_short_reason(exc)}). To use local data in the GLUE layout, "
            f"run `export GLUE_DIR=/path/to/glue_data` or pass "
            f"`kdrun data.glue_dir=/path/to/glue_data ...`; {_LAYOUT_HINT}."
        ) from exc
    return _convert_hub(task, raw)


def _convert_hub(task: TaskSpec, raw: datasets.Dataset) -> datasets.Dataset:
    """Rename hub columns to the kdrun schema; hub labels are already canonical."""
    cols = raw.select_columns(["idx", *task.text_columns, "label"]).to_dict()
    n = len(cols["idx"])
    if task.is_regression:
        labels: list[float] | list[int] = [
            float("nan") if v is None or v < 0 else float(v) for v in cols["label"]
        ]
    else:
        labels = [-1 if v is None else int(v) for v in cols["label"]]
    data = {
        "id": [int(v) for v in cols["idx"]],
        "text_a": cols[task.text_columns[0]],
        "text_b": cols[task.text_columns[1]] if task.is_pair else [""] * n,
        "label": labels,
    }
    return datasets.Dataset.from_dict(data, features=features_for(task))


def _load_from_dir(task: TaskSpec, split: str, root: Path) -> datasets.Dataset:
    if not root.is_dir():
        raise GlueDataNotFound(
            f"GLUE data directory {root} does not exist (or is not a directory). "
            f"Download GLUE there, or if it lives elsewhere {_FIX_HINT}; {_LAYOUT_HINT}."
        )
    path = root / task.glue_dir_name / f"{split}.tsv"
    if not path.is_file():
        raise GlueDataNotFound(
            f"GLUE file {path} not found (task {task.name!r}, split {split!r}). "
            f"Check that {root} is the right directory, or {_FIX_HINT}; {_LAYOUT_HINT}."
        )
    data = _parse_tsv(task, split, path)
    if not data["id"]:
        raise _no_rows(task, split, path)
    return datasets.Dataset.from_dict(data, features=features_for(task))


def _no_rows(task: TaskSpec, split: str, path: Path) -> GlueFormatError:
    """A split with no examples: nothing downstream (tokenising, sampling, metrics) can work on it, and
    the failure it causes there (``Column 'length' doesn't exist``) does not name the file."""
    layout = _TSV_LAYOUTS[task.name]
    headerless = layout.headerless is not None and split not in task.test_splits
    what = "is empty" if headerless else "has a header but no rows"
    return GlueFormatError(
        f"GLUE file {path} {what} (task {task.name!r}, split {split!r}); a split needs at least one "
        f"example. Download the task again, or if complete files live elsewhere {_FIX_HINT}."
    )


def _read_lines(path: Path) -> list[str]:
    """Lines without terminators; BOM and trailing blank lines dropped.

    ``str.splitlines`` is avoided on purpose: it also splits on characters such as
    U+2028 or form feed that can legitimately occur inside a sentence.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise GlueFormatError(f"{path}, line {line}: not valid UTF-8 ({exc.reason})") from exc
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    while lines and lines[-1].strip() == "":
        lines.pop()
    return lines


def _parse_tsv(task: TaskSpec, split: str, path: Path) -> dict[str, list]:
    """Parse one GLUE TSV file into column lists (plain Python: fast and precise errors)."""
    layout = _TSV_LAYOUTS[task.name]
    is_test = split in task.test_splits
    lines = _read_lines(path)

    def fail(lineno: int, what: str) -> GlueFormatError:
        return GlueFormatError(f"Malformed GLUE file {path}, line {lineno}: {what}")

    if layout.headerless is not None and not is_test:
        names = list(layout.headerless)
        first_data = 0
    else:
        if not lines:
            raise fail(1, "file is empty, expected a header row")
        names = [c.strip() for c in lines[0].split("\t")]
        first_data = 1

    def col(name: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            raise fail(
                1, f"header has no column {name!r} (found: {', '.join(names)})"
            ) from None

    text_idx = [col(c) for c in layout.text_cols]
    id_idx = col(layout.test_id_col) if is_test else None
    label_idx: int | None = None
    if not is_test:
        label_idx = -1 if layout.label_last else col(layout.label_col)
        if layout.label_last:
            col(layout.label_col)  # still insist the header names it

    n_fields = len(names)
    needed = [i for i in (*text_idx, id_idx) if i is not None]
    min_fields = max(needed) + 2 if layout.label_last and not is_test else n_fields
    if layout.label_last and not is_test:
        expected = f"between {min_fields} and {n_fields}"
    else:
        expected = str(n_fields)

    label_map = {name: i for i, name in enumerate(task.label_names)}
    label_map.update({str(i): i for i in range(len(task.label_names))})

    ids: list[int] = []
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list = []
    ia = text_idx[0]
    ib = text_idx[1] if len(text_idx) > 1 else None

    for pos, line in enumerate(lines[first_data:]):
        fields = line.split("\t")
        nf = len(fields)
        if nf != n_fields and not (min_fields <= nf <= n_fields):
            lineno = pos + first_data + 1
            raise fail(lineno, f"expected {expected} tab-separated fields, found {nf}")
        text_a.append(fields[ia])
        text_b.append(fields[ib] if ib is not None else "")
        if id_idx is not None:
            raw_id = fields[id_idx].strip()
            try:
                ids.append(int(raw_id))
            except ValueError:
                raise fail(
                    pos + first_data + 1, f"{layout.test_id_col} {raw_id!r} is not an integer"
                ) from None
        else:
            ids.append(pos)
        if label_idx is None:
            labels.append(math.nan if task.is_regression else -1)
        elif task.is_regression:
            raw_label = fields[label_idx].strip()
            try:
                score = float(raw_label)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise fail(pos + first_data + 1, f"score {raw_label!r} is not a finite number")
            labels.append(score)
        else:
            raw_label = fields[label_idx].strip()
            try:
                labels.append(label_map[raw_label])
            except KeyError:
                raise fail(
                    pos + first_data + 1,
                    f"label {raw_label!r} is not one of {list(task.label_names)} "
                    f"(or a class index 0..{task.num_labels - 1})",
                ) from None

    return {"id": ids, "text_a": text_a, "text_b": text_b, "label": labels}
