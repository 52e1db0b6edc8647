"""The augment stage's output as a training set: its JSONL shards, which task distillation reads."""

from __future__ import annotations

import datasets

from kdrun.contract import StageOutput

SHARDS = "shards"


def load_augmented(output: StageOutput, task_is_regression: bool) -> datasets.Dataset | None:
    """The augmented training set of an ``augment`` stage output (None when it passed through)."""
    if output.summary.get("passthrough"):
        return None
    files = sorted(str(p) for p in (output.path / SHARDS).glob("shard-*.jsonl"))
    label = datasets.Value("float32") if task_is_regression else datasets.Value("int64")
    features = datasets.Features({
        "id": datasets.Value("int64"), "source_id": datasets.Value("int64"), "text_a": datasets.Value("string"),
        "text_b": datasets.Value("string"), "label": label,
    })
    return datasets.load_dataset("json", data_files=files, split="train", features=features)
