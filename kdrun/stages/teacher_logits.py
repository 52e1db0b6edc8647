"""Stage teacher_logits: the fine-tuned teacher's logits on task distillation's training rows, one cached artefact.

Task distillation's prediction step learns them, looked up by example id (``kdrun.distill.teacher_logits``),
so shuffled, length-grouped or resumed batches always get their own row's logits. The rows are the ones
task distillation trains on: the augmented set when an augment stage runs before, else the (sampled)
training split. The key names the teacher (finetune_teacher's key), the rows (the task data settings,
the GLUE files' content, augment's key) and the precision, and not the student: every student, ablation
row and seed of a sweep shares one computation, which over an augmented set takes minutes.

Output: ``logits.safetensors`` (``ids`` and ``logits``).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.models.loading import load_for_sequence_classification
from kdrun.precision import resolve_precision
from kdrun.predict import predict_logits
from kdrun.stages.context import StageContext, check_data_available
from kdrun.train import get_accelerator

LOGITS_FILE = "logits.safetensors"


def check(cfg: DictConfig) -> None:
    check_data_available(cfg)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    precision = resolve_precision(cfg.device)
    teacher, tokenizer = load_for_sequence_classification(str(ctx.model_dir("finetune_teacher")), ctx.task)
    teacher = precision.inference_model(teacher, copy=False)
    teacher.to(get_accelerator(cfg.device).device).eval().requires_grad_(False)
    text = ctx.text(tokenizer)
    rows = text.features(ctx.distillation_rows())
    batch_size = cfg.task_distill.prediction.train.eval_batch_size
    logits = predict_logits(teacher, rows, text.collate, batch_size, description="teacher logits", precision=precision)
    TeacherLogits(torch.tensor(rows["id"]), torch.from_numpy(logits)).save(ctx.out_dir / LOGITS_FILE)
    return {"file": LOGITS_FILE, "rows": len(rows), "labels": int(logits.shape[1]), "precision": precision.name}
