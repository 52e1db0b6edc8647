"""Loading a GLUE task's splits as a run's config asks (source, seeded samples, tokenisation).

Every stage that trains or evaluates on the task goes through here, so that all
of them see the same samples of the same files.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from kdrun.augment.shards import load_augmented
from kdrun.data.batching import PaddingCollator, tokenize_examples
from kdrun.data.glue import load_glue_split, sample_examples
from kdrun.data.tasks import TaskSpec, get_task


def task_of(cfg: DictConfig) -> TaskSpec:
    return get_task(cfg.task.name)


def train_examples(cfg: DictConfig) -> datasets.Dataset:
    task = task_of(cfg)
    examples = load_glue_split(task, "train", cfg.data.glue_dir)
    return sample_examples(examples, cfg.data.max_train_examples, cfg.data.sample_seed)


def distillation_rows(cfg: DictConfig, inputs: dict[str, Any], is_regression: bool) -> datasets.Dataset:
    """The rows task distillation trains on (and teacher_logits labels): augment's output when that stage ran
    before, else the (sampled) training split."""
    augmented = load_augmented(inputs["augment"], is_regression) if "augment" in inputs else None
    return augmented if augmented is not None else train_examples(cfg)


def dev_examples(cfg: DictConfig) -> dict[str, datasets.Dataset]:
    """Each dev split of the task (MNLI has matched and mismatched), sampled for CPU scale."""
    task = task_of(cfg)
    return {
        split: sample_examples(load_glue_split(task, split, cfg.data.glue_dir), cfg.data.max_eval_examples, cfg.data.sample_seed)
        for split in task.eval_splits
    }


def test_examples(cfg: DictConfig) -> dict[str, datasets.Dataset]:
    task = task_of(cfg)
    return {split: load_glue_split(task, split, cfg.data.glue_dir) for split in task.test_splits}


def tokenized(examples: dict[str, datasets.Dataset], tokenizer: PreTrainedTokenizerBase, cfg: DictConfig) -> dict[str, datasets.Dataset]:
    return {split: tokenize_examples(ds, tokenizer, cfg.data.max_seq_length) for split, ds in examples.items()}


def collator(tokenizer: PreTrainedTokenizerBase, task: TaskSpec) -> PaddingCollator:
    return PaddingCollator(tokenizer, label_dtype=torch.float32 if task.is_regression else torch.long)


def check_data_available(cfg: DictConfig) -> None:
    """Fail before any training when the task's training or dev data cannot be read (missing dir, no
    hub, a malformed or empty file): reading them is one TSV parse each, far cheaper than a stage
    that stops on them after the ones before it have computed."""
    task = task_of(cfg)
    for split in ("train", *task.eval_splits):
        load_glue_split(task, split, cfg.data.glue_dir)
