"""Stage finetune_teacher: supervised fine-tuning of the teacher on the GLUE task.

Reads the task, the teacher, the data sampling and its own training settings;
writes ``model/`` (a ``save_pretrained`` directory with tokenizer) holding the
best dev checkpoint, which every distillation stage then uses as its teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.models.loading import classification_config, load_for_sequence_classification, load_tokenizer, check_tokenizer_matches, save_tokenizer
from kdrun.contract import StageOutput
from kdrun.predict import main_metric_key, model_inputs, score_dev_sets
from kdrun.stages import task_data
from kdrun.train import TrainingJob, seed_everything, train


def check(cfg: DictConfig) -> None:
    task = task_data.task_of(cfg)
    config = classification_config(cfg.teacher.path, task, cfg.teacher.revision)
    check_tokenizer_matches(load_tokenizer(cfg.teacher.path, cfg.teacher.revision), config, cfg.teacher.path)
    task_data.check_data_available(cfg)


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    task = task_data.task_of(cfg)
    settings = cfg.finetune_teacher
    seed_everything(settings.train.seed)
    model, tokenizer = load_for_sequence_classification(cfg.teacher.path, task, cfg.teacher.revision)
    collate = task_data.collator(tokenizer, task)
    train_set = task_data.tokenized({"train": task_data.train_examples(cfg)}, tokenizer, cfg)["train"]
    dev_sets = task_data.tokenized(task_data.dev_examples(cfg), tokenizer, cfg)

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch), labels=batch["labels"]).loss

    def save_model(model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)

    job = TrainingJob(
        model=model,
        train_features=train_set,
        collate=collate,
        compute_loss=compute_loss,
        save_model=save_model,
        evaluate=lambda m: score_dev_sets(m, task, dev_sets, collate, settings.train.eval_batch_size),
        best_metric=main_metric_key(task),
        keep_best=settings.keep_best,
        description=f"finetune_teacher {task.name}",
    )
    outcome = train(job, settings.train, cfg.device, out_dir)
    return {"model_dir": "model", "train_examples": len(train_set), **outcome.summary()}
