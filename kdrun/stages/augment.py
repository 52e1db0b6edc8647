"""Stage augment: the augmented training set, written as JSONL shards into the stage cache.

The output holds every (sampled) training example followed by its augmented
copies. Each row keeps the id of its source example (``source_id``) and gets an
id of its own (``source_id * (n_iter + 1) + copy + 1``; the original keeps
``source_id * (n_iter + 1)``), so that teacher outputs can be cached by id.
Copies identical to their source are dropped. Shards are written to a temporary
name and renamed, so a resumed run redoes only the shards that are missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig

from kdrun.augment.tang import PosVocabulary, TangSettings, load_tagger, sentences_of, tag_examples, tang_augment
from kdrun.data.glue import sample_examples
from kdrun.pipeline import PipelineError, Stage, StageOutput, register
from kdrun.stages import task_data

logger = logging.getLogger(__name__)

RECIPES = ("tang",)
SHARDS = "shards"


def check(cfg: DictConfig) -> None:
    if cfg.augment.name == "none":
        return
    if cfg.augment.name not in RECIPES:
        raise PipelineError(
            f"augment={cfg.augment.name} has no augmentation stage; choose one of {RECIPES}, or drop "
            "'augment' from pipeline.stages to train on the original data."
        )
    _settings(cfg)
    task_data.check_data_available(cfg)


def _settings(cfg: DictConfig) -> TangSettings:
    a = cfg.augment
    try:
        return TangSettings(p_mask=a.p_mask, p_pos=a.p_pos, p_ng=a.p_ng, n_iter=a.n_iter, max_ngram=a.max_ngram)
    except ValueError as error:
        raise PipelineError(f"augment: {error}") from error


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    if cfg.augment.name == "none":  # the stage passes the original training set through
        return {"passthrough": True}
    settings = _settings(cfg)
    source = sample_examples(task_data.train_examples(cfg), cfg.augment.max_examples, cfg.augment.seed)
    examples = [(int(i), a, b or None) for i, a, b in zip(source["id"], source["text_a"], source["text_b"])]
    labels = dict(zip((int(i) for i in source["id"]), source["label"]))
    logger.info("augment: tagging %d training examples.", len(examples))
    tagged = tag_examples(load_tagger(), examples)
    vocabulary = PosVocabulary.from_tagged(sentences_of(tagged))
    stride = settings.n_iter + 1
    shard_dir = out_dir / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows_written = 0
    shard_size = cfg.augment.shard_size
    for number, start in enumerate(range(0, len(tagged), shard_size)):
        path = shard_dir / f"shard-{number:05d}.jsonl"
        if path.exists():
            rows_written += sum(1 for _ in path.open())
            continue
        part = tagged[start : start + shard_size]
        lines = []
        for source_id, text_a, text_b in examples[start : start + shard_size]:
            lines.append({"id": source_id * stride, "source_id": source_id, "text_a": text_a, "text_b": text_b or "", "label": labels[source_id]})
        for row in tang_augment(part, vocabulary, settings, cfg.augment.seed):
            sid = row["source_id"]
            lines.append({
                "id": sid * stride + row["copy"] + 1, "source_id": sid, "text_a": row["text_a"],
                "text_b": row["text_b"] or "", "label": labels[sid],
            })
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
        partial.rename(path)
        rows_written += len(lines)
    return {"source_examples": len(examples), "rows": rows_written, "copies": rows_written - len(examples), "shards": len(list(shard_dir.glob("*.jsonl")))}


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


STAGE = register(
    Stage(
        name="augment",
        run=run,
        check=check,
        reads=("task", "data.max_train_examples", "data.sample_seed", "augment"),
    )
)
