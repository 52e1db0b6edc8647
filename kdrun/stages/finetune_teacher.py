"""Stage finetune_teacher: supervised fine-tuning of the teacher on the GLUE task.

Reads the task, the teacher, the data sampling and its own training settings;
writes ``model/`` (a ``save_pretrained`` directory with tokenizer) holding the
best dev checkpoint, which every distillation stage then uses as its teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.models.loading import check_tokenizer_matches, classification_config, load_for_sequence_classification, load_tokenizer, model_saver
from kdrun.predict import main_metric_key, model_inputs
from kdrun.stages.context import StageContext, check_data_available, task_of
from kdrun.train import TrainingJob, seed_everything, train


def check(cfg: DictConfig) -> None:
    config = classification_config(cfg.teacher.path, task_of(cfg), cfg.teacher.revision)
    check_tokenizer_matches(load_tokenizer(cfg.teacher.path, cfg.teacher.revision), config, cfg.teacher.path)
    check_data_available(cfg)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, task = ctx.cfg, ctx.task
    settings = cfg.finetune_teacher
    seed_everything(settings.train.seed)
    model, tokenizer = load_for_sequence_classification(cfg.teacher.path, task, cfg.teacher.revision)
    text = ctx.text(tokenizer)
    train_set = text.features(ctx.train_examples())

    def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch), labels=batch["labels"]).loss

    job = TrainingJob(
        model=model,
        train_features=train_set,
        collate=text.collate,
        compute_loss=compute_loss,
        save_model=model_saver(tokenizer),
        evaluate=text.evaluator(settings.train.eval_batch_size),
        best_metric=main_metric_key(task),
        keep_best=settings.keep_best,
        description=f"finetune_teacher {task.name}",
    )
    outcome = train(job, settings.train, cfg.device, ctx.out_dir)
    return {"model_dir": "model", "train_examples": len(train_set), **outcome.summary()}
