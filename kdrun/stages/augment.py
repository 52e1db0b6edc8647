"""Stage augment: the augmented training set, written as JSONL shards into the stage cache.

Recipes: ``tang`` (Tang et al., 2019) and ``tinybert`` (Jiao et al., 2020), whose
masked LM is ``augment.mlm_model`` or the model of a preceding fit_mlm_head stage.
The output holds every training example followed by its augmented copies
(``augment.max_examples``: copies of a seeded sample only, for CPU scale). Each row keeps the id of its source example (``source_id``) and gets an
id of its own (``source_id * (C + 1) + copy + 1`` with C the most copies an example can
get; the original keeps ``source_id * (C + 1)``), so that teacher outputs can be cached by id.
Copies identical to their source are dropped. Shards are written to a temporary
name and renamed, so a resumed run redoes only the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdrun.data.glove import NeighbourTable
from kdrun.augment import tang, tinybert
from kdrun.augment.tang import PosVocabulary, TangSettings, load_tagger, sentences_of, tag_examples, tang_augment
from kdrun.augment.tinybert import TinyBertAugmenter, TinyBertSettings
from kdrun.data.glue import sample_examples
from kdrun.models.loading import load_checked_config
from kdrun.models.masked_lm import load_masked_lm
from kdrun.augment.shards import SHARDS
from kdrun.contract import PipelineError, user_errors
from kdrun.stages.context import StageContext, check_data_available
from kdrun.precision import resolve_precision
from kdrun.train import get_accelerator

logger = logging.getLogger(__name__)

RECIPES = ("tang", "tinybert")

Example = tuple[int, str, str | None]
AugmentPart = Callable[[list[Example]], Iterator[dict[str, Any]]]
"""Augments some of the examples: rows with ``source_id``, ``copy``, ``text_a``, ``text_b``."""


def check(cfg: DictConfig) -> None:
    if cfg.augment.name == "none":
        return
    if cfg.augment.name not in RECIPES:
        raise PipelineError(
            f"augment={cfg.augment.name} has no augmentation stage; choose one of {RECIPES}, or drop "
            "'augment' from pipeline.stages to train on the original data."
        )
    if cfg.augment.name == "tang":
        _tang_settings(cfg)
    else:
        _tinybert_settings(cfg)
        stages = list(cfg.pipeline.stages)
        before = stages[: stages.index("augment")] if "augment" in stages else stages
        if cfg.augment.mlm_model is None and "fit_mlm_head" not in before:
            raise PipelineError(
                "augment=tinybert needs a masked LM: put fit_mlm_head before augment in pipeline.stages "
                "(it fits one on the teacher), or set augment.mlm_model to a masked LM (HF id or directory)."
            )
        if cfg.augment.mlm_model is not None:
            load_checked_config(cfg.augment.mlm_model)
    check_data_available(cfg)


def _copies(cfg: DictConfig, per_task: dict[str, int]) -> int:
    """``augment.n_iter``, or when null the method's per-task number from its paper (20 for a task it does not list)."""
    return cfg.augment.n_iter if cfg.augment.n_iter is not None else per_task.get(cfg.task.name, 20)


def _tang_settings(cfg: DictConfig) -> TangSettings:
    a = cfg.augment
    with user_errors("augment"):
        return TangSettings(p_mask=a.p_mask, p_pos=a.p_pos, p_ng=a.p_ng, n_iter=_copies(cfg, tang.COPIES_PER_TASK), max_ngram=a.max_ngram)


def _tinybert_settings(cfg: DictConfig) -> TinyBertSettings:
    a = cfg.augment
    with user_errors("augment"):
        return TinyBertSettings(n_copies=_copies(cfg, tinybert.COPIES_PER_TASK), p_replace=a.p_replace, top_k=a.top_k)


