"""Static description of the GLUE tasks.

Everything that differs between tasks (label order, metrics, split names, column
names) lives here so that loaders, metrics and submission writers never need
per-task ``if`` chains of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

_KNOWN_METRICS = frozenset({"accuracy", "f1", "mcc", "pearson", "spearman"})


class UnknownTaskError(ValueError):
    """A task name that is not in ``TASKS`` (a user config error, reported without traceback)."""


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    ``label_names`` is in the canonical order of the Hugging Face ``glue`` dataset's
    ``ClassLabel`` so that class indices mean the same thing whether the data came
    from local TSV files or from the hub (and so that checkpoints stay comparable).
    """

    name: str
    glue_dir_name: str
    hub_config: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    test_splits: tuple[str, ...] = ("test",)

    def __post_init__(self) -> None:
        # Catch registry typos at import time instead of deep inside a training run.
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{self.name}: text_columns must have 1 or 2 entries")
        unknown = set(self.metrics) - _KNOWN_METRICS
        if unknown:
            raise ValueError(f"{self.name}: unknown metrics {sorted(unknown)}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"{self.name}: main_metric {self.main_metric!r} not in metrics")

    @property
    def is_regression(self) -> bool:
        """STS-B is the only task without class names; it predicts a similarity score."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Size of the model's output layer (1 for regression)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """Whether inputs are sentence pairs (decides ``text_b`` handling when tokenizing)."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names ``load_glue_split`` accepts for this task."""
        return ("train", *self.eval_splits, *self.test_splits)


def _spec(
    name: str,
    glue_dir_name: str,
    text_columns: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    main_metric: str,
    **kw: tuple[str, ...],
) -> TaskSpec:
    return TaskSpec(
        name=name,
        glue_dir_name=glue_dir_name,
        hub_config=name,
        text_columns=text_columns,
        label_names=label_names,
        metrics=metrics,
        main_metric=main_metric,
        **kw,
    )


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _spec("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",), "mcc"),
        _spec("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
        _spec(
            "mrpc",
            "MRPC",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            "f1",
        ),
        _spec("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "pearson"),
        _spec(
            "qqp",
            "QQP",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("f1", "accuracy"),
            "f1",
        ),
        _spec(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            eval_splits=("dev_matched", "dev_mismatched"),
            test_splits=("test_matched", "test_mismatched"),
        ),
        _spec(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            ("accuracy",),
            "accuracy",
        ),
        _spec(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            ("entailment", "not_entailment"),
            ("accuracy",),
            "accuracy",
        ),
        _spec(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look up a task by config name.

    Case, ``-`` and ``_`` are ignored so that the GLUE directory spelling
    (``SST-2``, ``STS-B``) works too; anything else is a config error, reported with
    the list of valid names.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    try:
        return TASKS[key]
    except KeyError:
        known = ", ".join(TASKS)
        raise UnknownTaskError(f"Unknown GLUE task {name!r}; known tasks: {known}") from None