def _tang(cfg: DictConfig, examples: list[Example]) -> tuple[AugmentPart, int]:
    """Tang et al.: tag everything once (the POS vocabulary needs the whole set), then augment parts."""
    settings = _tang_settings(cfg)
    logger.info("augment: tagging %d training examples.", len(examples))
    tagged = tag_examples(load_tagger(), examples)
    vocabulary = PosVocabulary.from_tagged(sentences_of(tagged))
    by_id = {example.source_id: example for example in tagged}

    def augment_part(part: list[Example]) -> Iterator[dict[str, Any]]:
        return tang_augment([by_id[source_id] for source_id, _, _ in part], vocabulary, settings, cfg.augment.seed)

    return augment_part, settings.n_iter


def _tinybert(ctx: StageContext, examples: list[Example]) -> tuple[AugmentPart, int]:
    """TinyBERT: candidates are per sentence, so each part is augmented on its own."""
    cfg = ctx.cfg
    settings = _tinybert_settings(cfg)
    reference = cfg.augment.mlm_model if cfg.augment.mlm_model is not None else str(ctx.model_dir("fit_mlm_head"))
    model, tokenizer = load_masked_lm(reference)
    model.to(get_accelerator(cfg.device).device)
    table_name = hashlib.sha256(cfg.augment.glove.encode()).hexdigest()[:12] + f"-k{settings.top_k}.json"
    neighbours = NeighbourTable(Path(cfg.cache.dir) / "glove_neighbours" / table_name, cfg.augment.glove, settings.top_k)
    precision = resolve_precision(cfg.device)
    augmenter = TinyBertAugmenter(precision.inference_model(model, copy=False), tokenizer, neighbours, settings, precision=precision)
    logger.info("augment: TinyBERT recipe, masked LM %s, N=%d copies per sentence.", reference, settings.n_copies)
    pairs = any(text_b is not None for _, _, text_b in examples)
    return (lambda part: augmenter.augment(part, cfg.augment.seed)), settings.n_copies * (2 if pairs else 1)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    if cfg.augment.name == "none":  # the stage passes the original training set through
        return {"passthrough": True}
    source = ctx.train_examples()
    examples = [(int(i), a, b or None) for i, a, b in zip(source["id"], source["text_a"], source["text_b"])]
    labels = dict(zip((int(i) for i in source["id"]), source["label"]))
    # Every training example is kept; copies are made of all of them or of a seeded sample.
    chosen = {int(i) for i in sample_examples(source, cfg.augment.max_examples, cfg.augment.seed)["id"]}
    augment_part, copies = _tang(cfg, examples) if cfg.augment.name == "tang" else _tinybert(ctx, examples)
    stride = copies + 1
    shard_dir = out_dir / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    rows_written = 0
    shard_size = cfg.augment.shard_size
    starts = range(0, len(examples), shard_size)
    started = time.perf_counter()
    for number, start in enumerate(starts):
        path = shard_dir / f"shard-{number:05d}.jsonl"
        if path.exists():
            rows_written += sum(1 for _ in path.open())
            continue
        lines = []
        for source_id, text_a, text_b in examples[start : start + shard_size]:
            lines.append({"id": source_id * stride, "source_id": source_id, "text_a": text_a, "text_b": text_b or "", "label": labels[source_id]})
        for row in augment_part([e for e in examples[start : start + shard_size] if e[0] in chosen]):
            sid = row["source_id"]
            lines.append({
                "id": sid * stride + row["copy"] + 1, "source_id": sid, "text_a": row["text_a"],
                "text_b": row["text_b"] or "", "label": labels[sid],
            })
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
        partial.rename(path)
        rows_written += len(lines)
        logger.info(
            "augment: shard %d/%d written (%d rows so far, %.0f s).", number + 1, len(starts), rows_written,
            time.perf_counter() - started,
        )
    return {
        "recipe": cfg.augment.name, "copies_per_example": copies, "source_examples": len(examples), "augmented_examples": len(chosen),
        "rows": rows_written, "copies": rows_written - len(examples), "shards": len(list(shard_dir.glob("*.jsonl"))),
        "seconds": round(time.perf_counter() - started, 1),
    }
